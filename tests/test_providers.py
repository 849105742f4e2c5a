"""The model's MoE (dropless and with capacity), MoD and hybrid forward + backward under each op
provider agree with the reference.

``LUMINA_OPS`` is read once, when ``lumina.ops`` is imported, so each provider runs in its own
subprocess (this file, run as a script): ``reference``; ``auto`` (on CPU: the native ops when built,
else the reference); ``triton`` (every Triton kernel, through Triton's interpreter on CPU tensors; the
GPU code path). Each child records the loss and every parameter gradient (``torch.func``, the train
step's transform) in fp32 and bf16, and which kernels it called; the test compares them with the
reference child's. The triton child also compiles the hybrid's gradient with ``fullgraph=True`` and
checks it equals its eager gradient; a ``slow`` test compiles a whole train step through the Triton ops
(inductor) and checks it equals the eager step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

KINDS = ("moe", "moe_capacity", "mod", "hybrid")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Provider vs reference, same (fixed) inputs. fp32: summation order only (measured <= 5e-10 abs).
# bf16: the kernels keep fp32 accumulators where the reference rounds some intermediates to bf16, and
# Triton's interpreter truncates on fp32 -> bf16 (see test_triton_mod): a few bf16 ulps through two
# layers (measured <= 2e-3 abs, 3 % relative on gradients of order 1e-1).
TOL = {"fp32": dict(atol=1e-6, rtol=1e-5), "bf16": dict(atol=5e-3, rtol=5e-2)}


def _model_cfg(kind: str):
    from lumina.config import MoDConfig, ModelConfig, MoEConfig

    moe = {
        "moe": MoEConfig(num_experts=5, top_k=2, d_expert=16),
        "moe_capacity": MoEConfig(num_experts=5, top_k=2, d_expert=16, capacity_factor=0.8),
        "mod": MoEConfig(),
        "hybrid": MoEConfig(num_experts=3, top_k=2, d_expert=16),
        "hybrid_capacity": MoEConfig(num_experts=3, top_k=1, d_expert=16, capacity_factor=1.25),
    }[kind]
    mod = MoDConfig(enabled=kind.startswith(("mod", "hybrid")), capacity=0.4, every_n=2)
    return ModelConfig(vocab_size=53, d_model=16, n_layers=2, n_heads=2, ffn_multiple_of=16, moe=moe, mod=mod)


def _child(out_dir: Path) -> None:
    """Runs under the LUMINA_OPS of its environment: writes results.safetensors and meta.json."""
    from safetensors.torch import save_file

    from lumina import ops
    from lumina.model import apply, default_knobs, init

    calls: dict[str, int] = {}
    modules = {"native": ops.native, "triton": ops._triton_dispatch}
    if ops._triton_dispatch is not None:
        modules |= {
            "triton_combine": ops._triton_combine,
            "triton_mod": ops._triton_mod,
            "triton_gmm": ops._triton_gmm,
        }
    wrapped = {
        "native": ("moe_dispatch", "moe_combine", "grouped_mm"),
        "triton": ("moe_routing", "moe_dispatch"),
        "triton_combine": ("moe_combine",),
        "triton_mod": ("mod_topk", "mod_gather", "mod_scatter"),
        "triton_gmm": ("grouped_mm",),
    }
    for group, module in modules.items():
        for name in wrapped[group] if module is not None else ():
            fn, key = getattr(module, name), f"{group.split('_')[0]}.{name}"

            def counted(*a, fn=fn, key=key):
                calls[key] = calls.get(key, 0) + 1
                return fn(*a)

            setattr(module, name, counted)

    results = {}
    by_kind: dict[str, list[str]] = {}  # the kernels each model kind called
    x = torch.randint(0, 53, (2, 13), generator=torch.Generator().manual_seed(0))
    for kind in KINDS:
        start = dict(calls)
        cfg = _model_cfg(kind)
        for dname, dtype in DTYPES.items():
            params = init(cfg, seed=0, dtype=dtype)

            def loss(p, cfg=cfg):
                logits, aux = apply(p, x[:, :-1], cfg, default_knobs(cfg))
                ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
                return ce + aux["loss"].float()

            grads, value = torch.func.grad_and_value(loss)(params)
            results[f"{kind}.{dname}.loss"] = value
            for path, g in grads.flatten_keys(".").items():
                results[f"{kind}.{dname}.grad.{path}"] = g
            if kind == "hybrid" and dname == "fp32" and ops.provider() == "triton":
                compiled = torch.compile(torch.func.grad_and_value(loss), fullgraph=True, backend="aot_eager")
                c_grads, c_value = compiled(params)
                torch.testing.assert_close(c_value, value)
                for path, g in grads.flatten_keys(".").items():
                    torch.testing.assert_close(c_grads.flatten_keys(".")[path], g, msg=path)
        by_kind[kind] = sorted(k for k, n in calls.items() if n != start.get(k, 0))
    save_file({k: v.contiguous() for k, v in results.items()}, str(out_dir / "results.safetensors"))
    meta = {"provider": ops.provider(), "calls": calls, "by_kind": by_kind}
    (out_dir / "meta.json").write_text(json.dumps(meta))


def _child_train_step() -> None:
    """A hybrid (capacity MoE + MoD) train step compiled with inductor (fullgraph: a graph break
    raises) equals the eager step."""
    from tensordict import TensorDict

    from lumina.config import RunConfig, TrainConfig
    from lumina.optim import default_hp
    from lumina.step import init_train_state, make_train_step, train_step

    cfg = RunConfig(
        model=_model_cfg("hybrid_capacity"),
        train=TrainConfig(steps=10, batch_size=4, seq_len=12, lr=1e-2, warmup_steps=0, compile=True),
    )
    x = torch.randint(0, 53, (4, 13), generator=torch.Generator().manual_seed(0))
    batch = TensorDict({"inputs": x[:, :-1], "targets": x[:, 1:]}, batch_size=[])
    state, hp = init_train_state(cfg), default_hp(cfg.train)
    eager, m_eager = train_step(state, batch, hp, cfg=cfg, pad_id=10_000)
    compiled, m_compiled = make_train_step(cfg, 10_000)(state, batch, hp)
    torch.testing.assert_close(m_compiled["loss"], m_eager["loss"], atol=1e-5, rtol=1e-5)
    flat_c = compiled["params"].flatten_keys(".")
    for path, p in eager["params"].flatten_keys(".").items():
        torch.testing.assert_close(flat_c[path], p, atol=1e-5, rtol=1e-4, msg=path)


def _run(mode: str, out_dir: Path, what: str = "grads"):
    from safetensors.torch import load_file

    out_dir.mkdir()
    env = {**os.environ, "LUMINA_OPS": mode, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, str(out_dir), what], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"LUMINA_OPS={mode} child failed:\n{proc.stderr[-4000:]}"
    if what != "grads":
        return None, None
    meta = json.loads((out_dir / "meta.json").read_text())
    return load_file(str(out_dir / "results.safetensors")), meta


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    return _run("reference", tmp_path_factory.mktemp("providers") / "reference")


def _compare(got, expected, provider):
    assert got.keys() == expected.keys()
    for key, e in expected.items():
        tol = TOL[key.split(".")[1]]
        torch.testing.assert_close(
            got[key].float(), e.float(), **tol, msg=lambda m, k=key: f"{provider} {k}: {m}"
        )


def test_reference_child_calls_no_kernel(reference_run):
    _, meta = reference_run
    assert meta == {"provider": "reference", "calls": {}, "by_kind": {kind: [] for kind in KINDS}}


def test_auto_provider_matches_reference(reference_run, tmp_path):
    """On CPU: the native MoE dispatch/combine and dropless grouped matmul when built (the rest on
    the reference)."""
    import lumina_kernels

    results, meta = _run("auto", tmp_path / "auto")
    built = lumina_kernels.load_native() is not None
    assert meta["provider"] == ("native" if built else "reference")
    routing = {"native.moe_dispatch", "native.moe_combine"} if built else set()
    grouped = {"native.grouped_mm"} if built else set()
    assert set(meta["calls"]) == routing | grouped  # and no Triton kernel on CPU tensors
    for kind in KINDS:  # every kind: dropless and capacity MoE, and MoD (a K = 1 dispatch/combine)
        expected = routing | (grouped if kind in ("moe", "hybrid") else set())  # dropless experts
        assert set(meta["by_kind"][kind]) == expected, (kind, meta["by_kind"])
    _compare(results, reference_run[0], meta["provider"])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_provider_matches_reference(reference_run, tmp_path):
    """Every Triton kernel (the grouped matmul too), interpreted on CPU; the hybrid's gradient also
    compiled (fullgraph)."""
    results, meta = _run("triton", tmp_path / "triton")
    assert meta["provider"] == "triton"
    assert set(meta["calls"]) == {
        "triton.moe_routing",
        "triton.moe_dispatch",
        "triton.moe_combine",
        "triton.mod_topk",
        "triton.mod_gather",
        "triton.mod_scatter",
        "triton.grouped_mm",
    }
    _compare(results, reference_run[0], "triton")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_compiled_train_step_matches_eager(tmp_path):
    """The train step through every Triton op compiles with fullgraph=True (inductor) and equals eager."""
    _run("triton", tmp_path / "step", what="train-step")


if __name__ == "__main__":
    if sys.argv[2] == "train-step":
        _child_train_step()
    else:
        _child(Path(sys.argv[1]))
