"""Fast CPU models from a base you have: structured pruning against its control, the shallow-decoder
students of a teacher, all measured by ``efficiency.py``.

    python recipes/benchmarks/fast_students.py --out runs/fast_students \\
        --base runs/libreoffice_en_cs_tiny/checkpoints/last.ckpt \\
        [--teacher runs/libreoffice_en_cs_teacher/checkpoints/last.ckpt]

The compression study (``study.py``) measures the same rows from its converged references;
this driver measures them from any trained base and teacher, for a first look before the
references exist or on another corpus. It trains, each run cached and resumed after an
interruption (``side_by_side.run_fit``), ``--jobs`` side by side:

- ``control``: the base fine-tuned ``--steps`` steps in fp32 (``finetune.yaml``): the unpruned
  model of the same budget;
- ``structured``: the same from the same checkpoint, the same steps and seed, with
  ``StructuredPruning`` removing half of the heads and feed-forward neurons of every layer on the
  study's schedule (every tenth of the steps from the first tenth to seven tenths, then recovery);
- with ``--distill``: ``structured`` with word-level KD from the base alongside (the model being
  pruned learns from itself unpruned);
- with ``--teacher``: the 6+2 and 6+1 students (the teacher's whole encoder and its decoder
  layers [2, 5] or [5], word-level KD), ``--student-steps`` steps each.

Then ``efficiency.py`` measures every model on every engine into ``--out``/efficiency (the first
model, the teacher when given, else the control, is the reference of its ratios; run it while
nothing else runs), and sacrebleu's paired bootstrap test of each compressed model against its
comparison (our decoder, fp32) goes to ``--out``/fast_students.md. Arguments after ``--`` go to
``efficiency.py`` (e.g. ``-- --rounds 2``).
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from side_by_side import cached, file_slug, run_fit  # noqa: E402
from study_plan import (FINETUNE, RESULT, STUDENT_DECODER_LAYERS, TINY, distillation,  # noqa: E402
                        structured_pruning)

ROOT = Path(__file__).resolve().parents[2]


def runs(args: argparse.Namespace) -> dict[str, dict]:
    """name -> what run_fit needs: configs, add-ons, overrides, result, steps."""
    common = [f"--data.data_dir={args.data_dir}", f"--seed_everything={args.seed}", f"--data.seed={args.seed}",
              "--model.val_bleu_sentences=100", *args.override]
    finetune = {"configs": [ROOT / TINY, ROOT / FINETUNE], "result": Path(RESULT["finetune"]), "steps": args.steps,
                "overrides": common + [f"--model.init_from={args.base.resolve()}"]}
    planned = {"control": {**finetune, "add_ons": []},
               "structured": {**finetune, "add_ons": [structured_pruning(args.steps)]}}
    if args.distill:  # the unpruned base teaches the model it is pruned into (word-level KD)
        planned["structured_kd"] = {**finetune, "add_ons": [structured_pruning(args.steps),
                                                            distillation(str(args.base.resolve()))]}
    if args.teacher is not None:
        teacher = str(args.teacher.resolve())
        for decoder_layers, picked in STUDENT_DECODER_LAYERS.items():
            planned[f"student_6_{decoder_layers}"] = {
                "configs": [ROOT / TINY], "result": Path(RESULT["student"]), "steps": args.student_steps,
                "add_ons": [distillation(teacher)],
                "overrides": common + ["--model.encoder_layers=6", f"--model.decoder_layers={decoder_layers}",
                                       f"--model.init_from={teacher}",
                                       f"--model.init_layers={{encoder: [0, 1, 2, 3, 4, 5], decoder: {picked}}}"]}
    return planned


def train(args: argparse.Namespace, planned: dict[str, dict]) -> dict[str, Path]:
    """Every run's final checkpoint, ``--jobs`` trained side by side (one thread each when > 1)."""
    threads = 1 if args.jobs > 1 else None

    def fit(name: str) -> Path:
        run = planned[name]
        log = args.out / "runs" / name / "train.log" if threads else None  # run_fit makes the directory
        return run_fit(args.out, name, run["configs"], run["add_ons"], run["overrides"], run["result"], run["steps"],
                       threads=threads, log=log)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        return dict(zip(planned, pool.map(fit, planned)))


