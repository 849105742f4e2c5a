"""lumina.allocator: glibc's malloc tuned in-process (each case in a fresh interpreter: the tuning is
per process and happens once)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")


def _tune(**env: str) -> str:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LUMINA_MALLOC_TUNING"
    }
    code = "from lumina import allocator; print(allocator.tune()); print(allocator.tune())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=clean | env, capture_output=True, text=True, check=True
    )
    first, second = out.stdout.splitlines()
    assert first == second  # once per process
    return first


def test_glibc_accepts_every_setting():
    assert _tune() == "glibc: mmap threshold 32 MiB, no trimming, top pad 1 GiB"


def test_the_user_can_opt_out_and_their_malloc_variables_win():
    assert _tune(LUMINA_MALLOC_TUNING="0") == "off (LUMINA_MALLOC_TUNING=0)"
    assert _tune(MALLOC_ARENA_MAX="2") == "left to the MALLOC_* environment variables"


def test_the_driver_tunes_before_it_allocates():
    import inspect

    from lumina.driver import prepare

    src = inspect.getsource(prepare.prepare_run)
    assert src.index("allocator.tune()") < src.index("init_train_state(")
