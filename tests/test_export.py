"""Export to and start from Hugging Face folders (lumina.export, lumina.hf, `--init-from`), with the
real transformers and tokenizers libraries and the packaged tiktoken rank files:
- a tiny Llama written by transformers' save_pretrained -> `--init-from` fine-tune on the packaged
  chitchat data -> export -> transformers loads it and its logits equal Lumina's; generate reads it;
- a Mixtral export (sharded) equals Lumina's MoE logits and uses save_pretrained's key layout;
- tokenizer.json gives tiktoken's ids, specials included, on random strings;
- a LoRA run on an nf4 base exports with --merge-lora and equals the adapted model;
- MoD, LoRA without --merge-lora, missing / foreign / pickle folders: one line, exit 2, nothing written."""

import json
import random

import pytest
import torch
from tensordict import TensorDict

transformers = pytest.importorskip("transformers")  # a dev dependency; `make test` installs it
tokenizers = pytest.importorskip("tokenizers")

from lumina import checkpoint, hf, quant, tree, weights  # noqa: E402
from lumina.config import (  # noqa: E402
    ConfigError,
    DataConfig,
    LoRAConfig,
    MoDConfig,
    ModelConfig,
    MoEConfig,
    RunConfig,
    TrainConfig,
    to_dict,
)
from lumina.data.chat import chitchat_conversations, render  # noqa: E402
from lumina.data.tokenizer import get_tokenizer  # noqa: E402
from lumina.export import ExportError, export, verify  # noqa: E402
from lumina.generate import inference_config, load_model  # noqa: E402
from lumina.model import apply, init  # noqa: E402
from lumina.run import main  # noqa: E402

V = 50304  # gpt2 + ChatML specials + pad, rounded up to 128: what the packaged data needs


def randomised(params: TensorDict, seed: int = 0) -> TensorDict:
    """Init weights are tiny (logits ~0.1); larger random ones make any swapped tensor show."""
    g = torch.Generator().manual_seed(seed)
    return params.apply(
        lambda t: (
            torch.randn(t.shape, generator=g) * 0.2 if t.dim() > 1 else 0.5 + torch.rand(t.shape, generator=g)
        )
    )


def save_run(root, model: ModelConfig, params: TensorDict, **train) -> None:
    cfg = RunConfig(model=model, train=TrainConfig(seq_len=32, **train), data=DataConfig(tokenizer="gpt2"))
    state = TensorDict({"params": params}, batch_size=[])
    checkpoint.save_checkpoint(root, state, step=7, config=to_dict(cfg), data={})


def tiny(**kw) -> ModelConfig:
    return ModelConfig(
        vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64, **kw
    )


