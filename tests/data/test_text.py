import json
import re

import numpy as np
import pytest
import torch

from lumina.data import get_tokenizer
from lumina.data import text as text_mod
from lumina.data.text import (
    DataError,
    Holdout,
    PackedText,
    expand_paths,
    shakespeare_split,
    tokenize_files,
)


@pytest.fixture
def gpt2():
    return get_tokenizer("gpt2")


def test_windows_shift_exactly_once():
    d = PackedText(np.arange(26, dtype=np.uint32), seq_len=5)
    assert d.num_windows == 5  # (26 - 1) // 5
    for pos in range(7):
        x, y = d.batch_at(pos, 3)
        assert x.shape == y.shape == (3, 5) and x.dtype == torch.int64
        assert torch.equal(y, x + 1)  # target t is token t + 1: shifted once, never twice
        assert torch.equal(x[:, 0] % 5, torch.zeros(3, dtype=torch.int64))  # windows start on boundaries


def test_every_window_once_per_epoch_and_seeded_order():
    d = PackedText(np.arange(1001, dtype=np.uint32), seq_len=10, seed=3)  # 100 windows
    epoch0 = [i for p in range(25) for i in d.window_ids(p, 4)]
    assert sorted(epoch0) == list(range(100))
    epoch1 = [i for p in range(25, 50) for i in d.window_ids(p, 4)]
    assert sorted(epoch1) == list(range(100)) and epoch1 != epoch0
    other_seed = PackedText(d.tokens, seq_len=10, seed=4)
    assert [i for p in range(25) for i in other_seed.window_ids(p, 4)] != epoch0
    # A batch straddling the epoch boundary takes the end of one order and the start of the next.
    assert d.window_ids(33, 3) == [epoch0[99], epoch1[0], epoch1[1]]


def test_resume_yields_the_uninterrupted_batches():
    tokens = np.random.default_rng(0).integers(0, 1000, 5000).astype(np.uint32)
    straight = PackedText(tokens, seq_len=16, seed=7)
    expected = [straight.batch_at(p, 8) for p in range(40)]
    first = PackedText(tokens, seq_len=16, seed=7)
    seen = [first.batch_at(p, 8) for p in range(17)]
    saved_position = 17  # all that a checkpoint needs to store
    resumed = PackedText(tokens.copy(), seq_len=16, seed=7)
    seen += [resumed.batch_at(p, 8) for p in range(saved_position, 40)]
    for (a, b), (c, d) in zip(seen, expected, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_documents_joined_with_endoftext(tmp_path, gpt2):
    (tmp_path / "a.txt").write_text("First document.")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "Second."}) + "\n\n" + json.dumps({"text": "Third!"}) + "\n"
    )
    tokens = tokenize_files(expand_paths([str(tmp_path / "a.txt"), str(tmp_path / "*.jsonl")]), gpt2)
    eot = gpt2.eot_id
    expected = [
        *gpt2.encode("First document."),
        eot,
        *gpt2.encode("Second."),
        eot,
        *gpt2.encode("Third!"),
        eot,
    ]
    assert tokens.tolist() == expected
    assert gpt2.pad_id not in tokens  # packed data never contains padding


