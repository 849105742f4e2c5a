"""Build glue: maps `kernels/` to the import name `lumina_kernels` and builds the native op library
`lumina_kernels._C` with CMake (CMakeLists.txt) against the torch already installed in the running
interpreter. Metadata lives in pyproject.toml.

Run without build isolation (`pip install --no-build-isolation -e .`, as the Makefile does): torch is
not a build requirement, so an isolated build simply skips the native ops instead of downloading a
second torch.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _tool(name: str) -> str | None:
    """The build tool installed in this interpreter's environment (pip `cmake` / `ninja`), else PATH."""
    try:
        module = __import__(name)
        path = Path(module.CMAKE_BIN_DIR if name == "cmake" else module.BIN_DIR) / name
        if path.exists():
            return str(path)
    except (ImportError, AttributeError):
        pass
    return shutil.which(name)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        cmake, ninja = _tool("cmake"), _tool("ninja")
        if cmake is None:
            raise RuntimeError("cmake not found: `pip install cmake ninja` (the Makefile does) and retry")
        build_dir = ROOT / "build" / "cmake"
        stage_dir = build_dir / "out"
        configure = [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DLUMINA_OUTPUT_DIR={stage_dir}",
        ]
        if ninja and not (build_dir / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        subprocess.run(configure, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)
        built = sorted(stage_dir.glob("_C*.so")) if stage_dir.exists() else []
        target = Path(self.get_ext_fullpath(ext.name))
        if not built:
            # CMake printed why (no importable torch, no sources); lumina falls back to the reference.
            print(f"lumina: native ops not built; {ext.name} will be missing", file=sys.stderr)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built[0], target)


packages = find_packages(include=["lumina", "lumina.*"])
packages += ["lumina_kernels"] + [f"lumina_kernels.{p}" for p in find_packages("kernels")]

setup(
    packages=packages,
    ext_modules=[CMakeExtension("lumina_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