def tokens(B=2, T=29, seed=1):
    return torch.randint(0, 50259, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(folder, x):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(x).logits, model


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lumina: error: "), err
    return err[0]


def test_hf_llama_init_from_finetune_export_parity(tmp_path, capsys):
    """The fine-tuning workflow end to end, through the CLI."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=96, rope_theta=500.0, rms_norm_eps=1e-5,
    )  # fmt: skip
    source = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    source.save_pretrained(tmp_path / "hf")  # model.safetensors + config.json, no tokenizer
    before = {k: v.clone() for k, v in source.state_dict().items()}
    # 300 of the packaged chitchat conversations as a chat file (tokenizing all 7,168 twice, for the
    # train and held-out split, would be most of this test's time)
    chats = chitchat_conversations()[:300]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))

    args = ["--init-from", str(tmp_path / "hf"), "--mode", "finetuning_only", "--steps", "3",
            "--data", str(tmp_path / "chat.jsonl"), "--run-dir", str(tmp_path), "--name", "ft",
            "--device", "cpu", "--train.batch_size=2", "--train.eval_batches=0", "--train.log_every=1",
            "--train.warmup_steps=0", "--train.compile=false", "--train.lr=1e-2"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"weights from {tmp_path / 'hf'}" in out and "step      3/3" in out
    saved = checkpoint.read_meta(checkpoint.latest(tmp_path / "ft"))
    m = saved["config"]["model"]  # the model config came from config.json, not the preset
    assert (m["d_model"], m["n_layers"], m["rope_theta"], m["mod"]["enabled"]) == (32, 2, 500.0, False)
    assert saved["config"]["train"]["seq_len"] == 96  # the preset's 128, capped at max_position_embeddings
    records = [json.loads(r) for r in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert len(steps) == 3 and all(
        r["grad_norm"] > 0 and r["tokens"] > 0 for r in steps
    )  # chat tokens trained

    assert main(["export", str(tmp_path / "ft"), str(tmp_path / "out"), "--verify"]) == 0
    assert "verified with transformers" in capsys.readouterr().out
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert written == {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                       "tokenizer_config.json", "lumina.json"}  # fmt: skip
    ours = load_model(tmp_path / "ft")
    x = tokens()
    theirs, model = hf_logits(tmp_path / "out", x)
    assert type(model).__name__ == "LlamaForCausalLM"
    mine, _ = apply(ours.params, x, ours.cfg, train=False)
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    assert theirs.abs().max() > 1  # logits of a size where a wrong tensor shows
    changed = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]  # it was fine-tuned
    assert not torch.allclose(changed, before["model.layers.0.self_attn.q_proj.weight"])

    # generate (and anything that loads a model) reads the export; the tokenizer is the recorded one
    back = load_model(tmp_path / "out")
    assert back.run_cfg.data.tokenizer == "gpt2" and back.step == 3
    torch.testing.assert_close(apply(back.params, x, back.cfg, train=False)[0], mine, atol=1e-5, rtol=0)
    # the tokenizer's chat template gives the ids Lumina trained on
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for conv in chats[:50]:
        text = hf_tok.apply_chat_template(conv, tokenize=False)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == render(conv, back.get_tokenizer())[0]
    assert (
        main(["generate", str(tmp_path / "out"), "--prompt", "Hello", "--max-new-tokens", "3", "--greedy"])
        == 0
    )
    assert capsys.readouterr().out.startswith("Hello")


def test_mixtral_export_sharded_parity(tmp_path):
    """MoE -> Mixtral, sharded above --max-shard-size, in the keys save_pretrained writes; a router
    temperature is folded into the router; logits equal Lumina's dropless inference."""
    model = tiny(
        moe=MoEConfig(num_experts=4, top_k=2, d_expert=24, capacity_factor=1.25, router_temperature=0.7)
    )
    params = randomised(init(model, seed=0))
    save_run(tmp_path / "run", model, params)
    export(tmp_path / "run", tmp_path / "out", max_shard_size="500KB", verify_logits=True, log=lambda s: None)

    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert (
        "model.safetensors" not in files
        and len(shards) >= 3
        and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    )
    index = json.loads((tmp_path / "out" / hf.INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    sd, _ = hf.read_dir(tmp_path / "out")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    # the key layout save_pretrained writes for the same architecture in the installed transformers
    config = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path / "ref")
    assert set(sd) == set(hf.read_dir(tmp_path / "ref")[0])

    x = tokens()
    theirs, _ = hf_logits(tmp_path / "out", x)
    mine, _ = apply(params, x, inference_config(model), train=False)
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    assert theirs.abs().max() > 1
    # --verify notices a model that is not the one written (here: one expert's weights changed)
    other = params.clone()
    other["layers", "1", "moe", "w_up"][2] += 0.05
    with pytest.raises(ExportError, match="logits differ"):
        verify(tmp_path / "out", other, model, get_tokenizer("gpt2"))


def test_shared_experts_export_as_qwen2_moe(tmp_path):
    """Shared experts (2 x d_expert wide) on every other layer -> Qwen2-MoE with a zero shared-expert
    gate and w_down doubled: logits equal Lumina's, the keys are save_pretrained's, the folder reads
    back to the same params; a trained (non-zero) gate is refused on import."""
    moe = MoEConfig(num_experts=4, top_k=2, d_expert=24, num_shared_experts=2, pattern="every_n", every_n=2)
    model = ModelConfig(**{**tiny().__dict__, "n_layers": 4, "moe": moe})
    params = randomised(init(model, seed=5))
    save_run(tmp_path / "run", model, params)
    export(tmp_path / "run", tmp_path / "out", verify_logits=True, log=lambda s: None)

    x = tokens()
    theirs, hf_model = hf_logits(tmp_path / "out", x)
    assert type(hf_model).__name__ == "Qwen2MoeForCausalLM" and hf_model.config.mlp_only_layers == [0, 2]
    mine, _ = apply(params, x, inference_config(model), train=False)
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    sd, _ = hf.read_dir(tmp_path / "out")
    type(hf_model)(hf_model.config).save_pretrained(tmp_path / "ref")
    assert set(sd) == set(hf.read_dir(tmp_path / "ref")[0])

    cfg2, params2 = hf.load_dir(tmp_path / "out")
    assert (cfg2.moe.num_shared_experts, cfg2.moe.pattern, cfg2.moe.every_n) == (2, "every_n", 2)
    for k, v in tree.flatten(params).items():
        assert torch.equal(tree.flatten(params2)[k], v), k  # w_down doubled and halved exactly
    with torch.no_grad():
        hf_model.model.layers[1].mlp.shared_expert_gate.weight.fill_(0.1)
    with pytest.raises(ConfigError, match="gated shared expert has no Lumina equivalent"):
        hf.from_hf(hf_model)


def test_bf16_export(tmp_path):
    params = randomised(init(tiny(), seed=3))
    save_run(tmp_path / "run", tiny(), params)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    sd, config = hf.read_dir(tmp_path / "out")
    assert config["dtype"] == "bfloat16" and {t.dtype for t in sd.values()} == {torch.bfloat16}
    x = tokens()
    theirs, _ = hf_logits(tmp_path / "out", x)  # upcast to fp32 on load
    rounded = params.apply(lambda t: t.to(torch.bfloat16).float())
    torch.testing.assert_close(apply(rounded, x, tiny(), train=False)[0], theirs, atol=1e-4, rtol=0)


def test_merge_lora_export_equals_the_adapted_model(tmp_path, capsys):
    """QLoRA (nf4 base + rank-4 adapters with non-zero B): without --merge-lora one line; with it,
    transformers' logits equal the adapted model's."""
    pytest.importorskip("bitsandbytes")
    model = tiny(quant="nf4")
    train = TrainConfig(seq_len=32, lora=LoRAConfig(rank=4, alpha=8.0))
    cfg = RunConfig(model=model, train=train, data=DataConfig(tokenizer="gpt2"))
    adapted = quant.prepare(randomised(init(model, seed=1)), cfg)
    g = torch.Generator().manual_seed(2)
    flat = {k: torch.randn(v.shape, generator=g) * 0.1 if k.endswith("lora_b") else v
            for k, v in tree.flatten(adapted).items()}  # fmt: skip
    adapted = tree.unflatten(flat)
    save_run(tmp_path / "run", model, adapted, lora=LoRAConfig(rank=4, alpha=8.0))

    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    line = one_line_error(capsys)
    assert "--merge-lora" in line and "model.quant=nf4" in line and not (tmp_path / "out").exists()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--merge-lora"]) == 0
    x = tokens()
    theirs, _ = hf_logits(tmp_path / "out", x)
    mine, _ = apply(adapted, x, model, train=False)
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    plain, _ = apply(
        quant.merge(tree.unflatten({k: v for k, v in flat.items() if "lora" not in k})), x, model
    )
    assert (plain - theirs).abs().max() > 1e-2  # the adapters are in the export


@pytest.mark.slow
def test_qlora_from_an_export_then_merged_export(tmp_path, capsys):
    """Issue 16's recipe from the CLI: an exported folder -> --init-from with an nf4 base and rank-4
    adapters (the tokenizer from lumina.json) -> export --merge-lora -> transformers' logits equal
    the adapted model's."""
    pytest.importorskip("bitsandbytes")
    model = tiny()
    save_run(tmp_path / "run", model, randomised(init(model, seed=4)))
    export(tmp_path / "run", tmp_path / "base", log=lambda s: None)
    args = ["--init-from", str(tmp_path / "base"), "--model.quant=nf4", "--train.lora.rank=4",
            "--steps", "2", "--run-dir", str(tmp_path), "--name", "qlora", "--device", "cpu",
            "--train.batch_size=2", "--train.eval_batches=0", "--train.warmup_steps=0",
            "--train.compile=false", "--train.lr=3e-2"]  # fmt: skip
    assert main(args) == 0
    assert "nf4-quantized base" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "qlora"), str(tmp_path / "out"), "--merge-lora", "--verify"]) == 0
    adapted = load_model(tmp_path / "qlora")
    assert any(v.abs().max() > 0 for k, v in tree.flatten(adapted.params).items() if k.endswith("lora_b"))
    x = tokens()
    theirs, _ = hf_logits(tmp_path / "out", x)
    torch.testing.assert_close(
        apply(adapted.params, x, adapted.cfg, train=False)[0], theirs, atol=1e-4, rtol=0
    )
    assert json.loads((tmp_path / "out" / "lumina.json").read_text())["merged_lora"] is True


