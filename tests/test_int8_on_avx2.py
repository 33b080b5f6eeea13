"""The int8 tests again, with FBGEMM forced onto its AVX2 kernels (as on a CPU without VNNI).

FBGEMM picks its kernels by the CPU's instruction sets, and the int8 export must be right on
every x86-64 CPU, so the suite runs its int8 tests both ways on whatever machine it is on:
here with FBGEMM_ENABLE_INSTRUCTIONS=AVX2 (16-bit pair sums: static layers run 7-bit).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_int8_tests_pass_on_avx2_kernels() -> None:
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        pytest.skip(f"FBGEMM is not this machine's quantized engine ({torch.backends.quantized.engine})")
    if os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS") == "AVX2":
        pytest.skip("this run already forces AVX2 kernels")
    environment = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_int8.py", "tests/test_export.py", "tests/test_int4.py"],
                            cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
