import dataclasses
import json
import re

import msgpack
import numpy as np
import pytest
import torch

from lumina import presets
from lumina.configure import load_config
from lumina.data import get_tokenizer
from lumina.data import text as text_mod
from lumina.data.chat import ChatRows, chitchat_conversations, chitchat_split
from lumina.data.mix import DataMix, MixState, build_mix
from lumina.data.text import DataError, PackedText, shakespeare_split

CONVS = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(7)]


def sources(seed=0):
    tok = get_tokenizer("gpt2")
    base = PackedText(np.arange(2000, dtype=np.uint32), seq_len=8, seed=seed)
    return base, ChatRows.build(CONVS, tok, seq_len=8, seed=seed)


def run(mix, state, ratios):
    out = []
    for r in ratios:
        x, y, src, state = mix.next_batch(state, ratio=r)
        out.append((x, y, src))
    return out, state


def test_hybrid_switch_is_logged(caplog):
    base, chat = sources()
    mix = DataMix("hybrid", base, chat, batch_size=2, total_steps=10, hybrid_base_fraction=0.5)
    with caplog.at_level("INFO", logger="lumina.data.mix"):
        run(mix, MixState(), [0.5] * 10)
    assert [r.getMessage() for r in caplog.records] == [
        "data: hybrid mode switches from base text to chat at step 5"
    ]


def test_single_source_modes_and_hybrid_switch():
    base, chat = sources()
    for mode, expected in (
        ("base_only", "b" * 10),
        ("finetuning_only", "c" * 10),
        ("hybrid", "b" * 7 + "c" * 3),
    ):
        mix = DataMix(mode, base, chat, batch_size=2, total_steps=10, hybrid_base_fraction=0.7)
        batches, state = run(mix, MixState(), [0.5] * 10)
        assert "".join(src[0] for _, _, src in batches) == expected
        assert state.step == 10 and state.base == expected.count("b") and state.chat == expected.count("c")
    assert (
        DataMix("hybrid", base, chat, batch_size=2, total_steps=10, hybrid_base_fraction=0.7).switch_step == 7
    )


def test_interleaved_ratio_is_respected_and_live():
    base, chat = sources()
    mix = DataMix("interleaved", base, chat, batch_size=1, seed=3)
    picks = [mix.source(s, 0.3) for s in range(4000)]
    assert 0.27 < picks.count("base") / 4000 < 0.33
    assert {mix.source(s, 0.0) for s in range(200)} == {"chat"}
    assert {mix.source(s, 1.0) for s in range(200)} == {"base"}
    # Raising the ratio only turns chat steps into base steps; it never reshuffles the others.
    assert all(mix.source(s, 0.6) == "base" for s in range(4000) if picks[s] == "base")


def test_resume_with_a_live_ratio_change_matches_the_straight_run():
    base, chat = sources(seed=5)
    mix = DataMix("interleaved", base, chat, batch_size=3, seed=5)
    ratios = [0.5] * 10 + [0.9] * 20
    straight, _ = run(mix, MixState(), ratios)
    first, state = run(mix, MixState(), ratios[:12])
    saved = msgpack.packb(state.to_dict())  # what a checkpoint stores
    base2, chat2 = sources(seed=5)
    resumed_mix = DataMix("interleaved", base2, chat2, batch_size=3, seed=5)
    rest, _ = run(resumed_mix, MixState.from_dict(msgpack.unpackb(saved)), ratios[12:])
    for (x, y, s), (x2, y2, s2) in zip(straight, first + rest, strict=True):
        assert s == s2 and torch.equal(x, x2) and torch.equal(y, y2)


def test_bad_state_and_missing_sources():
    with pytest.raises(DataError, match="is not a MixState"):
        MixState.from_dict({"step": 1, "base": -1, "chat": 0})
    base, _ = sources()
    with pytest.raises(DataError, match="data.mode=hybrid needs chat data"):
        DataMix("hybrid", base, None, batch_size=2)


def test_build_from_config_defaults_and_vocab_check():
    cfg = load_config(overrides=["--data.mode=interleaved"])
    train, held_out = build_mix(cfg, "train"), build_mix(cfg, "eval")
    assert train.base.num_windows > 10 * held_out.base.num_windows > 0
    assert len(train.chat.tokens) + len(held_out.chat.tokens) == 4013
    tr, ev = chitchat_split(0.05)
    assert not {str(c) for c in tr} & {str(c) for c in ev}
    small = load_config(overrides=["--model.vocab_size=1000"])
    with pytest.raises(
        DataError, match="tokenizer gpt2 needs 50304 embedding rows but model.vocab_size=1000"
    ):
        build_mix(small)


def config(seq_len=None, **data):
    """The debug preset with ``data`` fields (and train.seq_len) replaced; no CLI parsing involved."""
    base = presets.get("debug")
    train = dataclasses.replace(base.train, seq_len=seq_len) if seq_len else base.train
    return dataclasses.replace(base, train=train, data=dataclasses.replace(base.data, **data))


def paragraphs(text):
    return [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip()]


def decoded_documents(tokens):
    """The documents of a token stream (split at <|endoftext|>)."""
    return get_tokenizer("gpt2").decode(np.asarray(tokens).tolist()).split("<|endoftext|>")[:-1]