_ALPHABET = [*"abcXYZ \n\t\r0123456789.,'!?-_/$éü中文日本🙂"] + [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "'s", "'LL", "2024", "   ", "\r\n", " 12345",
]  # fmt: skip


@pytest.mark.parametrize("name", ["gpt2", "cl100k_base"])
def test_tokenizer_json_ids_equal_tiktoken(name):
    """tokenizer.json (loaded by the tokenizers library) gives tiktoken's ids on 300 random strings
    with digits, whitespace runs, non-ASCII and the special tokens at their own ids; it decodes back."""
    tok = get_tokenizer(name)
    fast = tokenizers.Tokenizer.from_str(json.dumps(hf.tokenizer_json(tok.encoding)))
    rng = random.Random(0)
    for _ in range(300):
        s = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 30)))
        ids = fast.encode(s, add_special_tokens=False).ids
        assert ids == tok.encoding.encode(s, allowed_special="all"), s
        assert fast.decode(ids, skip_special_tokens=False) == s
    assert fast.encode("<|endoftext|>").ids == [tok.eot_id]  # cl100k: 100257, not 100256
    assert fast.encode("2024").ids == tok.encode("2024")  # the {1,3} digit split


@pytest.mark.slow
def test_tokenizer_json_ids_equal_tiktoken_o200k():
    test_tokenizer_json_ids_equal_tiktoken("o200k_base")


