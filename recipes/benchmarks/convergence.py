"""How close the study's references are to their plateau: a table and a figure of validation BLEU.

    python recipes/benchmarks/convergence.py --out runs/study                     # a study's runs
    python recipes/benchmarks/convergence.py --histories docs/data/convergence_h200_2026-12-04

Reads the validation history (step, greedy val/bleu on the recipe's 500 sentences) of the base
and the teacher, from a study's run directories (``--out``, their CSV logs) or from kept
``<run>.csv`` files (``--histories``, written by ``--save-histories``), and prints per run: the
validations, the last step, the last and best score, and the gain over the last quarter of the
steps by ``nmt_lightning.plateau``'s rule with the converged recipe's settings (it stops once the
gain is below 0.3 BLEU, from step 4,000 on). ``--figure`` draws the curves.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nmt_lightning.plateau import plateau_gain  # noqa: E402
from study_page import draw_curves, validation_history  # noqa: E402
from study_plan import CONVERGED  # noqa: E402

RUNS = {"base": "tiny 3+3 (the base)", "teacher": "6+6 (the teacher)"}


def plateau_rule() -> dict:
    """The PlateauStopping settings of the converged recipe (min_gain, window, min_steps, min_validations)."""
    import yaml

    callbacks = yaml.safe_load((ROOT / CONVERGED).read_text(encoding="utf-8"))["trainer"]["callbacks"]
    return next(c["init_args"] for c in callbacks if c["class_path"] == "nmt_lightning.plateau.PlateauStopping")


def read_histories(out: Optional[Path], histories: Optional[Path]) -> dict[str, list[tuple[int, float]]]:
    found = {}
    for run in RUNS:
        if out is not None:
            found[run] = validation_history(out / "runs" / run)
        else:
            path = histories / f"{run}.csv"
            if not path.is_file():
                raise SystemExit(f"convergence: {path} does not exist")
            with open(path, newline="", encoding="utf-8") as handle:
                found[run] = [(int(row["step"]), float(row["val_bleu"])) for row in csv.DictReader(handle)]
    return found


def table(found: dict[str, list[tuple[int, float]]]) -> list[str]:
    rule = plateau_rule()
    lines = ["| reference | validations | last step | last val BLEU | best val BLEU | gain over the last quarter "
             "| on the plateau |", "|---|---|---|---|---|---|---|"]
    for run, history in found.items():
        if not history:
            lines.append(f"| {RUNS[run]} | 0 | | | | | no |")
            continue
        gain = plateau_gain(history, rule["window"], rule["min_validations"])
        reached = gain is not None and gain < rule["min_gain"] and history[-1][0] >= rule["min_steps"]
        lines.append(f"| {RUNS[run]} | {len(history)} | {history[-1][0]:,} | {history[-1][1]:.2f} | "
                     f"{max(score for _, score in history):.2f} | {'' if gain is None else f'{gain:.2f}'} | "
                     f"{'yes' if reached else 'no'} |")
    return lines


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--out", type=Path, help="a study's --out directory (its runs/base and runs/teacher)")
    source.add_argument("--histories", type=Path, help="a folder of base.csv and teacher.csv (step,val_bleu)")
    parser.add_argument("--save-histories", type=Path, help="write the histories read as base.csv and teacher.csv here")
    parser.add_argument("--figure", type=Path, help="draw the curves into this PNG")
    args = parser.parse_args(argv)
    found = read_histories(args.out, args.histories)
    if args.save_histories is not None:
        args.save_histories.mkdir(parents=True, exist_ok=True)
        for run, history in found.items():
            with open(args.save_histories / f"{run}.csv", "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["step", "val_bleu"])
                writer.writerows((step, f"{score:.4f}") for step, score in history)
    if args.figure is not None:
        draw_curves({RUNS[run]: history for run, history in found.items()}, args.figure)
    print("\n".join(table(found)))


if __name__ == "__main__":
    main()
