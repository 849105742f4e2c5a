"""One-page PNG report of a run, drawn from ``run_dir/metrics.jsonl`` (and ``config.json`` for the title).

    png = write_report("runs/debug")   # -> runs/debug/report.png, 14 x 10 in at 110 dpi = 1540 x 1100 px

Panels, each drawn only when its data exists:
    loss        train loss (thin) + debiased EMA, eval loss (log y); orchestrator decisions as vertical
                lines coloured by level 1..4, resume / phase_switch / early_stop / rollback events as
                dashed grey lines; labelled while there are <= 20 marks, unless too close to the last
    lr          learning rate; grad norm on a twin axis (log when it spans > 2 decades)
    throughput  tokens/s; MFU (%) on a twin axis; peak memory in the title
    experts     heatmap of each MoE layer's expert load over steps, diverging around the balanced 1/E
    mod / drop  MoD predictor accuracy (else selected fraction) per MoD layer; dropped fraction per MoE layer
Series longer than 300 points (all but the learning rate) are drawn as a faint raw line under an EMA.

Records are ``{"kind": "train"|"eval"|"event"|"decision", "step": int, ...}``. Unknown kinds and fields
are ignored; null or non-finite numbers are skipped point by point; when a step is logged twice (a
resume replays steps) the later record wins. A cut-off last line is normal (a run killed mid-write);
any other unreadable line is skipped and counted in the figure's title.

Shape letters: S = logged steps, R = heatmap rows (MoE layers x experts).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_report"]

FIGSIZE, DPI = (14.0, 10.0), 110
SMOOTH_ABOVE = 300  # points; a 14-inch panel shows ~1 point per 4 px at this count
MAX_MARK_LABELS = 20  # more labelled vertical lines than this overlap on a 14-inch axis: lines only
MAX_ROW_LABELS = 24  # the heatmap is ~2 in tall: more per-expert tick labels than this overlap
LEVEL_COLOURS = {1: "#2ca02c", 2: "#b8860b", 3: "#ff7f0e", 4: "#d62728"}  # calm -> drastic
MARKED_EVENTS = ("resume", "phase_switch", "early_stop", "rollback")
MARK_TEXT = dict(y=0.98, rotation=90, va="top", ha="right", fontsize=8)  # rotated label at the line's top
LEGEND = dict(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # outside, right
PER_LAYER = {"experts": "expert_load", "mod": "mod_ratio", "drop": "dropped"}  # panel -> its list field
Records = list[dict[str, Any]]


def write_report(run_dir: str | Path) -> Path:
    """Draw ``run_dir/report.png`` from ``run_dir/metrics.jsonl``; return the PNG's path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg canvas, no pyplot global state
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    recs, unreadable = _read(run_dir / "metrics.jsonl")
    train = recs.get("train", [])
    has = {"loss": True, "lr": bool(train), "tput": bool(train)}
    has |= {p: any(_list(r, k) for r in train) for p, k in PER_LAYER.items()}
    has["experts"] = any(any(_expert_loads(r)) for r in train)  # not just [[], []]
    rows = [[p for p in row if has[p]] for row in (["loss"], ["lr", "tput"], ["experts"], ["mod", "drop"])]
    rows = [row for row in rows if row]  # loss and experts take a full row; the others share one

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(
        len(rows), 2, height_ratios=[1.5 if row[0] in ("loss", "experts") else 1 for row in rows]
    )
    for i, row in enumerate(rows):
        for j, name in enumerate(row):
            ax = fig.add_subplot(grid[i, :] if len(row) == 1 else grid[i, j])
            _DRAW[name](ax, recs)
            ax.set_xlabel("step")
            ax.xaxis.get_major_locator().set_params(integer=True)  # no "step 2.85" ticks on short runs
            if name != "experts":  # grid lines would cut through the heatmap's cells
                ax.grid(alpha=0.3)
    title = run_dir.resolve().name + _config_summary(run_dir / "config.json")
    if unreadable:
        title += f"\n{unreadable} unreadable line{'s' * (unreadable != 1)} skipped"
    fig.suptitle(title, fontsize=14, fontweight="bold")
    out = run_dir / "report.png"
    fig.savefig(out, dpi=DPI)  # no bbox_inches="tight": the PNG is exactly FIGSIZE * DPI pixels
    return out


