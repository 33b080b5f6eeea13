"""What the benchmarks share: alternatives run in turns, cached results, tables, the CPU."""

from __future__ import annotations

import csv
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence


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


def cached(path: Path, compute: Callable[[], Any]) -> Any:
    """``compute()``'s JSON result, computed once: an interrupted benchmark reads it back."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return value


def checkpoint_step(checkpoint: Path) -> int:
    """The global step a Lightning checkpoint was saved at (0 if there is none); loaded safely.
    A run is finished only at its last step: ``last.ckpt`` is also written at epoch ends."""
    from nmt_lightning.checkpoint_file import read_checkpoint

    if not checkpoint.is_file():
        return 0
    return int(read_checkpoint(checkpoint).get("global_step", 0))


def translation_speed_rounds(path: Path, models: dict[str, Any], lines: list[str], rounds: int) -> list[dict[str, float]]:
    """Sentences/s with beam 4 of every model (TranslationModules in this process) in each of
    ``rounds`` rounds, models taking turns in an order that rotates per round; the rounds are
    cached in ``path`` (JSON), and cached rounds that measured other models are measured again."""
    from nmt_lightning.translate import translate_lines

    done: list[dict] = json.loads(path.read_text()) if path.is_file() else []
    done = [r for r in done if set(r) == set(models)]
    names = list(models)
    while len(done) < rounds:
        shift = len(done) % len(names)
        speeds = {}
        for name in names[shift:] + names[:shift]:
            translate_lines(models[name], lines[:32], beam=4, progress=False)  # warm-up
            started = time.perf_counter()
            translate_lines(models[name], lines, beam=4, progress=False)
            speeds[name] = len(lines) / (time.perf_counter() - started)
            print(f"round {len(done) + 1}: {name}: {speeds[name]:.1f} sentences/s", file=sys.stderr, flush=True)
        done.append(speeds)
        path.write_text(json.dumps(done, indent=1))
    return done
