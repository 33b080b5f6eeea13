"""The compression study's page: every number on it printed here, from the study's caches.

``write(study, args)`` scores what is trained (cached), runs the paired tests, and writes the
page (``--page``, docs/results.md by default), a CSV per table and two figures under OUT:
BLEU against bytes on disk and against CTranslate2 int8 sentences/s, every method on each.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

from nmt_lightning.plateau import plateau_gain
from side_by_side import cpu_description
from study_plan import PLATEAU, Comparison, Row, estimated_hours

TITLES = {"references": "Converged references", "qat": "Q8BERT: quantization-aware training (int8)",
          "quant_noise": "Quant-Noise: int4 and iPQ", "distillation": "Knowledge distillation: 3+3 students of the teacher",
          "mobilebert": "MobileBERT: a deep, thin student by layer-wise transfer",
          "lottery": "Lottery tickets at 20% of the weights",
          "fast_students": "Fast CPU students: a shallow decoder, structured pruning"}
SIGNIFICANCE = 0.05


def mean_sd(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def collect(study: Any) -> dict[str, dict[str, list[tuple[Row, dict]]]]:
    """table -> label -> [(row, its scores)] for every row whose run has finished (scoring it if needed)."""
    tables: dict[str, dict[str, list[tuple[Row, dict]]]] = {}
    for row in study.plan.rows:
        labels = tables.setdefault(row.table, {})
        labels.setdefault(row.label, [])
        scores = study.score(row)
        if scores is not None:
            labels[row.label].append((row, scores))
    return tables


def verdict(comparison: Comparison, difference: Optional[float], p_values: list[float]) -> str:
    if difference is None:
        return "not measured yet"
    met = difference > comparison.margin if comparison.margin >= 0 else difference >= comparison.margin
    if comparison.significant:
        met = met and bool(p_values) and all(p < SIGNIFICANCE for p in p_values)
    return "supported" if met else "not supported"


def compare(study: Any, comparison: Comparison, tables: dict) -> dict[str, Any]:
    """Mean BLEU difference over the seeds both rows have, and each seed's paired-test p-value."""
    system = {row.seed: scores for row, scores in tables[comparison.table].get(comparison.system, [])}
    baseline = {row.seed: scores for row, scores in tables[comparison.table].get(comparison.baseline, [])}
    common = sorted(set(system) & set(baseline))
    if not common:
        return {"difference": None, "p": [], "seeds": 0, "verdict": verdict(comparison, None, [])}
    tests = [study.paired(system[seed], baseline[seed]) for seed in common]
    difference = statistics.fmean(system[s]["bleu"] - baseline[s]["bleu"] for s in common)
    p_values = [test["bleu_p_value"] for test in tests]
    return {"difference": difference, "p": p_values, "seeds": len(common),
            "verdict": verdict(comparison, difference, p_values)}


def table_lines(study: Any, table: str, labels: dict[str, list[tuple[Row, dict]]], reference_bytes: Optional[int],
                out: Path) -> list[str]:
    header = ["method", "seeds", "BLEU (mean ± sd)", "chrF2", "bytes on disk", "compression", "steps",
              "CTranslate2 int8 sentences/s", "unequal or single seed"]
    rows = []
    for label, entries in labels.items():
        planned = [row for row in study.plan.rows if row.table == table and row.label == label]
        if not entries:
            rows.append([label, f"0 of {len(planned)}", "not trained yet", "", "", "", "", "", planned[0].unequal])
            continue
        bleu = [scores["bleu"] for _, scores in entries]
        chrf = [scores["chrf"] for _, scores in entries]
        size = statistics.median(scores["bytes"] for _, scores in entries)
        speeds = [s["sentences_per_second"] for s in (study.speed(row) for row, _ in entries)
                  if s and s.get("sentences_per_second")]
        steps = sorted({scores["step"] for _, scores in entries})
        rows.append([label, f"{len(entries)} of {len(planned)}", mean_sd(bleu), mean_sd(chrf), f"{int(size):,}",
                     f"x{reference_bytes / size:.1f}" if reference_bytes else "", "/".join(f"{s:,}" for s in steps),
                     f"{statistics.fmean(speeds):.1f}" if speeds else "", entries[0][0].unequal])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{table}.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *rows])
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def comparison_lines(study: Any, table: str, tables: dict) -> list[str]:
    lines = ["| the paper's claim | system | baseline | BLEU difference (mean) | p per seed (paired bootstrap) | "
             "our numbers |", "|---|---|---|---|---|---|"]
    for comparison in (c for c in study.plan.comparisons if c.table == table):
        found = compare(study, comparison, tables)
        difference = "" if found["difference"] is None else f"{found['difference']:+.2f}"
        p_values = ", ".join(f"{p:.3f}" for p in found["p"])
        lines.append(f"| {comparison.claim} | {comparison.system} | {comparison.baseline} | {difference} | "
                     f"{p_values} | {found['verdict']} |")
    return lines


