"""Generation (lumina.generate, `python -m lumina.run generate`): cached greedy decoding equals a
no-cache argmax loop token for token (dense, MoE, MoD + MoE hybrid), MoD predictor routing over the
cache equals a no-cache predictor-routed forward, left-padded batches equal one-by-one generation,
sampling is a function of the seed, the logits processors match Hugging Face's, and the CLI refuses
bad input with one line (exit 2) and prints text for a tiny checkpoint."""

import subprocess
import sys

import pytest
import torch
from tensordict import TensorDict
from test_cli import one_line_error

from lumina.checkpoint import save_checkpoint
from lumina.config import DataConfig, MoDConfig, ModelConfig, MoEConfig, RunConfig, TrainConfig, to_dict
from lumina.generate import Generator, Sampling, load_model, process_logits
from lumina.model import apply, init, init_cache
from lumina.run import main

MODELS = {
    "dense": {},
    "moe": {"moe": MoEConfig(num_experts=4, top_k=2, d_expert=16, capacity_factor=1.0)},
    "mod_moe": {
        "moe": MoEConfig(num_experts=4, top_k=2, d_expert=16),
        "mod": MoDConfig(enabled=True, capacity=0.25, every_n=2),
    },
}


def model_cfg(kind: str, vocab: int = 97) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        d_model=32,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        ffn_multiple_of=16,
        max_seq_len=128,
        **MODELS[kind],
    )


def save_tiny(root, kind: str, vocab: int = 97, seed: int = 1):
    cfg = RunConfig(
        model=model_cfg(kind, vocab), train=TrainConfig(seq_len=32), data=DataConfig(tokenizer="gpt2")
    )
    params = init(cfg.model, seed=seed)
    state = TensorDict({"params": params, "step": torch.tensor(0)}, batch_size=[])
    save_checkpoint(root, state, step=0, config=to_dict(cfg), data={})
    return params, cfg.model


def argmax_loop(params, cfg, prompt: list[int], n: int) -> list[int]:
    """The reference: the whole sequence through apply (no cache) for every new token."""
    seq = list(prompt)
    for _ in range(n):
        logits, _ = apply(params, torch.tensor([seq]), cfg, train=False, mod_routing="predictor")
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


PROMPTS = [[5, 7, 9, 11, 13], [3, 4], [8, 1, 8, 2, 8, 3, 8, 4, 8]]


@pytest.mark.parametrize("kind", list(MODELS))
def test_greedy_cached_batch_equals_no_cache_argmax_loop(tmp_path, kind):
    params, cfg = save_tiny(tmp_path, kind)
    model = load_model(tmp_path)  # a run folder: its newest checkpoint
    assert model.step == 0 and model.cfg.moe.capacity_factor is None  # MoE runs dropless at inference
    gen = Generator(params=model.params, cfg=model.cfg)
    out = gen.generate_ids(PROMPTS, max_new_tokens=12, sampling=Sampling(greedy=True))
    assert out.finish == ["length"] * 3
    for b, prompt in enumerate(PROMPTS):
        assert out.tokens[b] == argmax_loop(params, model.cfg, prompt, 12), (kind, b)
        alone = gen.generate_ids([prompt], max_new_tokens=12, sampling=Sampling(greedy=True))
        assert alone.tokens[0] == out.tokens[b]  # left padding changes nothing


def test_mod_prefill_and_decode_logits_equal_a_predictor_routed_forward():
    cfg = model_cfg("mod_moe")
    params = init(cfg, seed=1)
    x = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    full, aux = apply(params, x, cfg, train=False, mod_routing="predictor")
    cache = init_cache(cfg, 2, 32)
    kw = dict(cache=cache, train=False, mod_routing="predictor")
    outs = [apply(params, x[:, :13], cfg, positions=torch.arange(13), **kw)[0]]
    for t in range(13, 20):
        outs.append(apply(params, x[:, t : t + 1], cfg, positions=torch.tensor([t]), **kw)[0])
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=2e-5, rtol=1e-5)
    # The MoD layers' caches hold only routed tokens; dense layers every token.
    routed = cache["layers", "1", "valid"][:, :20]
    assert 0 < routed.sum() < routed.numel()
    assert cache["layers", "0", "valid"][:, :20].all() and not cache["layers", "0", "valid"][:, 20:].any()
    # Predictor routing differs from top-k routing, so the check above is not vacuous.
    topk, _ = apply(params, x, cfg, train=False)
    assert (topk - full).abs().max() > 1e-3
    # and top-k routing still refuses a cache (it would look ahead)
    with pytest.raises(ValueError, match="mod_routing='predictor'"):
        apply(params, x, cfg, cache=init_cache(cfg, 2, 32), positions=torch.arange(20), train=False)


def test_sampling_is_a_function_of_the_seed_and_top_k_1_is_greedy():
    cfg = model_cfg("mod_moe")
    gen = Generator(params=init(cfg, seed=2), cfg=cfg)
    hot = Sampling(temperature=1.5, top_p=0.95, repetition_penalty=1.2)

    def run(sampling, seed=0):
        return gen.generate_ids(PROMPTS, max_new_tokens=16, sampling=sampling, seed=seed).tokens

    a, b, c = run(hot, seed=7), run(hot, seed=7), run(hot, seed=8)
    assert a == b and a != c
    assert run(Sampling(temperature=1.0, top_k=1)) == run(Sampling(greedy=True))
    assert run(Sampling(temperature=0.0)) == run(Sampling(greedy=True))


