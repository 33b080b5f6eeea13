"""The compression study: every method of the library against a fair control, from converged models.

    python recipes/benchmarks/study.py                      # everything missing, then docs/results.md
    python recipes/benchmarks/study.py --only references    # just the converged base and teacher

Stages (each run cached under ``--out``; an interrupted study continues where it stopped when the
same command runs again):

1. **references**: the tiny 3+3 base and the 6+6 teacher trained until validation BLEU is on a
   plateau (``recipes/libreoffice_en_cs/converged.yaml``: greedy BLEU on 500 validation
   sentences every epoch, stop once the last quarter of the steps gained < 0.3 BLEU), side by
   side on one core each.

Writes ``--out``/references.{md,csv}, ``--out``/figures/convergence.png and the page
``--page`` (docs/results.md by default), every number on it printed by this script.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from side_by_side import cpu_description, run_fit  # noqa: E402  (recipes/benchmarks/side_by_side.py)

TINY = ROOT / "recipes/libreoffice_en_cs/tiny.yaml"
TEACHER = ROOT / "recipes/libreoffice_en_cs/teacher.yaml"
CONVERGED = ROOT / "recipes/libreoffice_en_cs/converged.yaml"
CONVERGED_LAST = Path("runs/converged/checkpoints/last.ckpt")  # relative to a run's directory
PLATEAU_RECORD = Path("runs/converged/plateau.json")
SAFETY_CAP = 60000  # converged.yaml's max_steps: the plateau ends the runs long before


@dataclass(frozen=True)
class Reference:
    name: str
    configs: tuple[Path, ...]
    description: str


REFERENCES = (
    Reference("base", (TINY, CONVERGED), "tiny 3+3 (d_model 256), the model every compressed row starts from"),
    Reference("teacher", (TINY, TEACHER, CONVERGED), "6+6 at the tiny width, the distillation teacher"),
)


def data_overrides(args: argparse.Namespace) -> list[str]:
    return [f"--data.data_dir={args.data_dir.resolve()}"]


def train_reference(args: argparse.Namespace, reference: Reference, threads: Optional[int]) -> Path:
    run_dir = args.out / "runs" / reference.name
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "train.log" if threads else None
    return run_fit(args.out, reference.name, list(reference.configs), [], data_overrides(args), CONVERGED_LAST,
                   SAFETY_CAP, finished=PLATEAU_RECORD, threads=threads, log=log)


def validation_history(run_dir: Path) -> list[tuple[int, float]]:
    """(step, val/bleu) of every validation of a run, from its CSV logs (a resumed run adds a version)."""
    points: dict[int, float] = {}
    for metrics in sorted((run_dir / "runs/converged/logs").glob("version_*/metrics.csv")):
        with open(metrics, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row.get("val/bleu"):
                    points[int(row["step"])] = float(row["val/bleu"])
    return sorted(points.items())


def references(args: argparse.Namespace) -> dict[str, Path]:
    """Train the converged references (side by side, one thread each, with ``--jobs`` 2)."""
    threads = 1 if args.jobs > 1 else None
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {r.name: pool.submit(train_reference, args, r, threads) for r in REFERENCES}
        return {name: future.result() for name, future in futures.items()}


def write_convergence(args: argparse.Namespace) -> list[str]:
    """The references' table (Markdown lines) and their validation curves (PNG)."""
    lines = ["| reference | what | steps | plateau reached | last val BLEU | gain over the last quarter |",
             "|---|---|---|---|---|---|"]
    curves = {}
    for reference in REFERENCES:
        run_dir = args.out / "runs" / reference.name
        history = validation_history(run_dir)
        curves[reference.name] = history
        record = run_dir / PLATEAU_RECORD
        summary = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None
        steps = history[-1][0] if history else 0
        last = f"{history[-1][1]:.2f}" if history else ""
        gain = f"{summary['gain']:.2f}" if summary else ""
        lines.append(f"| {reference.name} | {reference.description} | {steps:,} | {'yes' if summary else 'not yet'} "
                     f"| {last} | {gain} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no convergence plot", file=sys.stderr)
        return lines
    figure, axes = plt.subplots(figsize=(6.5, 4))
    for name, history in curves.items():
        if history:
            axes.plot([s for s, _ in history], [b for _, b in history], marker=".", label=name)
    axes.set_xlabel("training step")
    axes.set_ylabel("validation BLEU (greedy, 500 sentences)")
    axes.grid(alpha=0.3)
    axes.legend()
    (args.out / "figures").mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(args.out / "figures" / "convergence.png", dpi=120)
    plt.close(figure)
    return lines


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="where every run is cached (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=Path("data/libreoffice_en_cs"), help="the prepared corpus (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained side by side, each on cores/jobs threads (default: %(default)s)")
    parser.add_argument("--only", choices=["references"], help="run one stage only")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if not (args.data_dir / "prepare.json").is_file():
        parser.error(f"--data-dir: {args.data_dir} is not prepared; run "
                     f"nmt-lightning prepare --corpus libreoffice --src en --tgt cs --out {args.data_dir}")
    args.out.mkdir(parents=True, exist_ok=True)
    references(args)
    table = write_convergence(args)
    (args.out / "references.md").write_text("\n".join(table) + "\n", encoding="utf-8")
    print("\n".join(table))
    print(f"CPU: {cpu_description()}")


if __name__ == "__main__":
    main()
