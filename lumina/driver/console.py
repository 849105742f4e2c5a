"""What a run shows and writes as it goes: the terminal (``Console``), ``metrics.jsonl`` and
TensorBoard (``Logs``), and the progress line's throughput window (``Progress``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["Console", "Logs", "Progress", "fmt_rate", "fmt_time"]


def fmt_time(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_rate(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


class Console:
    """A one-line progress bar redrawn in place on a terminal; plain log lines everywhere."""

    def __init__(self, out: TextIO, total: int):
        self.out, self.total = out, total
        self.tty = hasattr(out, "isatty") and out.isatty()
        self._bar_shown = False

    def line(self, text: str) -> None:
        if self._bar_shown:
            self.out.write("\r\033[K")
            self._bar_shown = False
        self.out.write(text + "\n")
        self.out.flush()

    def bar(self, step: int, loss: float, tok_s: float, eta: float) -> None:
        if not self.tty:
            return
        width = 24
        done = int(width * step / max(1, self.total))
        self.out.write(
            f"\r\033[K[{'#' * done}{'.' * (width - done)}] {step}/{self.total} loss {loss:.4f} "
            f"| {fmt_rate(tok_s)} tok/s | ETA {fmt_time(eta)}"
        )
        self.out.flush()
        self._bar_shown = True


def _drop_torn_line(path: Path) -> None:
    """A process killed mid-write leaves a partial last line; cut it so a resumed run appends whole
    records only."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, 2)
        if f.read(1) == b"\n":
            return
        data = f.seek(0) or f.read()
        f.truncate(data.rfind(b"\n") + 1)


class Logs:
    """metrics.jsonl + TensorBoard, append-only (a resumed run keeps writing the same files)."""

    def __init__(self, run_dir: Path):
        path = run_dir / "metrics.jsonl"
        _drop_torn_line(path)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:  # tensorboard is a dependency; tolerate its absence in embedded use
            pass

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, allow_nan=True) + "\n")
        self.file.flush()
        if self.tb is None or record["kind"] == "event":
            return
        for key, value in record.items():
            if isinstance(value, float | int) and key not in ("step", "kind"):
                self.tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])
            elif isinstance(value, list) and value and isinstance(value[0], float | int):
                layers = record.get(
                    "mod_layers" if key == "mod_ratio" else "expert_layers", range(len(value))
                )
                for layer, v in zip(layers, value, strict=False):
                    self.tb.add_scalar(f"{record['kind']}/{key}/layer{layer}", v, record["step"])

    def event(self, step: int, what: str, detail: str = "") -> None:
        self.write({"kind": "event", "step": step, "what": what, "detail": detail})

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class Progress:
    """The progress bar (every step, on a terminal) and the progress line (every ``log_every`` steps).

    The line's tok/s and MFU are over the steps since the previous line and count the steps' own time
    only (not evals, checkpoints or the orchestrator), so both describe the same window; the ETA is
    wall-clock, from the second step of this process on (the first includes compilation)."""

    def __init__(self, console: Console, start: int, flops_per_token: float, peak_flops: float):
        self.console, self.start = console, start
        self.flops_per_token, self.peak = flops_per_token, peak_flops
        self.tokens = 0.0
        self.seconds = 0.0
        self.t_after_first: float | None = None

    def update(self, step: int, total: int, record: dict[str, Any], every: int) -> None:
        self.tokens += record["tokens"]
        self.seconds += record["step_s"]
        now = time.perf_counter()
        if step == self.start + 1 or self.t_after_first is None:
            self.t_after_first, done = now, 0
        else:
            done = step - self.start - 1
        rate_now = record["tokens_per_s"]
        per_step = (now - self.t_after_first) / done if done else record["step_s"]
        eta = per_step * (total - step)
        self.console.bar(step, record["loss"], rate_now, eta)
        if step % every and step != total:
            return
        rate = self.tokens / max(self.seconds, 1e-12)
        self.tokens, self.seconds = 0.0, 0.0
        self.console.line(
            f"step {step:>6}/{total} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"gnorm {record['grad_norm']:.2f} | {fmt_rate(rate)} tok/s | "
            f"MFU {self.flops_per_token * rate / self.peak:.1%} | mem {record['memory_mb']:.0f} MB | "
            f"ETA {fmt_time(eta)}"
            + (f" | health {record['orch_health']:.0f}" if "orch_health" in record else "")
        )
