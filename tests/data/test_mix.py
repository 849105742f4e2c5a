import msgpack
import numpy as np
import pytest
import torch

from lumina.configure import load_config
from lumina.data import get_tokenizer
from lumina.data.chat import ChatRows, chitchat_split
from lumina.data.mix import DataMix, MixState, build_mix
from lumina.data.text import DataError, PackedText

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
