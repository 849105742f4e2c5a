"""lumina.report: the PNG is written at its exact size from messy, partial and dense-model metrics."""

import json
import math
import struct

import pytest

from lumina.report import DPI, FIGSIZE, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _train(step: int, moe: bool) -> dict:
    rec = {
        "kind": "train",
        "step": step,
        "loss": 10.0 * math.exp(-step / 20) + 2.0,
        "lr": 3e-4 * min(1.0, step / 5),
        "grad_norm": 5.0 / step,
        "tokens_per_s": 1000.0 + step,
        "mfu": 0.3,
        "memory_mb": 2048.0,
        "unknown_field": {"ignored": True},
    }
    if moe:
        hot = [0.4, 0.2, 0.2, 0.2]
        rec |= {"expert_load": [hot, hot[::-1]], "expert_layers": [1, 3], "dropped": [0.01, 0.02]}
        rec |= {"mod_ratio": [0.13, 0.125], "mod_layers": [0, 2]}
    return rec


def _write(run_dir, lines: list) -> None:
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)
    (run_dir / "metrics.jsonl").write_text(text + "\n")


def test_full_report_has_exact_size(tmp_path):
    lines: list = []
    for step in range(1, 51):
        lines.append(_train(step, moe=True))
        if step % 10 == 0:
            lines.append(
                {"kind": "eval", "step": step, "loss": 3.0 - step / 100, "ppl": 20.0, "accuracy": 0.3}
            )
    lines[7]["loss"] = float("nan")  # json.dumps writes NaN; the point is skipped
    lines[8]["grad_norm"] = None
    lines.insert(20, "{not json")
    lines += [
        {
            "kind": "decision",
            "step": 25,
            "action": "lower_lr",
            "level": 2,
            "confidence": 0.9,
            "reason": "spike",
        },
        {"kind": "event", "step": 30, "what": "resume", "detail": "step 30"},
        {"kind": "something_new", "step": 31},
        {"kind": "decision", "step": 32, "action": None, "level": [1], "confidence": None},  # odd types
        {"kind": "event", "step": 33, "what": ["resume"], "detail": None},
        {**_train(51, moe=False), "expert_load": [None, [float("inf"), 0.5]], "mod_ratio": "n/a"},
        '{"kind": "train", "step": 5',  # cut off mid-write: normal, not counted
    ]
    _write(tmp_path, lines)
    (tmp_path / "config.json").write_text(json.dumps({"preset": "debug", "train": {"steps": 50}}))

    png = write_report(tmp_path)

    assert png == tmp_path / "report.png"
    assert _png_size(png) == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))


def test_dense_single_record_without_eval(tmp_path):
    _write(tmp_path, [_train(1, moe=False)])
    assert _png_size(write_report(str(tmp_path))) == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))


def test_is_deterministic(tmp_path):
    _write(tmp_path, [_train(step, moe=True) for step in range(1, 8)])
    first = write_report(tmp_path).read_bytes()
    assert write_report(tmp_path).read_bytes() == first


def test_missing_metrics_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        write_report(tmp_path)


@pytest.mark.parametrize("content", ["", "\n\n", "{broken\n", '{"kind": "event", "step": 3, "what": "x"}\n'])
def test_nothing_to_plot_names_the_file(tmp_path, content):
    (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(ValueError, match="metrics.jsonl"):
        write_report(tmp_path)


def test_read_counts_bad_lines_but_not_a_cut_off_tail(tmp_path):
    from lumina.report import _read, _series

    path = tmp_path / "metrics.jsonl"
    lines = [_train(1, moe=False), "{bad", "[1, 2]", {"kind": "train", "step": "two"}, _train(2, moe=False)]
    lines.append({**_train(1, moe=False), "loss": 7.0})  # step 1 replayed after a resume: this one wins
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + '\n{"kind": "tr')
    recs, unreadable = _read(path)
    assert unreadable == 3
    steps, loss = _series(recs["train"], "loss")
    assert steps.tolist() == [1.0, 2.0] and loss[0] == 7.0