def _read(path: Path) -> tuple[dict[str, Records], int]:
    """Records grouped by kind, and the number of unreadable lines (a cut-off last line not counted)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (a run writes one JSON record per line)")
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    recs: dict[str, Records] = {}
    unreadable = 0
    for n, line in enumerate(lines):
        try:
            rec = json.loads(line) if line.strip() else {}  # json accepts NaN / Infinity as dumps writes them
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            recs.setdefault(str(rec.get("kind")), []).append(rec)
        elif rec != {}:
            unreadable += n < len(lines) - 1 or text.endswith("\n")
    if not recs.get("train") and not recs.get("eval"):
        raise ValueError(f"{path}: no train or eval records to plot")
    return recs, unreadable


def _list(r: dict[str, Any], key: str) -> list:
    v = r.get(key)
    return v if isinstance(v, list) else []


def _expert_loads(r: dict[str, Any]) -> list[list]:
    return [x if isinstance(x, list) else [] for x in _list(r, "expert_load")]


def _num(v: Any) -> float:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else math.nan


def _series(recs: Records, key: str, i: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(steps_S, values_S) of ``rec[key]`` (or ``rec[key][i]``) sorted by step, non-finite values dropped."""
    by_step = {}
    for r in recs:  # in file order, so the later record of a replayed step wins
        v = r.get(key) if i is None else (_list(r, key) + [None] * (i + 1))[i]
        by_step[r["step"]] = _num(v)
    steps_S = np.array(sorted(by_step), dtype=float)
    vals_S = np.array([by_step[s] for s in sorted(by_step)], dtype=float)
    keep = np.isfinite(vals_S)
    return steps_S[keep], vals_S[keep]


def _dot(x: np.ndarray) -> dict[str, Any]:
    """A marker for a one-point series, which a line alone would leave invisible."""
    return {"marker": "o", "ms": 5} if len(x) == 1 else {}


def _edges(c_S: np.ndarray) -> np.ndarray:
    """Cell edges around centres ``c_S`` (S + 1 of them): midpoints, the ends mirrored; +-0.5 for one."""
    if len(c_S) == 1:
        return c_S[[0, 0]] + [-0.5, 0.5]
    mid = (c_S[1:] + c_S[:-1]) / 2
    return np.concatenate([[2 * c_S[0] - mid[0]], mid, [2 * c_S[-1] - mid[-1]]])


def _ema(x_S: np.ndarray) -> np.ndarray:
    """Debiased EMA (TensorBoard-style: no pull towards 0 at the start) over ~2% of points, at most 50:
    a longer window visibly lags the steep early loss."""
    beta = 1.0 - 1.0 / min(max(len(x_S) / 50, 1.0), 50.0)
    out_S, acc = np.empty_like(x_S), 0.0
    for t, x in enumerate(x_S):
        acc = beta * acc + (1 - beta) * x
        out_S[t] = acc / (1 - beta ** (t + 1))
    return out_S


def _line(ax, x: np.ndarray, y: np.ndarray, smooth: bool = True, **kw) -> None:
    """A line; past SMOOTH_ABOVE points a faint raw line under its EMA, as raw noise becomes a solid band."""
    if smooth and len(x) > SMOOTH_ABOVE:
        ax.plot(x, y, lw=0.5, alpha=0.25, **{k: v for k, v in kw.items() if k != "label"})
        y = _ema(y)
    ax.plot(x, y, lw=1.2, **kw, **_dot(x))