def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys):
    mod = tiny(mod=MoDConfig(enabled=True, capacity=0.5, every_n=2))
    save_run(tmp_path / "mod", mod, init(mod, seed=0))
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "mod"), str(out)]) == 2
    assert "Mixture-of-Depths has no transformers equivalent" in one_line_error(capsys)

    pickled = tmp_path / "pickled"  # a Hugging Face folder with weights only as a pickle
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hi")
    llama = {"model_type": "llama", "vocab_size": 64, "hidden_size": 8, "intermediate_size": 16,
             "num_hidden_layers": 1, "num_attention_heads": 2}  # fmt: skip
    broken = tmp_path / "broken"  # a valid config.json, a truncated safetensors file
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(llama))
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00")
    gpt2 = tmp_path / "gpt2"  # another architecture
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({**llama, "model_type": "gpt2"}))
    (gpt2 / "model.safetensors").write_bytes(b"")
    for argv, needle in [
        (["export", str(tmp_path / "nowhere"), str(out)], "does not exist"),
        (["export", str(foreign), str(out)], "is neither a checkpoint folder"),
        (["export", str(tmp_path / "mod"), str(foreign)], "already exists"),
        (["export", str(tmp_path / "mod"), str(out), "--max-shard-size", "lots"], "--max-shard-size"),
        (
            ["--init-from", str(pickled), "--run-dir", str(tmp_path), "--steps", "1"],
            "pytorch_model.bin: a pickle",
        ),
        (
            ["--init-from", str(foreign), "--run-dir", str(tmp_path), "--steps", "1"],
            "is neither a checkpoint",
        ),
        (["generate", str(pickled), "--prompt", "hi"], "pytorch_model.bin: a pickle"),
        (["generate", str(broken), "--prompt", "hi"], "model.safetensors: not a readable safetensors file"),
        (["generate", str(gpt2), "--prompt", "hi"], "config.json: model_type 'gpt2' is not supported"),
    ]:
        assert main(argv) == 2, argv
        assert needle in one_line_error(capsys), argv
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "foreign", "gpt2", "mod", "pickled"]


def test_foreign_vocab_that_does_not_fit_is_one_line(tmp_path, capsys):
    """A Hugging Face model whose vocabulary is not the tokenizer's: one line naming data.tokenizer."""
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    capsys.readouterr()  # (save_pretrained's progress bar)
    assert (
        main(["--init-from", str(tmp_path / "hf"), "--run-dir", str(tmp_path / "runs"), "--steps", "1"]) == 2
    )
    assert "tokenizer gpt2 needs 50304 embedding rows but model.vocab_size=1000" in one_line_error(capsys)
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "hi"]) == 2
    assert "--tokenizer" in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_a_foreign_tokenizer_json_must_match_data_tokenizer(tmp_path, capsys):
    """A Hugging Face folder without lumina.json but with a tokenizer.json: --init-from / generate
    refuse (one line) when it encodes text differently from the tiktoken encoding in use."""
    import tiktoken

    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    bytes_only = tiktoken.Encoding(
        "bytes", pat_str=get_tokenizer("gpt2").encoding._pat_str,
        mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={},
    )  # fmt: skip
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(hf.tokenizer_json(bytes_only)))
    capsys.readouterr()
    assert (
        main(["--init-from", str(tmp_path / "hf"), "--run-dir", str(tmp_path / "runs"), "--steps", "1"]) == 2
    )
    assert "tokenizer.json: encodes text differently from data.tokenizer=gpt2" in one_line_error(capsys)
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "hi"]) == 2
    assert "encodes text differently from --tokenizer=gpt2" in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()
    # the same folder with gpt2's own tokenizer.json passes the check
    (tmp_path / "hf" / "tokenizer.json").write_text(
        json.dumps(hf.tokenizer_json(get_tokenizer("gpt2").encoding))
    )
    weights.check_tokenizer(tmp_path / "hf", get_tokenizer("gpt2"))


def test_an_interrupted_export_leaves_nothing(tmp_path):
    save_run(tmp_path / "run", tiny(), init(tiny(), seed=0))

    def interrupt(line):
        if "tokenizer.json" in line:  # after the weights were written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export(tmp_path / "run", tmp_path / "out", log=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
