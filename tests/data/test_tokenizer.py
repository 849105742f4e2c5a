import hashlib
import os

import pytest
import tiktoken
import tiktoken.load

from lumina import presets
from lumina.data import tokenizer as tok
from lumina.data.tokenizer import TokenizerError, get_tokenizer, install_offline_cache


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any attempt by tiktoken to download fails the test."""

    local_read = tiktoken.load.read_file

    def no_network(blobpath):
        if "://" in blobpath:
            raise AssertionError(f"tried to download {blobpath}")
        return local_read(blobpath)

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)


# Published ids (tiktoken's own tests and the OpenAI cookbook).
@pytest.mark.parametrize(
    "name, text, ids",
    [
        ("gpt2", "hello world", [31373, 995]),
        ("r50k_base", "hello world", [31373, 995]),
        ("cl100k_base", "hello world", [15339, 1917]),
        ("o200k_base", "hello world", [24912, 2375]),
        ("cl100k_base", "tiktoken is great!", [83, 1609, 5963, 374, 2294, 0]),
    ],
)
def test_published_ids_offline(name, text, ids):
    t = get_tokenizer(name)
    assert t.encode(text) == ids
    assert t.decode(ids) == text


@pytest.mark.parametrize("name", tok.OFFLINE_ENCODINGS)
def test_round_trip_and_special_ids(name):
    t = get_tokenizer(name)
    text = "Naïve café — 東京 🙂\nline two\r\n\ttab"
    assert t.decode(t.encode(text)) == text
    assert t.encode("<|im_start|>") != [t.im_start_id]  # user text never becomes a special token
    ids = t.encoding.encode("<|im_start|>user<|im_end|><|endoftext|>", allowed_special="all")
    assert ids[0] == t.im_start_id and ids[-2:] == [t.im_end_id, t.eot_id]
    # The pad id is not any token: encode never emits it and tiktoken cannot decode it.
    assert t.pad_id >= t.encoding.n_vocab
    with pytest.raises(KeyError):
        t.encoding.decode_single_token_bytes(t.pad_id)
    assert t.decode([*t.encode("a!"), t.pad_id]) == "a!"
    assert t.vocab_size % 128 == 0 and t.vocab_size > t.pad_id


def test_vocab_sizes_match_presets():
    assert get_tokenizer("gpt2").vocab_size == presets.GPT2_VOCAB == presets.get("debug").model.vocab_size
    assert get_tokenizer("cl100k_base").vocab_size == presets.CL100K_VOCAB


def test_plain_tiktoken_works_after_install(tmp_path, monkeypatch):
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    cache = install_offline_cache(("cl100k_base", "gpt2"), cache_dir=tmp_path)
    assert cache == tmp_path and os.environ["TIKTOKEN_CACHE_DIR"] == str(tmp_path)
    assert len(list(tmp_path.iterdir())) == 3  # one .tiktoken file + the two GPT-2 files
    enc = tiktoken.Encoding(**tiktoken.registry.ENCODING_CONSTRUCTORS["cl100k_base"]())
    assert enc.encode("hello world") == [15339, 1917]


def test_corrupt_cache_entry_is_replaced_and_bad_package_file_is_refused(tmp_path, monkeypatch):
    install_offline_cache(("cl100k_base",), cache_dir=tmp_path)
    (entry,) = tmp_path.iterdir()
    good = hashlib.sha256(entry.read_bytes()).hexdigest()
    entry.write_bytes(b"garbage")
    install_offline_cache(("cl100k_base",), cache_dir=tmp_path)
    assert hashlib.sha256(entry.read_bytes()).hexdigest() == good
    entry.unlink()
    monkeypatch.setattr(tok, "_packaged_bytes", lambda filename, cache: b"tampered")
    with pytest.raises(TokenizerError, match="tiktoken expects 2239"):
        install_offline_cache(("cl100k_base",), cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_local_tiktoken_file(tmp_path):
    import base64

    ranks = [bytes([b]) for b in range(256)] + [b"ab", b"abab"]
    path = tmp_path / "tiny.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(ranks)))
    t = get_tokenizer(str(path))
    assert t.encode("abab ab") == [257, 32, 256]
    assert t.eot_id == 258 and t.im_start_id == 259 and t.pad_id == 261 and t.vocab_size == 384
    path.write_bytes(
        path.read_bytes().replace(b" 257\n", b" 999\n")
    )  # edited file: new ranks, no stale cache
    get_tokenizer.cache_clear()
    assert get_tokenizer(str(path)).encode("abab") != [257]
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not base64 at all\n")
    with pytest.raises(TokenizerError, match=r"bad.tiktoken:1: not a .tiktoken rank file"):
        get_tokenizer(str(bad))


def test_unknown_names():
    with pytest.raises(TokenizerError, match="data.tokenizer='nope': unknown tokenizer"):
        get_tokenizer("nope")
    with pytest.raises(TokenizerError, match="^data.tokenizer='missing/file.tiktoken': no such .tiktoken"):
        get_tokenizer("missing/file.tiktoken")


def test_unknown_name_is_one_line_naming_the_field_and_the_choices():
    with pytest.raises(TokenizerError) as e:
        get_tokenizer("nosuch")
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith("data.tokenizer='nosuch': unknown tokenizer")
    for accepted in (*tok.OFFLINE_ENCODINGS, "a path to a .tiktoken file"):
        assert accepted in msg
    with pytest.raises(TokenizerError, match=r"^--tokenizer='nosuch': unknown tokenizer"):
        get_tokenizer("nosuch", field="--tokenizer")


def test_a_tiktoken_name_that_needs_a_download_fails_in_one_line_when_offline(tmp_path, monkeypatch):
    import requests

    def unreachable(blobpath):  # what tiktoken's download raises on a machine without network
        raise requests.exceptions.ConnectionError(f"Max retries exceeded with url: {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", unreachable)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(TokenizerError) as e:
        get_tokenizer("p50k_base")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data.tokenizer='p50k_base': ")
    assert "not shipped offline" in msg and "download failed" in msg and "gpt2" in msg