def test_token_cache_skips_tokenisation_and_tracks_content(tmp_path, gpt2, monkeypatch):
    f = tmp_path / "doc.txt"
    f.write_text("Cache me. " * 50)
    first = tokenize_files([f], gpt2)
    monkeypatch.setattr(text_mod, "stream_file", lambda *a: pytest.fail("tokenised again"))
    again = tokenize_files([f], gpt2)
    assert np.array_equal(first, again)
    monkeypatch.undo()
    f.write_text("Changed content.")
    assert tokenize_files([f], gpt2).tolist() == [*gpt2.encode("Changed content."), gpt2.eot_id]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "trunc', "bad.jsonl:2: invalid JSON"),
        ("types.jsonl", b'{"text": 5}\n', "types.jsonl:1: expected an object with a string field 'text'"),
        ("utf.txt", b"fine\nbad \xff byte\n", "utf.txt:2: invalid UTF-8"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, gpt2, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        tokenize_files([tmp_path / name], gpt2, cache=False)


def test_bom_and_missing_paths(tmp_path, gpt2):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfHello")
    assert tokenize_files([tmp_path / "bom.txt"], gpt2, cache=False).tolist() == [
        *gpt2.encode("Hello"),
        gpt2.eot_id,
    ]
    with pytest.raises(DataError, match="nothing/\\*.txt: no such file"):
        expand_paths(["nothing/*.txt"])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type"):
        expand_paths([str(tmp_path / "x.csv")])
    with pytest.raises(DataError, match="need at least seq_len \\+ 1"):
        PackedText(np.arange(4, dtype=np.uint32), seq_len=4)


def test_packaged_shakespeare_split(gpt2):
    train, held_out = shakespeare_split(0.05)
    assert len(train) + len(held_out) == 42 and len(held_out) == 3
    assert not set(train) & set(held_out)
    assert shakespeare_split(0.05) == (train, held_out)  # deterministic
    tokens = tokenize_files(held_out, gpt2)
    text = gpt2.decode(tokens[:200].tolist())
    assert "by William Shakespeare" in text


@pytest.mark.parametrize("name", ["gpt2", "cl100k_base", "o200k_base"])
def test_streaming_in_small_chunks_equals_whole_text_encoding(name, monkeypatch):
    tok = get_tokenizer(name)
    train, _ = shakespeare_split()
    files = train[:2]
    monkeypatch.setattr(text_mod, "CHUNK_BYTES", 4096)  # ~50 chunk boundaries per play
    streamed = tokenize_files(files, tok, cache=False)
    whole = [i for f in files for i in (*tok.encode(f.read_text(encoding="utf-8-sig")), tok.eot_id)]
    assert streamed.tolist() == whole


def test_streaming_uses_constant_memory(tmp_path, gpt2, monkeypatch):
    import tracemalloc

    path = tmp_path / "big.txt"
    line = "The quick brown fox jumps over the lazy dog, again and again.\n"
    path.write_text(line * 200_000)  # 12.6 MB, ~2.8M tokens (an in-memory list of them: > 80 MB)
    monkeypatch.setattr(text_mod, "CHUNK_BYTES", 256 << 10)
    tracemalloc.start()
    tokens = tokenize_files([path], gpt2)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(tokens) == 200_000 * len(gpt2.encode(line)) + 1
    assert peak < 16 << 20, f"peak {peak / 2**20:.1f} MiB"
    assert isinstance(tokens, np.memmap)


def test_invalid_utf8_mid_stream_names_the_line(tmp_path, gpt2, monkeypatch):
    path = tmp_path / "late.txt"
    path.write_bytes(b"fine line\n" * 5000 + b"bad \xff\n" + b"more\n")
    monkeypatch.setattr(text_mod, "CHUNK_BYTES", 1024)
    with pytest.raises(DataError, match="late.txt:5001: invalid UTF-8"):
        tokenize_files([path], gpt2, cache=False)
    assert not list((tmp_path).glob("*.tmp"))


def test_a_directory_is_its_data_files_recursive_and_sorted(tmp_path, gpt2):
    root = tmp_path / "corpus"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    files = ["z.txt", "a.jsonl", "b/deep/c.txt", "b/a.txt", "B.txt", "notes.md", ".hidden.txt", ".git/x.txt"]
    for rel in files:
        (root / rel).write_text(json.dumps({"text": rel}) if rel.endswith(".jsonl") else rel)
    got = expand_paths([f"{root}/"])
    # .txt / .jsonl only, hidden entries skipped, sorted by path components (code points): deterministic
    expected = ["B.txt", "a.jsonl", "b/a.txt", "b/deep/c.txt", "z.txt"]
    assert [p.relative_to(root).as_posix() for p in got] == expected
    documents = gpt2.decode(tokenize_files(got, gpt2, cache=False).tolist()).split("<|endoftext|>")
    assert documents == [*expected, ""]
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.md").write_text("not data")
    with pytest.raises(DataError) as e:
        expand_paths([str(empty)])
    assert str(e.value) == f"{empty}: a directory with no data files (.txt or .jsonl, searched recursively)"


def test_held_out_paragraphs_do_not_depend_on_the_chunk_size(gpt2, monkeypatch):
    play = shakespeare_split()[0][1]

    def sides():
        cut, n, k, unit = text_mod.text_holdout([play], 0.05)
        streams = [
            gpt2.decode(tokenize_files([play], gpt2, cache=False, holdout=Holdout(cut, side)).tolist())
            for side in ("train", "eval")
        ]
        assert all(s.count("<|endoftext|>") == 1 and s.endswith("<|endoftext|>") for s in streams)
        streams = [s.removesuffix("<|endoftext|>") for s in streams]
        return (cut, n, k, unit), [[b.strip() for b in re.split(r"\n\s*\n", s) if b.strip()] for s in streams]

    whole = sides()
    monkeypatch.setattr(text_mod, "CHUNK_BYTES", 4096)  # ~37 chunk boundaries, many inside separators
    assert sides() == whole
    (_, n, k, unit), (train, held_out) = whole
    assert unit == "paragraph" and len(held_out) == k and len(train) + k == n
