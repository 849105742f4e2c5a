"""MoD at inference: how well the causal predictor stands in for training's capacity top-k.

On a trained run's held-out batches (the run's own eval split, ``train.eval_batches`` x
``train.micro_batch_size`` x ``train.seq_len`` tokens unless --batches is given), per MoD layer:
- agreement: the share of tokens where the predictor's decision (logit > 0) equals top-k membership,
  measured inside the top-k-routed forward (``aux["mod", i, "predictor_acc"]``), beside the base rate
  of always predicting "skip" (1 - capacity);
- the share of tokens the predictor routes into the block in predictor-routed mode;
and the held-out loss of the model under top-k routing (what training evaluates; it looks ahead) and
under predictor routing (what generation runs: ``apply(..., mod_routing="predictor")``), beside the
loss with every MoD block skipped (the predictor zeroed: what the routed blocks add at all).

    python -m benchmarks.mod_predictor runs/debug [--batches 16] [--no-save]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._harness import append_csv, commit, device_name, fail, stamp, versions

RESULTS = Path(__file__).resolve().parent / "results" / "mod_predictor.csv"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run folder or checkpoint folder of a MoD model")
    ap.add_argument("--batches", type=int, default=None, help="held-out batches (default: the run's)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)

    from lumina.data.tokenizer import get_tokenizer
    from lumina.driver.evaluation import eval_sets
    from lumina.generate import GenerateError, load_model
    from lumina.model import apply

    try:
        model = load_model(args.run)
    except (GenerateError, ValueError) as e:
        fail(str(e))
    cfg, run_cfg = model.cfg, model.run_cfg
    if not any(cfg.mod_layers()):
        fail(f"{model.path}: the model has no MoD layers")
    if args.batches:
        run_cfg = dataclasses.replace(
            run_cfg, train=dataclasses.replace(run_cfg.train, eval_batches=args.batches)
        )
    pad = get_tokenizer(run_cfg.data.tokenizer).pad_id
    sets = eval_sets(run_cfg)
    agree, pred_share = {}, {}
    loss = {"topk": 0.0, "predictor": 0.0, "skip": 0.0}
    skip_params = model.params.clone()
    for i, is_mod in enumerate(cfg.mod_layers()):
        if is_mod:  # predictor logit 0 everywhere: no token is routed into the block
            skip_params["layers", str(i), "mod", "predictor", "w2"].zero_()
    n_tok = 0
    with torch.no_grad():
        for batches in sets.values():
            for b in batches:
                x, y = b["inputs"], b["targets"]
                keep = y != pad
                n = int(keep.sum())
                for mode in ("topk", "predictor", "skip"):
                    params = skip_params if mode == "skip" else model.params
                    routing = "topk" if mode == "topk" else "predictor"
                    logits, aux = apply(params, x, cfg, train=False, mod_routing=routing)
                    ce = torch.nn.functional.cross_entropy(logits[keep].float(), y[keep], reduction="sum")
                    loss[mode] += float(ce)
                    for i, st in aux["mod"].items():
                        if mode == "topk":
                            agree[i] = agree.get(i, 0.0) + float(st["predictor_acc"]) * n
                        elif mode == "predictor":
                            pred_share[i] = pred_share.get(i, 0.0) + float(st["selected_ratio"]) * n
                n_tok += n
    capacity = cfg.mod.capacity
    print(f"{model.path} (step {model.step}): {n_tok} held-out tokens, MoD capacity {capacity}")
    rows = []
    for i in sorted(agree, key=int):
        a, s = agree[i] / n_tok, pred_share[i] / n_tok
        print(
            f"  layer {i}: predictor agrees with top-k on {a:.1%} of tokens (always-skip: "
            f"{1 - capacity:.1%}); routes {s:.1%} into the block (top-k: {capacity:.1%})"
        )
        rows.append({"layer": i, "agreement": round(a, 4), "predictor_routed": round(s, 4)})
    lt, lp, ls = loss["topk"] / n_tok, loss["predictor"] / n_tok, loss["skip"] / n_tok
    print(
        f"  held-out loss: top-k routing {lt:.5f} (ppl {math.exp(lt):.1f}), "
        f"predictor routing {lp:.5f} (ppl {math.exp(lp):.1f}), every MoD block skipped {ls:.5f}"
    )
    if not args.no_save:
        common = {
            "date": stamp(),
            "commit": commit(),
            "device": device_name(torch.device("cpu")),
            "torch": versions()["torch"],
            "run": str(model.path),
            "step": model.step,
            "tokens": n_tok,
            "capacity": capacity,
            "loss_topk": round(lt, 5),
            "loss_predictor": round(lp, 5),
            "loss_skip_mod": round(ls, 5),
        }
        append_csv(RESULTS, [{**common, **r} for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
