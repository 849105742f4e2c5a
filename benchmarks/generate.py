"""Generation speed against transformers' ``generate`` on the same weights, in one run.

Per model (a Llama-shaped dense model and a Mixtral-shaped MoE model, random weights exported with
``lumina.hf.to_hf``): one greedy generation of --new tokens after a --prompt-token prompt, batch 1,
by Lumina (``lumina.generate.Generator``, eager or --compile) and by transformers (``generate``,
``do_sample=False``, its default cache), each after one warm-up call. Reported: time to first token
(the prefill and first draw; transformers': a ``max_new_tokens=1`` call), decode tokens/s (the other
tokens), the ratio Lumina / transformers, and whether both produced the same tokens.

    python -m benchmarks.generate [--new 64] [--prompt-tokens 32] [--compile] [--quick] [--no-save]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._harness import append_csv, commit, device_name, parse_device, stamp, versions

RESULTS = Path(__file__).resolve().parent / "results" / "generate.csv"


def models(quick: bool):
    from lumina.config import ModelConfig, MoEConfig

    d, layers = (64, 2) if quick else (256, 4)
    common = dict(
        vocab_size=50304, d_model=d, n_layers=layers, n_heads=8, n_kv_heads=4, ffn_multiple_of=32,
        max_seq_len=512, init_std=0.1,
    )  # fmt: skip
    yield "llama", ModelConfig(**common)
    yield "mixtral", ModelConfig(**common, moe=MoEConfig(num_experts=4, top_k=2, d_expert=2 * d))


def hf_model(cfg, params):
    import transformers

    from lumina.hf import to_hf

    sd, config = to_hf(cfg, params)
    cls = transformers.MixtralForCausalLM if cfg.moe.enabled else transformers.LlamaForCausalLM
    conf_cls = transformers.MixtralConfig if cfg.moe.enabled else transformers.LlamaConfig
    extra = (
        {"num_local_experts": cfg.moe.num_experts, "num_experts_per_tok": cfg.moe.top_k}
        if cfg.moe.enabled
        else {}
    )
    model = cls(conf_cls(**{**config, **extra}))
    model.load_state_dict(sd, strict=not cfg.tie_embeddings)
    return model.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt-tokens", dest="prompt_tokens", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="compile Lumina's decode step")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny models, 8 tokens, nothing saved")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    device = parse_device(args.device)
    if args.quick:
        args.new, args.prompt_tokens, args.no_save = 8, 8, True

    from lumina.generate import Generator, Sampling
    from lumina.model import init

    rows = []
    g = torch.Generator().manual_seed(0)
    for name, cfg in models(args.quick):
        params = init(cfg, seed=0, device=device)
        prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_tokens), generator=g)
        gen = Generator(params=params, cfg=cfg, compile=args.compile)
        greedy, prompt_ids = Sampling(greedy=True), prompt.tolist()

        def run(gen=gen, ids=prompt_ids, greedy=greedy):
            return gen.generate_ids(ids, max_new_tokens=args.new, sampling=greedy, eos_ids=[])

        run()  # warm-up (and compilation)
        ours = run()
        ours_ttft, ours_rate = ours.first_token_s, ours.decode_steps / ours.decode_s

        hf = hf_model(cfg, params).to(device)
        ids = prompt.to(device)
        kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, **kw)  # warm-up
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, **kw)
            hf_ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, **kw)
            hf_total = time.perf_counter() - t0
        hf_tokens = out[0, args.prompt_tokens :].tolist()
        hf_rate = (args.new - 1) / max(hf_total - hf_ttft, 1e-9)
        same = hf_tokens == ours.tokens[0]
        print(
            f"{name:8s} first token: lumina {ours_ttft * 1e3:7.1f} ms, "
            f"transformers {hf_ttft * 1e3:7.1f} ms | "
            f"decode: lumina {ours_rate:7.1f} tok/s, transformers {hf_rate:7.1f} tok/s "
            f"({ours_rate / hf_rate:.2f}x) | same tokens: {same}"
        )
        rows.append(
            {
                "date": stamp(),
                "commit": commit(),
                "device": device_name(device),
                "torch": versions()["torch"],
                "transformers": __import__("transformers").__version__,
                "model": name,
                "d_model": cfg.d_model,
                "n_layers": cfg.n_layers,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new,
                "compile": args.compile,
                "lumina_ttft_ms": round(ours_ttft * 1e3, 2),
                "hf_ttft_ms": round(hf_ttft * 1e3, 2),
                "lumina_decode_tok_s": round(ours_rate, 2),
                "hf_decode_tok_s": round(hf_rate, 2),
                "decode_ratio": round(ours_rate / hf_rate, 3),
                "same_tokens": same,
            }
        )
    if not args.no_save:
        append_csv(RESULTS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