def plot(points: list[tuple[str, float, float, Optional[float]]], out: Path) -> list[Path]:
    """BLEU against bytes and against CTranslate2 int8 speed, a point per method (label)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figures", file=sys.stderr)
        return []
    written = []
    for name, index, axis in (("bleu_vs_bytes", 2, "bytes on disk (MB, log scale)"),
                              ("bleu_vs_speed", 3, "CTranslate2 int8 sentences/s (2 threads, beam 4)")):
        chosen = [p for p in points if p[index] is not None]
        if not chosen:
            continue
        figure, axes = plt.subplots(figsize=(8, 5))
        for label, bleu, size, speed in chosen:
            x = size / 1e6 if index == 2 else speed
            axes.scatter(x, bleu, s=40)
            axes.annotate(label, (x, bleu), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if index == 2:
            axes.set_xscale("log")
        axes.set_xlabel(axis)
        axes.set_ylabel("BLEU (test split, beam 4; mean of seeds)")
        axes.grid(True, which="both", alpha=0.3)
        figure.tight_layout()
        path = out / f"study_{name}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written


def write(study: Any, args: argparse.Namespace) -> Path:
    out = args.out
    tables = collect(study)
    figures = args.page.parent / "figures"  # beside the page, so the page's links work where it is kept
    figures.mkdir(parents=True, exist_ok=True)
    convergence = reference_lines(study, out, figures)
    now = datetime.date.today().isoformat()
    smoke = (f"**Smoke run**: every budget {args.smoke} steps and a small model; these numbers test the "
             f"machinery, not the methods.\n\n" if args.smoke else "")
    lines = [
        "# The compression study",
        "",
        f"Generated by `python recipes/benchmarks/study.py` on {now} ({cpu_description()}); every number "
        f"below is printed by that command from its caches in `{out.name}/`. Do not edit this page by hand.",
        "",
        smoke + "Every compressed row starts from the converged base (or, for students, the converged "
        "teacher) and trains as many steps as its control; the rows that cannot say what is unequal. "
        "Headline rows have several seeds (mean ± sd); p-values are sacrebleu's paired bootstrap test "
        f"(1,000 resamples) of one seed's system against the same seed's baseline, one per seed. Test "
        f"split: {args.test_sentences or 'all'} sentences, beam 4.",
        "",
        "## The compute plan",
        "",
        "Every run of the study, its steps and its estimated hours on 2 CPU cores alone (the tiny model "
        "trains about 1.8 steps/s; the references' steps are their plateau's once reached):",
        "",
    ]
    lines += plan_lines(study, PLATEAU)
    lines += ["", "## " + TITLES["references"], ""] + convergence
    bytes_of_fp32 = next((scores["bytes"] for label, entries in tables.get("qat", {}).items()
                          if label.startswith("fp32") for _, scores in entries), None)
    points = []
    for table in ("qat", "quant_noise", "distillation", "mobilebert", "lottery", "fast_students"):
        lines += ["", "## " + TITLES[table], ""]
        lines += table_lines(study, table, tables.get(table, {}), bytes_of_fp32, out / "tables")
        lines += ["", *comparison_lines(study, table, tables)]
        for label, entries in tables.get(table, {}).items():
            if entries:
                speeds = [s["sentences_per_second"] for s in (study.speed(r) for r, _ in entries)
                          if s and s.get("sentences_per_second")]
                points.append((f"{table}: {label}", statistics.fmean(e["bleu"] for _, e in entries),
                               statistics.median(e["bytes"] for _, e in entries),
                               statistics.fmean(speeds) if speeds else None))
    written = plot(points, figures)
    lines += ["", "## Every method on one figure", ""]
    lines += [f"![{path.stem}]({relative(path, args.page)})" for path in written] or ["No row is scored yet."]
    text = "\n".join(lines) + "\n"
    if not args.smoke:
        write_summary(summary_lines(study, tables), args.readme)
    args.page.parent.mkdir(parents=True, exist_ok=True)
    args.page.write_text(text, encoding="utf-8")
    (out / "results.md").write_text(text, encoding="utf-8")
    print(f"study: wrote {args.page}", file=sys.stderr)
    return args.page


def relative(path: Path, page: Path) -> str:
    import os

    return os.path.relpath(path, page.parent)


def plan_lines(study: Any, plateau: str) -> list[str]:
    header = "| run | table | kind | seed | steps | starts from | estimated hours | status |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    total = 0.0
    for name, run in study.plan.runs.items():
        reached = None
        record = study.out / "runs" / name / plateau
        if record.is_file():
            reached = json.loads(record.read_text())["stopped_at"]
        hours = estimated_hours(run, reached or 15000)
        total += hours
        status = "done" if study.finished(name) else "not yet"
        steps = f"{reached:,} (plateau)" if reached else ("until the plateau" if run.kind in ("reference", "teacher")
                                                           else f"{run.steps:,}")
        lines.append(f"| {name} | {study.table_of(run)} | {run.kind} | {run.seed} | {steps} | {run.start or ''} | "
                     f"{hours:.2f} | {status} |")
    lines.append(f"| all | | | | | | {total:.1f} | |")
    return lines


def reference_lines(study: Any, out: Path, figures: Path) -> list[str]:
    """The references' plateau table and their validation curves (a figure)."""
    lines = ["Trained until validation BLEU (greedy, first 500 validation sentences, every epoch) gained less "
             "than 0.3 BLEU over the last quarter of the steps (mean of the last quarter's scores against the "
             "quarter's before it; `nmt_lightning.plateau`).", "",
             "| reference | trained on | steps | plateau reached | last validation BLEU | gain over the last quarter "
             "| test BLEU (beam 4) |", "|---|---|---|---|---|---|---|"]
    curves = {}
    for row in (r for r in study.plan.rows if r.table == "references"):
        history = validation_history(out / "runs" / row.run)
        curves[row.label] = history
        record = out / "runs" / row.run / PLATEAU
        summary = json.loads(record.read_text()) if record.is_file() else None
        scores = study.score(row)
        steps, last = (f"{history[-1][0]:,}", f"{history[-1][1]:.2f}") if history else ("0", "")
        # The decision's gain once on the plateau; until then the same rule on the history so far.
        gain_value = summary["gain"] if summary else plateau_gain(history)
        gain = "" if gain_value is None else f"{gain_value:.2f}"
        test = f"{scores['bleu']:.2f}" if scores else ""
        lines.append(f"| {row.label} | {trained_on(out / 'runs' / row.run)} | {steps} | "
                     f"{'yes' if summary else 'not yet'} | {last} | {gain} | {test} |")
    if any(curves.values()) and draw_curves(curves, figures / "study_convergence.png"):
        lines += ["", f"![convergence]({relative(figures / 'study_convergence.png', study.args.page)})"]
    return lines


