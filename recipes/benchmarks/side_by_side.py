"""Reporting for benchmarks that run alternatives in turns: the median of each, as a table, and the CPU."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Sequence


def median_table(what: str, runs: dict[str, list[float]], unit: str, digits: int) -> tuple[dict[str, float], str]:
    """(median per alternative, markdown table of the medians and every run)."""
    medians = {name: statistics.median(values) for name, values in runs.items()}
    lines = [f"| {what} | {unit} (median) | runs |", "|---|---|---|"]
    lines += [f"| {name} | {medians[name]:.{digits}f} | {', '.join(f'{v:.{digits}f}' for v in values)} |"
              for name, values in runs.items()]
    return medians, "\n".join(lines)


def write_table(csv_path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Write ``rows`` under ``header`` to ``csv_path``; return the same table as Markdown lines."""
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *rows])
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def cpu_description() -> str:
    """The processor's model name and the instruction sets int8 matrix products use (Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    int8_flags = [flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if flag in flags]
    return f"{name} ({', '.join(int8_flags) or 'no AVX2'})"
