"""DeepSpeed ZeRO 1/2/3 (optionally with CPU offload) behind the ``Engine`` interface.

    torchrun --nproc_per_node=2 -m lumina.run --dist zero3 [--dist.offload=cpu]

DeepSpeed owns the model side (``deepspeed.initialize`` over the ``ModelView``: gradient reduction,
partitioning, ZeRO-3's gather / release hooks, clipping); Lumina keeps its own step semantics
(``lumina.distributed.step``: W ranks x A/W micro-batches == one process with ``grad_accum = A``,
RNG key per global micro-batch, global token count, routing statistics all-reduced before the
balance-bias update, metrics in one collective) and its own AdamW arithmetic.

Stages (``dist.strategy``): ``zero1`` partitions the optimizer state, ``zero2`` also the gradients,
``zero3`` also the parameters (gathered per layer for its forward and backward). ``dist.offload=cpu``
(zero2 / zero3) keeps the fp32 masters and the moments in host memory (``offload_optimizer``; zero3
also ``offload_param``) and steps them with ``DeepSpeedCPUAdam`` (its C++ kernel is JIT-built on
first use, about 2 minutes).

Numerics. DeepSpeed runs in fp32 (no ``bf16`` / ``fp16`` section): the module holds fp32 masters and
the view casts them to the compute dtype inside the forward, exactly as the single-device step and
the DDP / FSDP engines do, so ``train.precision`` fp32 / tf32 / bf16 / fp8 train as they do on one
process. The optimizer is Lumina's AdamW (the fused kernel, ``lumina.optim.adamw_``, in place on
DeepSpeed's flat partitions: elementwise, so flattening changes no bit but where an element falls in
the kernel's vectorised body or its scalar tail, a last-bit difference in a second moment), with two
parameter groups (matrices decayed, the rest not, as ``lumina.optim.adamw_update``), the learning
rate, weight decay and clip norm read from ``hp`` every step, and the bias correction from the run's
``updates`` counter. DeepSpeed averages gradients over ranks, so each rank's loss is multiplied by
W, and ``engine.backward(loss, scale_wrt_gas=False)`` keeps DeepSpeed from dividing it by the local
accumulation count (the loss already divides by the global token count). What differs from Lumina's
module-view step (``lumina.distributed.step``, itself a few ulps off the pure step: plain autograd
vs torch.func): DeepSpeed sums the gradient norm in fp64 (Lumina: fp32) and clips with
``g / ((norm + 1e-6) / clip)`` where Lumina multiplies by ``clip / (norm + 1e-6)``; with several local
micro-batches the fp32 gradient sums run in another order; ``DeepSpeedCPUAdam`` (offload) evaluates
the same AdamW with its own rounding; and a step whose gradients are not finite is skipped by
DeepSpeed (``metrics["skipped"]`` = 1; weights, moments, balance bias and ``updates`` unchanged;
``step`` and the RNG key advance) where the fp32 single-process step applies it.

The train state. ``state["params"]`` and ``state["opt"]["m" / "v"]`` hold, per leaf, this rank's
part of DeepSpeed's fp32 master and moments: a 1-D view of the flat elements
``[offset, offset + n)`` of the leaf (n may be 0), live (DeepSpeed updates them in place). ZeRO-1/2
partition the concatenation of each parameter group, so a rank holds a contiguous range of some
leaves; ZeRO-3 partitions every leaf: rank r holds ``[r * ceil(numel / W), ...)``. Those ranges
are what ``checkpoint_tensors`` reports as ``lumina.shards.Piece``s: a checkpoint holds the
single-process names and loads at any world size (and into one process). ``full_state`` assembles
whole tensors (collective). Everything else in the state (counters, RNG key, knobs, data position)
is replicated, as in the other engines.

The balance bias of aux-loss-free MoE (``model.moe.balance=bias``) is not a gradient update: after
DeepSpeed's step the bias is read whole (one all-reduce of its E elements), the new bias (from
all-reduced expert loads, identical on every rank) is written into both copies DeepSpeed keeps,
without a collective: this rank's range of the fp32 master, and the module's working copy
(ZeRO-1/2: the full tensor; ZeRO-3: this rank's partition ``ds_tensor``, and the gathered data when
the parameter is persistent — DeepSpeed keeps leaves under ``stage3_param_persistence_threshold``
elements gathered). A step DeepSpeed skips leaves it unchanged. It stays in the optimizer (zero
gradient: AdamW leaves it unchanged, as on one process).

DeepSpeed internals this relies on (deepspeed 0.19.8; tests/test_zero.py checks the views against
``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` and, ZeRO-3,
``safe_get_local_fp32_param`` / ``safe_get_local_optimizer_state`` bit for bit): ZeRO-1/2's
``param._hp_mapping`` fragments (what those helpers read), ``single_partition_of_fp32_groups``,
``_lazy_init_hp_params_optimizer_state`` and ``update_lp_params``; ZeRO-3's
``fp32_partitioned_groups_flat``, ``_get_fp32_opt_state_partition`` and the parameters'
``ds_tensor`` / ``ds_status`` / ``partition()`` / ``all_gather()``; both stages' ``clip_grad``.
The engine does not call the ``safe_get_*`` helpers itself: a snapshot must be assembled from the
state it is given, not from DeepSpeed's live buffers, and the local ones copy to the compute device
when the state is offloaded.

Not supported: ``train.precision=fp16`` (dynamic loss scaling) and ``train.optimizer=adamw8bit``
(``ConfigError``), ``train.compile`` (the engine runs eager), DeepSpeed's own checkpoints (they
unpickle; never loaded or written here).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings

import torch
import torch.distributed as dist
from tensordict import TensorDict

from lumina import optim, tree
from lumina.config import ConfigError, RunConfig, TrainConfig
from lumina.distributed.engines import DistEnv, eval_through
from lumina.distributed.step import _all_reduce, _reduce_stats
from lumina.distributed.view import ModelView
from lumina.model import random
from lumina.model.moe import update_balance_bias
from lumina.shards import Piece

# DeepSpeed 0.19.8 calls torch.distributed collectives torch 2.13 marks deprecated, once per call site
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

__all__ = ["STAGES", "LuminaAdamW", "ZeroEngine", "ds_config"]

STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}


def _import_deepspeed(device_type: str, strategy: str):
    """``deepspeed`` (its accelerator chosen from our device before the first import: it otherwise
    guesses, with a warning); a ``ConfigError`` naming the setting when it is not installed."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device_type == "cuda" else "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(
            f"dist.strategy={strategy} needs deepspeed (pip install 'lumina[deepspeed]', i.e. "
            f"deepspeed==0.19.8): {e}"
        ) from None
    if device_type == "cpu":
        # Starting its comm backend on CPU, DeepSpeed JIT-compiles a shared-memory all-reduce used
        # only by ``inference_all_reduce`` (never in training): 100 s of a 2-core machine's first
        # run (measured: engine start 109 s with it, ~3 s without). Its table of compatible ops
        # is the documented switch ("edits to it persist").
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class LuminaAdamW(torch.optim.Optimizer):
    """Lumina's AdamW (in place through ``lumina.optim.adamw_``, the fused kernel of the eager
    single-device step; else ``lumina.optim._adamw_math``) as a ``torch.optim.Optimizer`` over DeepSpeed's
    flat fp32 partitions. Per group: ``lr``, ``weight_decay`` (applied when ``decay``) and
    ``updates`` (the step number of the bias correction, counting from 1), all set by the engine
    before each step. State per flat tensor: ``exp_avg`` / ``exp_avg_sq`` (fp32), updated in place
    (DeepSpeed's checkpoint helpers hold views of them)."""

    def __init__(self, groups: list[dict], cfg: TrainConfig):
        super().__init__(groups, {"lr": 0.0, "weight_decay": 0.0, "decay": False, "updates": 1})
        self.cfg = cfg

    def init_state(self, flat: torch.Tensor) -> dict:
        state = self.state[flat]
        if not state:
            state["exp_avg"] = torch.zeros_like(flat, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(flat, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.init_state(p)
                dev = p.device
                hp = {
                    "lr": torch.tensor(group["lr"], dtype=torch.float32, device=dev),
                    "weight_decay": torch.tensor(group["weight_decay"], dtype=torch.float32, device=dev),
                }
                step = torch.tensor(group["updates"], dtype=torch.int64, device=dev)
                lists = ([p], [p.grad], [state["exp_avg"]], [state["exp_avg_sq"]])
                if optim._fusable(lists):  # in place, the single-device step's fused update
                    optim.adamw_(*lists, [0] if group["decay"] else [], step, hp, self.cfg)
                    continue
                (new_p,), (m,), (v,) = optim._adamw_math(
                    [p.float()],
                    [p.grad.float()],
                    [state["exp_avg"]],
                    [state["exp_avg_sq"]],
                    [0] if group["decay"] else [],
                    step,
                    hp,
                    self.cfg,
                )
                p.copy_(new_p)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
        return None


def ds_config(cfg: RunConfig, world: int, **zero_overrides) -> dict:
    """The DeepSpeed configuration of a run: ZeRO stage from ``dist.strategy``, offload from
    ``dist.offload``, batch sizes consistent with ours (global batch = micro-batch x local
    accumulation x W), clipping from ``train.clip_norm`` (re-read from ``hp`` every step), fp32."""
    tc, stage = cfg.train, STAGES[cfg.dist.strategy]
    zero: dict = {"stage": stage, "contiguous_gradients": True, "overlap_comm": False}
    if cfg.dist.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    zero.update(zero_overrides)
    return {
        "train_batch_size": tc.batch_size,
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accum // world,
        "gradient_clipping": float(tc.clip_norm),
        "zero_optimization": zero,
        # our optimizer is a torch.optim.Optimizer DeepSpeed has no list entry for
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


@dataclasses.dataclass
class _Leaf:
    """One parameter of the view and this rank's range ``[offset, offset + n)`` of it, flattened."""

    name: str
    param: torch.nn.Parameter
    shape: tuple[int, ...]
    offset: int
    n: int


class ZeroEngine:
    """DeepSpeed ZeRO-``dist.strategy`` over a ``ModelView`` (see the module docstring).

    ``zero_overrides`` are merged into the ``zero_optimization`` section (tests lower
    ``stage3_param_persistence_threshold`` so that their small leaves are partitioned)."""

    def __init__(self, cfg: RunConfig, env: DistEnv, full: TensorDict, pad_id: int, **zero_overrides):
        from lumina.step import COMPUTE_DTYPES

        tc = cfg.train
        if cfg.dist.strategy not in STAGES:
            raise ValueError(f"ZeroEngine: dist.strategy={cfg.dist.strategy!r} is not zero1|zero2|zero3")
        if tc.precision == "fp16":
            raise ConfigError(
                f"train.precision=fp16 with dist.strategy={cfg.dist.strategy}: not supported (DeepSpeed's "
                "loss scaling is not Lumina's); use bf16"
            )
        if tc.optimizer != "adamw":
            raise ConfigError(
                f"train.optimizer={tc.optimizer} with dist.strategy={cfg.dist.strategy}: not supported "
                "(ZeRO partitions flattened groups); use adamw"
            )
        deepspeed = _import_deepspeed(env.device.type, cfg.dist.strategy)
        self.strategy, self.cfg, self.env, self.pad_id = cfg.dist.strategy, cfg, env, pad_id
        self.stage, self.offload = STAGES[cfg.dist.strategy], cfg.dist.offload == "cpu"
        full = full.to(env.device)
        self.view = view = ModelView(full["params"], cfg.model, COMPUTE_DTYPES[tc.precision])
        names = {id(p): k for k, p in view._leaves().items()}
        if self.stage == 3:
            # The view reads a layer's parameters through TreeModule.tree() inside LayerModule.forward,
            # never through the TreeModule children's own forward: a layer is a ZeRO-3 "leaf module"
            # (all its parameters gathered for its forward and backward, released after).
            for layer in view.layers:
                deepspeed.utils.set_z3_leaf_module(layer, True)
        groups = [
            {"params": [p for p in view.parameters() if p.ndim >= 2], "decay": True},
            {"params": [p for p in view.parameters() if p.ndim < 2], "decay": False},
        ]
        groups = [g for g in groups if g["params"]]
        if self.offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            basic = DeepSpeedCPUAdam(
                [{"params": g["params"], "decay": g["decay"]} for g in groups],
                lr=0.0,
                betas=(tc.beta1, tc.beta2),
                eps=tc.eps,
                weight_decay=0.0,
                adamw_mode=True,
            )
        else:
            basic = LuminaAdamW(groups, tc)
        self.basic = basic
        ds_logger = logging.getLogger("DeepSpeed")
        level = ds_logger.level
        ds_logger.setLevel(logging.WARNING)  # its INFO banner and config dump, on every start
        try:
            self.engine, self.zero, _, _ = deepspeed.initialize(
                model=view, optimizer=basic, config=ds_config(cfg, env.world_size, **zero_overrides)
            )
        finally:
            ds_logger.setLevel(level)
        if self.stage == 3:
            # embedding, final norm (and an untied head) live on the root but are used in the view's
            # own forward (and its head_fn): gathered for the whole forward and backward
            for p in view.root.parameters():
                deepspeed.zero.register_external_parameter(view, p)
        self._flats = self._flat_partitions()
        updates = int(full["updates"])
        for flat in self._flats:  # the moments exist from the start (DeepSpeed creates them lazily)
            state = basic.init_state(flat) if isinstance(basic, LuminaAdamW) else basic.state[flat]
            if not state:
                state.update(
                    step=updates,
                    exp_avg=torch.zeros_like(flat, dtype=torch.float32),
                    exp_avg_sq=torch.zeros_like(flat, dtype=torch.float32),
                )
        if self.stage < 3:
            self.zero._lazy_init_hp_params_optimizer_state()  # links each leaf to its moment fragments
        self.leaves = [self._leaf(names[id(p)], p) for p in view.parameters()]
        flat_full = tree.flatten(full)
        state = full.exclude("params", "opt")
        state["params"], state["opt"] = self._live()
        self.state = state
        # the whole incoming state (moments too) into DeepSpeed's partitions: masters and working
        # copies already hold full["params"] (DeepSpeed copied the module's tensors)
        self._write(state, flat_full, refresh=False)

    # -------------------------------------------------------------------- DeepSpeed's partitions

    def _flat_partitions(self) -> list[torch.Tensor]:
        """The flat fp32 tensors DeepSpeed's optimizer steps (one per group / ZeRO-3 sub-group)."""
        if self.stage == 3:
            return list(self.zero.fp32_partitioned_groups_flat)
        return list(self.zero.single_partition_of_fp32_groups)

    def _leaf(self, name: str, p: torch.nn.Parameter) -> _Leaf:
        shape = tuple(p.ds_shape) if self.stage == 3 else tuple(p.shape)
        numel = math.prod(shape)
        if self.stage == 3:  # each leaf padded to W equal partitions, rank r holds the r-th
            per = p.ds_tensor.ds_numel
            offset = min(self.env.rank * per, numel)
            return _Leaf(name, p, shape, offset, max(0, min(per, numel - offset)))
        mapping = p._hp_mapping  # ZeRO-1/2: this rank's fragment of the leaf, or None
        if mapping is None:
            return _Leaf(name, p, shape, 0, 0)
        return _Leaf(name, p, shape, mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel)

    def _views(self, leaf: _Leaf) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fp32 master, m, v): 1-D views of DeepSpeed's tensors holding this rank's range."""
        p = leaf.param
        if self.stage == 3:
            # stage3's own accessor of a leaf's range in the flat fp32 partition / optimizer state
            # (what safe_get_local_fp32_param / _optimizer_state call, minus their copy to the
            # compute device, which would not be a view when the state is offloaded)
            out = [
                self.zero._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)[0]
                for key in (None, "exp_avg", "exp_avg_sq")
            ]
            return tuple(t.narrow(0, 0, leaf.n) for t in out)
        if p._hp_mapping is None:
            empty = torch.empty(0, dtype=torch.float32, device=self._flats[0].device)
            return empty, empty, empty
        m = p._hp_mapping
        return m.hp_fragment, m.get_optim_state_fragment("exp_avg"), m.get_optim_state_fragment("exp_avg_sq")

    def _live(self) -> tuple[TensorDict, TensorDict]:
        params, m, v = {}, {}, {}
        for leaf in self.leaves:
            params[leaf.name], m[leaf.name], v[leaf.name] = self._views(leaf)
        opt = TensorDict({"m": tree.unflatten(m), "v": tree.unflatten(v)}, batch_size=[])
        return tree.unflatten(params), opt

    def _local(self, leaf: _Leaf, t: torch.Tensor) -> torch.Tensor:
        """This rank's range of ``t``: a whole leaf (its shape) or already the range (1-D, n)."""
        if tuple(t.shape) == leaf.shape:
            return t.reshape(-1).narrow(0, leaf.offset, leaf.n)
        if t.dim() == 1 and t.numel() == leaf.n:
            return t
        raise ValueError(
            f"{leaf.name}: {list(t.shape)} is neither the leaf {list(leaf.shape)} "
            f"nor this rank's {leaf.n} elements"
        )

    @torch.no_grad()
    def _write(
        self, state: TensorDict, flat: dict[str, torch.Tensor] | None = None, *, refresh: bool = True
    ) -> None:
        """Set DeepSpeed's masters and moments (and, with ``refresh``, the module's working copies
        from the masters: collective) from ``state``'s params / opt leaves (whole leaves or ranges)."""
        flat = tree.flatten(state) if flat is None else flat
        for leaf in self.leaves:
            for key, view in zip(("params.", "opt.m.", "opt.v."), self._views(leaf), strict=True):
                src = flat[key + leaf.name]
                if src.data_ptr() != view.data_ptr() or src.numel() != view.numel():
                    view.copy_(self._local(leaf, src))
        if refresh:
            self._refresh_working_copies()

    def _refresh_working_copies(self) -> None:
        """The module's parameters from the fp32 masters (after the masters were set)."""
        if self.stage < 3:
            self.zero.update_lp_params()  # master partitions -> bit16 partitions, all-gathered
            return
        for leaf in self.leaves:
            p = leaf.param
            master = self._views(leaf)[0]
            if p.ds_tensor.data_ptr() != master.data_ptr():
                p.ds_tensor.data.narrow(0, 0, leaf.n).copy_(master)
        # parameters DeepSpeed keeps gathered (persistent, small): gather the new partitions again
        gathered = [leaf.param for leaf in self.leaves if leaf.param.ds_status.name == "AVAILABLE"]
        if gathered:
            for p in gathered:
                p.partition()
            gathered[0].all_gather(gathered)

    @torch.no_grad()
    def _set_full(self, leaf: _Leaf, value: torch.Tensor) -> None:
        """A leaf's whole new value, known on every rank: master range and working copy, no
        collective (the balance-bias update)."""
        p = leaf.param
        self._views(leaf)[0].copy_(value.reshape(-1).narrow(0, leaf.offset, leaf.n))
        if self.stage < 3:
            p.data.copy_(value)
            return
        p.ds_tensor.data.narrow(0, 0, leaf.n).copy_(value.reshape(-1).narrow(0, leaf.offset, leaf.n))
        if p.ds_status.name == "AVAILABLE":
            p.data.copy_(value.reshape(p.data.shape))

    def _full_leaf(self, leaf: _Leaf, local: torch.Tensor) -> torch.Tensor:
        """The whole leaf from every rank's range (collective: each element comes from one rank)."""
        buf = torch.zeros(math.prod(leaf.shape), dtype=local.dtype, device=self.env.device)
        buf.narrow(0, leaf.offset, leaf.n).copy_(local)
        dist.all_reduce(buf)
        return buf.reshape(leaf.shape)

    # ------------------------------------------------------------------------------ the Engine

    def _set_hp(self, hp: TensorDict, updates: torch.Tensor) -> None:
        lr, wd, n = float(hp["lr"]), float(hp["weight_decay"]), int(updates)
        for group in self.basic.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd if group["decay"] else 0.0
            group["updates"] = n
        if self.offload:  # DeepSpeedCPUAdam counts itself (+1 per step): bias correction from ours
            for flat in self._flats:
                self.basic.state[flat]["step"] = n - 1
        self.zero.clip_grad = float(hp["clip_norm"])

    def step(self, state: TensorDict, batch: TensorDict, hp: TensorDict) -> tuple[TensorDict, TensorDict]:
        W, rank = self.env.world_size, self.env.rank
        cfg, tc, pad_id = self.cfg, self.cfg.train, self.pad_id
        from lumina.step import head_loss

        A = tc.grad_accum
        A_local = A // W
        inputs = batch["inputs"].unflatten(0, (A_local, -1))
        targets = batch["targets"].unflatten(0, (A_local, -1))
        n_tokens = _all_reduce((targets != pad_id).sum()).clamp(min=1)
        updates = state["updates"] + 1
        self._set_hp(hp, updates)
        per_micro = []
        for a in range(A_local):
            # the boundary set per micro-batch, not counted by DeepSpeed: a step always ends with
            # DeepSpeed's optimizer step, whatever ran (or was interrupted) before
            self.engine.set_gradient_accumulation_boundary(a == A_local - 1)
            key = random.fold_in(state["rng"], rank * A_local + a)
            t_a = targets[a]
            (ce_sum, correct), aux = self.engine(
                inputs[a],
                state["knobs"],
                rng=key,
                train=True,
                remat_mode=tc.grad_checkpointing,
                fp8=tc.precision == "fp8",
                head_fn=lambda root, x_BTD, t_a=t_a: head_loss(root, x_BTD, t_a, cfg, pad_id),
            )
            loss = ce_sum / n_tokens + aux["loss"] / A
            # DeepSpeed averages gradients over ranks (x W) and, unless told, divides by its
            # accumulation count (our loss already divides by the global token count)
            self.engine.backward(loss * W, scale_wrt_gas=False)
            per_micro.append(
                {"ce_sum": ce_sum.detach(), "aux_loss": aux["loss"].detach(), "correct": correct.detach()}
                | {g: aux[g].detach().to_dict() for g in ("moe", "mod") if g in aux}
            )
        self.engine.step()  # reduce (ZeRO-1), clip, Lumina's AdamW on the partitions, gather
        applied = bool(self.engine.was_step_applied())
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = torch.as_tensor(grad_norm if grad_norm is not None else float("nan"), dtype=torch.float32)
        stats = _reduce_stats(per_micro, A)
        if applied and "moe" in stats and cfg.model.moe.balance == "bias":  # a skipped step changes nothing
            self._update_balance_bias(stats)
        totals = _all_reduce(
            torch.stack([sum(m[k].float() for m in per_micro) for k in ("ce_sum", "aux_loss", "correct")])
        )
        new = state.clone(recurse=False)
        new.update(
            {
                "updates": updates if applied else state["updates"],
                "step": state["step"] + 1,
                "rng": random.fold_in(state["rng"], A),
            }
        )
        new["params"], new["opt"] = self.state["params"], self.state["opt"]
        metrics = TensorDict(
            {
                "loss": totals[0] / n_tokens,
                "aux_loss": totals[1] / A,
                "accuracy": totals[2] / n_tokens,
                "grad_norm": grad_norm.to(totals.device),
                "tokens": n_tokens,
                "lr": hp["lr"],
                "skipped": torch.tensor(0.0 if applied else 1.0, device=totals.device),
                **stats,
            },
            batch_size=[],
        )
        return new, metrics

    def _update_balance_bias(self, stats: TensorDict) -> None:
        by_name = {leaf.name: leaf for leaf in self.leaves}
        bias = {}
        for i, is_moe in enumerate(self.cfg.model.moe_layers()):
            if is_moe:
                leaf = by_name[f"layers.{i}.moe.balance_bias"]
                bias[leaf.name] = self._full_leaf(leaf, self._views(leaf)[0])  # tiny: [E]
        new = tree.flatten(update_balance_bias(tree.unflatten(bias), stats, self.cfg.model))
        for name, value in new.items():
            self._set_full(by_name[name], value)

    def eval_step(self, state: TensorDict, batch: TensorDict) -> TensorDict:
        return eval_through(self.engine, state, batch, self.cfg, self.pad_id)

    def checkpoint_tensors(self, state: TensorDict) -> dict[str, torch.Tensor | Piece]:
        """The single-process names; masters and moments as this rank's ``Piece`` of each leaf."""
        flat = tree.flatten(state)
        out: dict[str, torch.Tensor | Piece] = {}
        for leaf in self.leaves:
            for key in ("params.", "opt.m.", "opt.v."):
                local = self._local(leaf, flat.pop(key + leaf.name))
                out[key + leaf.name] = Piece(leaf.shape, leaf.offset, local)
        return out | flat

    def snapshot(self, state: TensorDict) -> TensorDict:
        return state.apply(lambda t: t.detach().clone())

    def adopt(self, state: TensorDict) -> TensorDict:
        """Make ``state`` (a snapshot, a state the fault injector changed — whole leaves or this
        rank's ranges — or the live state) the live one. Collective."""
        self._write(state)
        new = state.clone(recurse=False)
        new["params"], new["opt"] = self.state["params"], self.state["opt"]
        return new

    def full_state(self, state: TensorDict) -> TensorDict:
        """The whole train state on every rank, single-process layout (collective)."""
        flat = tree.flatten(state)
        for leaf in self.leaves:
            for key in ("params.", "opt.m.", "opt.v."):
                flat[key + leaf.name] = self._full_leaf(leaf, self._local(leaf, flat[key + leaf.name]))
        return tree.unflatten({k: v.detach().clone() for k, v in flat.items()})