def draw_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> bool:
    """Validation BLEU against steps, one line per label, into ``path`` (PNG); False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(6.5, 4))
    for label, history in curves.items():
        if history:
            axes.plot([s for s, _ in history], [b for _, b in history], marker=".", label=label)
    axes.set_xlabel("training step")
    axes.set_ylabel("validation BLEU (greedy, 500 sentences)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def trained_on(run_dir: Path) -> str:
    """The accelerator a run trained on, from its run.json (``--accelerator`` of the study), else the recipe's CPU."""
    record = run_dir / "run.json"
    overrides = json.loads(record.read_text(encoding="utf-8")).get("overrides", []) if record.is_file() else []
    chosen = [option.split("=", 1)[1] for option in overrides if option.startswith("--trainer.accelerator=")]
    return chosen[-1].upper() if chosen else "CPU"


def validation_history(run_dir: Path) -> list[tuple[int, float]]:
    """(step, val/bleu) of every validation of a run, from its CSV logs (a resumed run adds a version)."""
    points: dict[int, float] = {}
    for metrics in sorted(run_dir.glob("runs/*/logs/version_*/metrics.csv")):
        with open(metrics, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row.get("val/bleu"):
                    points[int(row["step"])] = float(row["val/bleu"])
    return sorted(points.items())


SUMMARY_START = "<!-- study summary: written by recipes/benchmarks/study.py -->"
SUMMARY_END = "<!-- end of the study summary -->"


def summary_lines(study: Any, tables: dict) -> list[str]:
    """The README's summary: every claim of the study with our mean difference and verdict."""
    found = [(comparison, compare(study, comparison, tables)) for comparison in study.plan.comparisons]
    measured = [(c, f) for c, f in found if f["difference"] is not None]
    if not measured:
        return ["The study has not finished: its converged references are still training, so no method is",
                "compared yet. Each method's page gives the measurements made before the study, with their",
                "budgets and seeds said where the numbers are."]
    lines = [f"{len(measured)} of {len(found)} comparisons measured so far ({datetime.date.today().isoformat()}, "
             f"{cpu_description()}); the rest in [docs/results.md](docs/results.md) as they finish.", "",
             "| the paper's claim | system − baseline, BLEU | seeds | p per seed | our numbers |", "|---|---|---|---|---|"]
    for comparison, result in measured:
        lines.append(f"| {comparison.claim} | {result['difference']:+.2f} ({comparison.system} − {comparison.baseline}) "
                     f"| {result['seeds']} | {', '.join(f'{p:.3f}' for p in result['p'])} | {result['verdict']} |")
    return lines


def write_summary(lines: list[str], readme: Path) -> None:
    """Replace the README's text between the summary markers (left alone when they are missing)."""
    if not readme.is_file():
        return
    text = readme.read_text(encoding="utf-8")
    if SUMMARY_START not in text or SUMMARY_END not in text:
        return
    head, rest = text.split(SUMMARY_START, 1)
    _, tail = rest.split(SUMMARY_END, 1)
    readme.write_text(head + SUMMARY_START + "\n" + "\n".join(lines) + "\n" + SUMMARY_END + tail, encoding="utf-8")