def test_eos_stops_a_row_and_the_others_go_on():
    cfg = model_cfg("dense")
    gen = Generator(params=init(cfg, seed=1), cfg=cfg)
    free = gen.generate_ids(PROMPTS, max_new_tokens=10, sampling=Sampling(greedy=True))
    eos = free.tokens[0][3]
    out = gen.generate_ids(PROMPTS, max_new_tokens=10, sampling=Sampling(greedy=True), eos_ids=[eos])
    first = free.tokens[0].index(eos)
    assert out.tokens[0] == free.tokens[0][:first] and out.finish[0] == "eos"
    for b in (1, 2):  # rows without that token are untouched
        if eos not in free.tokens[b]:
            assert out.tokens[b] == free.tokens[b] and out.finish[b] == "length"


def test_logits_processors_match_hugging_face():
    tf = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    B, V = 3, 50
    logits = torch.randn(B, V, generator=g) * 3
    ids = torch.randint(0, V, (B, 7), generator=g)
    seen = torch.zeros(B, V, dtype=torch.bool).scatter(1, ids, True)
    for temp, k, p, pen in [(0.7, 10, 0.9, 1.3), (1.3, 0, 0.5, 1.0), (1.0, 3, 1.0, 0.8)]:
        procs = tf.LogitsProcessorList()
        if pen != 1.0:
            procs.append(tf.RepetitionPenaltyLogitsProcessor(pen))
        procs.append(tf.TemperatureLogitsWarper(temp))
        if k:
            procs.append(tf.TopKLogitsWarper(k))
        if p < 1:
            procs.append(tf.TopPLogitsWarper(p))
        want = procs(ids, logits.clone())
        s = Sampling(temperature=temp, top_k=k, top_p=p, repetition_penalty=pen)
        got = process_logits(logits, seen, s.tensors(V, "cpu"), s.mode)
        assert torch.equal(torch.isinf(got), torch.isinf(want)), (temp, k, p, pen)
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite])


@pytest.mark.slow  # 39 s to 330 s on 2 shared CPU cores: two compiled step variants
def test_compiled_decode_step_gives_the_eager_tokens():
    torch._dynamo.reset()
    cfg = model_cfg("mod_moe")
    params = init(cfg, seed=1)
    eager = Generator(params=params, cfg=cfg)
    compiled = Generator(params=params, cfg=cfg, compile=True)
    for s in (Sampling(greedy=True), Sampling(temperature=0.9, top_k=5)):
        want = eager.generate_ids(PROMPTS, max_new_tokens=6, sampling=s, seed=3).tokens
        assert compiled.generate_ids(PROMPTS, max_new_tokens=6, sampling=s, seed=3).tokens == want
    # a changed temperature / top-k is a tensor value: no recompilation
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled.generate_ids(PROMPTS, max_new_tokens=6, sampling=Sampling(temperature=0.5, top_k=9))


# ----------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    """A random-init run folder whose vocabulary covers the gpt2 tokenizer."""
    root = tmp_path_factory.mktemp("run")
    save_tiny(root, "mod_moe", vocab=50304)
    return root


def test_cli_prints_text_and_stops_at_a_stop_string(gpt2_run, capsys):
    argv = ["generate", str(gpt2_run), "--prompt", "ROMEO:", "--max-new-tokens", "8", "--greedy"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    text = cap.out.rstrip("\n")
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    assert "8 tokens (length)" in cap.err and "tokens/s" in cap.err
    # the same run stopped at a piece of that output: the text ends just before it
    continuation = text[len("ROMEO:") :]
    stop = continuation[len(continuation) // 2 :][:3]
    assert main([*argv, "--stop", stop]) == 0
    stopped = capsys.readouterr().out.rstrip("\n")
    assert stopped == "ROMEO:" + continuation[: continuation.find(stop)]


def test_cli_accepts_a_checkpoint_folder(gpt2_run, capsys):
    ckpt = next((gpt2_run / "checkpoints").iterdir())
    argv = ["generate", str(ckpt), "--prompt", "Hi", "--max-new-tokens", "3", "--temperature", "0.8"]
    assert main([*argv, "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.1", "--seed", "4"]) == 0
    assert capsys.readouterr().out.startswith("Hi")


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--prompt", "  "], "--prompt: empty prompt"),
        (["--prompt", "x", "--top-p", "2"], "--top-p"),
        (["--prompt", "x", "--top-p", "0"], "--top-p"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--prompt", "x", "--top-k", "abc"], "--top-k"),
        (["--prompt", "x", "--repetition-penalty", "nan"], "--repetition-penalty"),
        (["--prompt", "x", "--max-new-tokens", "100000"], "max_seq_len=128"),
    ],
)
def test_cli_bad_numbers_and_prompts_are_one_line(gpt2_run, capsys, extra, expect):
    assert expect in one_line_error(capsys, ["generate", str(gpt2_run), *extra])


def test_cli_bad_paths_are_one_line(tmp_path, capsys):
    missing = one_line_error(capsys, ["generate", str(tmp_path / "nope"), "--prompt", "x"])
    assert "no such file or directory" in missing
    empty = one_line_error(capsys, ["generate", str(tmp_path), "--prompt", "x"])
    assert "not a run folder" in empty
    (tmp_path / "checkpoints").mkdir()
    assert "no checkpoint" in one_line_error(capsys, ["generate", str(tmp_path), "--prompt", "x"])
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "meta.msgpack").write_bytes(b"\x80\x04 pickle")
    assert "meta.msgpack" in one_line_error(capsys, ["generate", str(tmp_path / "fake"), "--prompt", "x"])
    assert "--prompt" in one_line_error(capsys, ["generate", str(tmp_path)])


def test_cli_help_is_instant():
    code = (
        "import sys; from lumina.run import main; main(['generate', '--help']); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--repetition-penalty" in out and out.strip().endswith("False")