def _draw_loss(ax, recs: dict[str, Records]) -> None:
    steps, loss = _series(recs.get("train", []), "loss")
    esteps, eloss = _series(recs.get("eval", []), "loss")
    parts = []
    if len(loss):
        ax.plot(steps, loss, lw=0.7, alpha=0.45, color="tab:blue", label="train", **_dot(steps))
        ax.plot(steps, _ema(loss), lw=1.8, color="tab:blue", label="train (EMA)")
        parts.append(f"final train {loss[-1]:.4g}")
    if len(eloss):
        ax.plot(esteps, eloss, "o-", ms=4, lw=1.2, color="tab:orange", label="eval")
        best = int(np.argmin(eloss))
        parts.append(f"best eval {eloss[best]:.4g} @ step {int(esteps[best])}")
    if len(loss) + len(eloss) and min(loss.min(initial=np.inf), eloss.min(initial=np.inf)) > 0:
        ax.set_yscale("log")  # early loss (~ln V) would otherwise flatten the part worth reading
        ax.yaxis.set_major_formatter("{x:g}")
        ax.yaxis.set_minor_formatter("{x:g}")
    # level 1..4 as an int, else None; `in` on a tuple compares by ==, so a stray list cannot raise
    levels = [int(r["level"]) if r.get("level") in (1, 2, 3, 4) else None for r in recs.get("decision", [])]
    marks = [
        (r, LEVEL_COLOURS.get(lv, "purple"), "-", r.get("action"))
        for r, lv in zip(recs.get("decision", []), levels, strict=True)
    ]
    marks += [(r, "grey", "--", r["what"]) for r in recs.get("event", []) if r.get("what") in MARKED_EVENTS]
    for r, colour, ls, _ in marks:
        ax.axvline(r["step"], lw=1.1, ls=ls, color=colour, alpha=0.85)
    x0, x1 = ax.get_xlim()
    labelled = -math.inf  # step of the last label drawn
    for r, colour, _, text in sorted(marks, key=lambda m: m[0]["step"]):
        # 1.2% of the width ~ one rotated 8-pt line: a nearer label would overlap, so it gets none
        if len(marks) <= MAX_MARK_LABELS and r["step"] - labelled >= 0.012 * (x1 - x0):
            ax.text(r["step"], s=f"{text} ", transform=ax.get_xaxis_transform(), color=colour, **MARK_TEXT)
            labelled = r["step"]
    for level in sorted(set(levels) - {None}):
        ax.plot([], [], color=LEVEL_COLOURS[level], label=f"decision, level {level}")
    if any(ls == "--" for _, _, ls, _ in marks):
        ax.plot([], [], ls="--", color="grey", label="resume / phase switch /\nearly stop / rollback")
    ax.set_title("loss — " + ", ".join(parts) if parts else "loss (no finite values)")
    ax.set_ylabel("loss")
    ax.legend(**LEGEND)


def _twin(ax, left, right, labels: tuple[str, str], colours: tuple[str, str], smooth=(True, True)) -> None:
    """Two series on twin y axes; the axis labels, in the series' colours, serve as the legend."""
    ax2 = ax.twinx()
    for a, (x, y), label, colour, sm in zip((ax, ax2), (left, right), labels, colours, smooth, strict=True):
        _line(a, x, y, sm, color=colour)
        a.set_ylabel(label, color=colour)
        a.tick_params(axis="y", colors=colour)
    y = right[1][right[1] > 0]
    if len(y) and y.max() > 100 * y.min():  # spans > 2 decades
        ax2.set_yscale("log")


def _draw_lr(ax, recs: dict[str, Records]) -> None:
    train = recs["train"]
    _twin(
        ax,
        _series(train, "lr"),
        _series(train, "grad_norm"),
        ("learning rate", "grad norm"),
        ("C2", "C3"),
        (False, True),
    )
    ax.set_title("learning rate and gradient norm")


def _draw_tput(ax, recs: dict[str, Records]) -> None:
    train = recs["train"]
    steps, mfu = _series(train, "mfu")  # logged as a fraction of peak FLOP/s
    _twin(ax, _series(train, "tokens_per_s"), (steps, 100 * mfu), ("tokens/s", "MFU (%)"), ("C4", "C5"))
    mem = _series(train, "memory_mb")[1]
    ax.set_title("throughput" + (f" — peak memory {mem.max() / 1024:.2f} GiB" if len(mem) else ""))


