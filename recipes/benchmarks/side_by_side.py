"""Reporting for benchmarks that run alternatives in turns: the median of each, as a table."""

from __future__ import annotations

import statistics


def median_table(what: str, runs: dict[str, list[float]], unit: str, digits: int) -> tuple[dict[str, float], str]:
    """(median per alternative, markdown table of the medians and every run)."""
    medians = {name: statistics.median(values) for name, values in runs.items()}
    lines = [f"| {what} | {unit} (median) | runs |", "|---|---|---|"]
    lines += [f"| {name} | {medians[name]:.{digits}f} | {', '.join(f'{v:.{digits}f}' for v in values)} |"
              for name, values in runs.items()]
    return medians, "\n".join(lines)