def paired_tests(args: argparse.Namespace, names: dict[str, str]) -> list[str]:
    """Markdown lines: each compressed model against its comparison, our decoder in fp32 (paired bootstrap)."""
    from nmt_lightning.evaluation import paired_comparison, read_lines

    references = read_lines(args.data_dir / "test.cs")
    translations = args.out / "efficiency" / "translations"
    pairs = [("structured", "control")] + [("structured_kd", "control")] * args.distill
    pairs += [(f"student_6_{d}", "teacher") for d in STUDENT_DECODER_LAYERS if args.teacher]
    lines = ["| system | baseline | BLEU | baseline BLEU | difference | p-value |", "|---|---|---|---|---|---|"]
    for system, baseline in pairs:
        def hypotheses(run: str) -> list[str]:
            return read_lines(translations / f"{file_slug(f'{names[run]}, ours fp32')}.cs")

        found = cached(args.out / "paired" / f"{system}_vs_{baseline}.json",
                       lambda: paired_comparison(hypotheses(baseline), hypotheses(system), references).as_dict())
        lines.append(f"| {names[system]} | {names[baseline]} | {found['system_bleu']:.2f} | "
                     f"{found['baseline_bleu']:.2f} | {found['system_bleu'] - found['baseline_bleu']:+.2f} | "
                     f"{found['bleu_p_value']:.4f} |")
    return lines


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    forwarded = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/fast_students"))
    parser.add_argument("--data-dir", type=Path, default=Path("data/libreoffice_en_cs"))
    parser.add_argument("--base", type=Path, required=True, help="the trained base the pruning starts from")
    parser.add_argument("--distill", action="store_true",
                        help="also prune with word-level KD from the base alongside (structured_kd)")
    parser.add_argument("--teacher", type=Path, help="a trained 6+6 teacher: adds the 6+2 and 6+1 students")
    parser.add_argument("--steps", type=int, default=1000, help="steps of the pruning and its control (default: %(default)s)")
    parser.add_argument("--student-steps", type=int, default=1400, help="steps of each student (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2, help="runs trained side by side (default: %(default)s)")
    parser.add_argument("--override", action="append", default=[], metavar="OPTION",
                        help="an nmt-lightning fit option for every run, e.g. --override=--model.d_model=32 (repeat)")
    args = parser.parse_args(argv)
    args.out, args.data_dir = args.out.resolve(), args.data_dir.resolve()  # each run trains in its own directory
    for option, path in (("--base", args.base), ("--teacher", args.teacher)):
        if path is not None and not path.is_file():
            parser.error(f"{option} {path}: no such checkpoint")
    if not (args.data_dir / "test.en").is_file():
        parser.error(f"--data-dir {args.data_dir}: not a prepared corpus (run nmt-lightning prepare first)")
    if min(args.steps, args.student_steps, args.jobs) < 1:
        parser.error("--steps, --student-steps and --jobs must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoints = train(args, runs(args))
    names = {"teacher": "teacher 6+6", "control": "unpruned (control)", "structured": "half heads and neurons removed",
             "structured_kd": "half removed, KD from the base",
             "student_6_2": "student 6+2", "student_6_1": "student 6+1"}
    models = ({"teacher": args.teacher.resolve()} if args.teacher else {}) | checkpoints
    import efficiency

    efficiency.main(["--out", str(args.out / "efficiency"), "--data-dir", str(args.data_dir),
                     *[f"--model={names[run]}={path}" for run, path in models.items()], *forwarded])
    lines = ["# Fast CPU models: paired tests", "", *paired_tests(args, names), "",
             "sacrebleu's paired bootstrap resampling (1,000 samples) on the whole test split, beam as in "
             "efficiency.md, our decoder in fp32. Trained: " + json.dumps({name: str(path) for name, path in
                                                                        models.items()}),
             "", "Reproduce: python recipes/benchmarks/fast_students.py " + " ".join(argv)
             + (" -- " + " ".join(forwarded) if forwarded else "")]
    (args.out / "fast_students.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
