"""nmt_lightning.cpu_allocator: when the command re-runs itself with glibc's malloc settings, and that it runs once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nmt_lightning.cpu_allocator import OPT_OUT, THRESHOLD, VARIABLES, tuned_environment


def test_glibc_gets_both_thresholds() -> None:
    environment = tuned_environment({"PATH": "/bin"}, libc="glibc")
    assert environment == {"PATH": "/bin", **{name: THRESHOLD for name in VARIABLES}}


@pytest.mark.parametrize("environ, libc", [
    ({}, ""),  # musl, macOS, Windows: their own allocators
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "glibc"),  # the user's own setting wins
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, "glibc"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "glibc"),
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, "glibc"),
    ({OPT_OUT: "1"}, "glibc"),
])
def test_nothing_to_do(environ: dict, libc: str) -> None:
    assert tuned_environment(environ, libc=libc) is None


@pytest.mark.skipif(tuned_environment({}) is None, reason="only glibc's malloc is tuned")
def test_the_process_runs_once_more_with_the_settings() -> None:
    code = ("import os; from nmt_lightning.cpu_allocator import relaunch_with_tuned_allocator as r; "
            "print('started', flush=True); r(); print(os.environ['MALLOC_MMAP_THRESHOLD_'])")
    environment = {name: value for name, value in os.environ.items() if name not in (*VARIABLES, OPT_OUT)}
    environment.pop("LD_PRELOAD", None)
    result = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["started", "started", THRESHOLD]  # once as given, once relaunched, then on