def test_user_text_without_eval_files_holds_out_disjoint_paragraphs_deterministically(tmp_path):
    play = shakespeare_split()[0][0]  # real text: a packaged play, as the user's own single file
    mine = tmp_path / "my.txt"
    mine.write_bytes(play.read_bytes())
    cfg = config(train_files=(str(mine),))  # and no eval files
    train, held_out = build_mix(cfg, "train"), build_mix(cfg, "eval")
    [train_text], [eval_text] = decoded_documents(train.base.tokens), decoded_documents(held_out.base.tokens)
    train_pars, eval_pars = paragraphs(train_text), paragraphs(eval_text)
    everything = paragraphs(mine.read_text(encoding="utf-8-sig"))
    assert not set(train_pars) & set(eval_pars)  # disjoint documents (a repeated paragraph stays on one side)
    assert sorted(train_pars + eval_pars) == sorted(everything)  # and nothing lost
    n_held, n = map(int, re.search(r"held out (\d+) of (\d+) paragraphs", held_out.eval_note).groups())
    assert (n_held, n) == (len(eval_pars), len(everything)) and 0.03 < n_held / n < 0.07
    assert held_out.eval_note == train.eval_note
    assert f"of {mine} " in train.eval_note and "data.eval_fraction=0.05" in train.eval_note
    assert "--eval-data" in train.eval_note
    # The same split on every build: nothing depends on Python's salted hash() or an RNG.
    again = build_mix(cfg, "eval")
    assert np.array_equal(again.base.tokens, held_out.base.tokens) and again.eval_note == held_out.eval_note
    # Training draws batches from it end to end.
    x, y, src, _ = train.next_batch(MixState())
    assert src == "base" and x.shape == y.shape == (cfg.train.micro_batch_size, cfg.train.seq_len)
    x, y, src, _ = held_out.next_batch(MixState())
    assert src == "base" and torch.equal(x[:, 1:], y[:, :-1])


def test_explicit_eval_files_hold_nothing_out(tmp_path):
    train_files, eval_files = shakespeare_split()
    cfg = config(train_files=(str(train_files[0]),), eval_files=(str(eval_files[0]),))
    mix = build_mix(cfg, "train")
    assert mix.eval_note is None
    assert len(mix.base.tokens) == len(text_mod.tokenize_files(train_files[:1], get_tokenizer("gpt2")))


def test_jsonl_records_and_lines_are_the_documents_of_other_text_files(tmp_path):
    lines = [f"Line {i}: {w} " * 3 for i, w in enumerate(["alpha", "beta", "gamma", "delta"] * 50)]
    one_per_line = tmp_path / "lines.txt"  # no blank line: each line is a document
    one_per_line.write_text("\n".join(lines) + "\n")
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"text": f"Record {i}. " * 5}) + "\n" for i in range(200)))
    cases = (  # (file, unit, its documents, the documents in a decoded token stream)
        (one_per_line, "lines", lines, lambda docs: docs[0].splitlines()),  # a .txt's kept lines: one stream
        (records, "records", [f"Record {i}. " * 5 for i in range(200)], lambda docs: docs),  # one each
    )
    for path, unit, expected, documents in cases:
        cfg = config(train_files=(str(path),), seq_len=16)
        train, held_out = build_mix(cfg, "train"), build_mix(cfg, "eval")
        assert re.search(rf"held out \d+ of 200 {unit} of ", held_out.eval_note), held_out.eval_note
        a, b = (documents(decoded_documents(m.base.tokens)) for m in (train, held_out))
        assert not set(a) & set(b) and sorted(a + b) == sorted(expected) and 0 < len(b) < 30


def test_a_held_out_side_is_never_empty_and_one_document_is_refused(tmp_path):
    few = tmp_path / "few.txt"  # 3 paragraphs: 5 % of them rounds to none, yet eval gets one
    few.write_text("First paragraph, long enough.\n\nSecond paragraph here.\n\nThird and last one.\n")
    cfg = config(train_files=(str(few),), seq_len=4)
    train, held_out = build_mix(cfg, "train"), build_mix(cfg, "eval")
    assert "held out 1 of 3 paragraphs" in held_out.eval_note
    assert len(decoded_documents(held_out.base.tokens)) == len(decoded_documents(train.base.tokens)) == 1
    one = tmp_path / "one.txt"
    one.write_text("A single line of text, and nothing else in the file at all.\n")
    with pytest.raises(DataError) as e:
        build_mix(config(train_files=(str(one),), seq_len=4), "train")
    assert str(e.value) == (
        f"data.train_files: {one} holds 1 line: too few to hold out "
        "data.eval_fraction=0.05 of them for eval; pass --eval-data (data.eval_files)"
    )
    with pytest.raises(
        DataError,
        match=r"^data.eval_fraction=0.05 held out 1 of 3 paragraphs of .*few.txt: "
        r"\d+ tokens for eval, fewer than train.seq_len \+ 1 = 129; raise data.eval_fraction or pass",
    ):
        build_mix(config(train_files=(str(few),)), "eval")


def test_user_chats_without_eval_files_hold_out_conversations(tmp_path):
    convs = chitchat_conversations()[:300]  # real chats, as the user's own file
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    cfg = config(mode="finetuning_only", chat_files=(str(chats),))
    train, held_out = build_mix(cfg, "train"), build_mix(cfg, "eval")
    rows = [{tuple(r) for r in m.chat.tokens.tolist()} for m in (train, held_out)]
    assert not rows[0] & rows[1] and len(train.chat.tokens) + len(held_out.chat.tokens) == 300
    assert re.fullmatch(
        rf"held out {len(held_out.chat.tokens)} of 300 conversations of {chats} for eval, chosen by content "
        r"hash \(data.eval_fraction=0.05\); set data.chat_eval_files \(--eval-data with --mode "
        r"finetuning_only\) to choose them",
        held_out.eval_note,
    )
    assert 5 < len(held_out.chat.tokens) < 30
    assert np.array_equal(build_mix(cfg, "eval").chat.tokens, held_out.chat.tokens)