def _draw_experts(ax, recs: dict[str, Records]) -> None:
    from matplotlib.colors import TwoSlopeNorm

    by_step = {r["step"]: _expert_loads(r) for r in recs["train"]}  # the later record of a step wins
    moe = sorted((s, load) for s, load in by_step.items() if any(load))  # (step, per-layer expert loads)
    n_layers = max(len(load) for _, load in moe)
    n_exp = [max(len(load[i]) if i < len(load) else 0 for _, load in moe) for i in range(n_layers)]
    layer_ids = _layer_ids(recs["train"], "expert_layers", n_layers)
    load_RS = np.full((sum(n_exp), len(moe)), np.nan)
    first = np.cumsum([0] + n_exp)  # first row of each layer (and one past the end)
    for s, (_, load) in enumerate(moe):
        for i, loads in enumerate(load):
            load_RS[first[i] : first[i] + len(loads), s] = [_num(v) for v in loads]
    balanced = 1 / Counter(e for e in n_exp if e).most_common(1)[0][0]  # layers share E in lumina
    vmax = max(np.nanmax(load_RS, initial=0), 2 * balanced)
    norm = TwoSlopeNorm(vmin=0, vcenter=balanced, vmax=vmax)  # white = balanced, red = hot, blue = starved
    steps_S = np.array([s for s, _ in moe], dtype=float)
    rows = np.arange(len(load_RS) + 1) - 0.5
    mesh = ax.pcolormesh(_edges(steps_S), rows, load_RS, cmap="coolwarm", norm=norm)  # steps may be uneven
    ax.set_ylim(len(load_RS) - 0.5, -0.5)  # layer 0 expert 0 on top
    for b in first[1:-1]:
        ax.axhline(b - 0.5, color="black", lw=0.8)
    if len(load_RS) <= MAX_ROW_LABELS:
        labels = [f"L{layer_ids[i]} e{e}" for i, n in enumerate(n_exp) for e in range(n)]
        ax.set_yticks(np.arange(len(labels)), labels, fontsize=7)
    else:  # one label per layer, centred on its block of expert rows
        ax.set_yticks((first[:-1] + first[1:]) / 2 - 0.5, [f"L{x}" for x in layer_ids], fontsize=7)
        ax.set_ylabel("MoE layer (rows: experts)")
    cax = ax.inset_axes((1.01, 0.0, 0.012, 1.0))  # beside the heatmap, not at the figure's far edge
    ax.figure.colorbar(mesh, cax=cax).set_label("share of routed tokens")
    ax.set_title(f"expert load per MoE layer — balanced = 1/E = {balanced:.3g} (white)")


def _layer_ids(train: Records, key: str, n: int) -> list[int]:
    """Model layer index of each of ``n`` routed layers, from the last record that names all of them."""
    return next((r[key] for r in reversed(train) if len(_list(r, key)) == n), list(range(n)))


def _draw_per_layer(ax, train: Records, key: str, ids_key: str) -> None:
    n = max(len(_list(r, key)) for r in train)
    for i, layer in enumerate(_layer_ids(train, ids_key, n)):
        steps, vals = _series(train, key, i)
        _line(ax, steps, vals, label=f"layer {layer}", color=f"C{i % 10}")  # raw + EMA share a colour
    ax.legend(**LEGEND, ncols=1 if n <= 8 else 2)


def _draw_mod(ax, recs: dict[str, Records]) -> None:
    train = recs["train"]
    if any(_list(r, "mod_predictor_acc") for r in train):
        # the selected fraction is the configured capacity by construction; what moves is how well the
        # causal predictor (used at inference) agrees with the router's top-k
        ratio = next((_list(r, "mod_ratio") for r in reversed(train) if _list(r, "mod_ratio")), [])
        cap = f" (selected fraction {ratio[0]:.3g})" if ratio else ""
        _draw_per_layer(ax, train, "mod_predictor_acc", "mod_layers")
        ax.set(title=f"MoD: predictor accuracy{cap}", ylabel="accuracy")
        return
    _draw_per_layer(ax, train, PER_LAYER["mod"], "mod_layers")
    ax.set(title="MoD: fraction of tokens selected", ylabel="selected")


def _draw_drop(ax, recs: dict[str, Records]) -> None:
    _draw_per_layer(ax, recs["train"], PER_LAYER["drop"], "expert_layers")
    ax.set(title="MoE: fraction of routed assignments dropped", ylabel="dropped")


def _config_summary(path: Path) -> str:
    """' — preset NAME, N steps' from config.json; '' when it is absent or unreadable."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    cfg = cfg if isinstance(cfg, dict) else {}
    steps = cfg["train"].get("steps") if isinstance(cfg.get("train"), dict) else None
    return (f" — preset {cfg['preset']}" if "preset" in cfg else "") + (f", {steps} steps" if steps else "")


_DRAW = dict(
    loss=_draw_loss, lr=_draw_lr, tput=_draw_tput, experts=_draw_experts, mod=_draw_mod, drop=_draw_drop
)
