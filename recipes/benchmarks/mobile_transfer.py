"""The seed's MobileBERT table for translation: a deep, thin bottleneck student of the 6+6 teacher.

    python recipes/benchmarks/mobile_transfer.py --out runs/mobile_transfer

The teacher is the distillation benchmark's (``recipes/libreoffice_en_cs/teacher.yaml``: 6+6
layers of width 256; trained first if missing). The student is ``bottleneck.yaml``'s
``tiny-bottleneck`` preset: the teacher's depth and width between blocks, 64-wide blocks with two
stacked feed-forward layers, 128-wide embeddings. Every student trains ``--steps`` steps with
the tiny recipe; only what the row names changes:

| row | student |
|---|---|
| from scratch | label-smoothed cross-entropy only |
| JKT | all layers' transfer losses together for 12 x ``--stage-steps`` steps, then distillation |
| AKT | transfer losses added to the distillation loss from the first step |
| PKT | one layer per stage (``--stage-steps`` each, encoder then decoder), then distillation |
| PKT + QAT, int8 | the PKT student, ``--qat-steps`` of QAT, exported to int8 |
| JKT / PKT, teacher's embeddings | as JKT / PKT, the student starting from the teacher's embedding table factorised to its 128 columns (truncated SVD), output projection and final norms (``init_layers: none``) |
| PKT, teacher's embeddings + QAT, int8 | that PKT student, ``--qat-steps`` of QAT, exported to int8 |

(distillation: 0.5 cross-entropy + 0.5 the teacher's soft targets at T = 1; transfer: the
normalised squared error of layer outputs x 100 plus the KL of attention maps.)

Columns: parameters, bytes on disk (fp32 export; int8 for the last row), BLEU and chrF2 on the
test split with beam 4 (and greedy), CPU sentences/s with beam 4 relative to the teacher
(``--rounds`` rounds over the first ``--sentences`` test sentences, models taking turns). A
profile of beam search (operator calls and time per sentence, teacher against student) tells
why the deep, thin shape is or is not faster than its parameter count promises.

``--rows`` trains and compares only some students (e.g. ``--rows scratch pkt`` with longer
stages: ``--steps 4280 --stage-steps 240`` keeps the 1,400-step distillation stage; the
teacher's-embeddings rows ``jkt_embed pkt_embed pkt_embed_qat`` run only when named); use a new
OUT for other ``--steps`` or ``--stage-steps``, since finished runs are reused by name.

Everything is cached in OUT (runs, exports, scores, speed rounds, profiles): an interrupted run
continues where it stopped when the same command is run again. Writes OUT/mobile_transfer_table.md
and .csv.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the callbacks package lives at the top of the repository

from side_by_side import (cached, cpu_description, export_and_score, file_slug, prepared_test_split,  # noqa: E402
                          run_fit, translation_speed_rounds, write_table)  # recipes/benchmarks/side_by_side.py

TINY = ROOT / "recipes/libreoffice_en_cs/tiny.yaml"
BOTTLENECK = ROOT / "recipes/libreoffice_en_cs/bottleneck.yaml"
FINETUNE = ROOT / "recipes/libreoffice_en_cs/finetune.yaml"
QAT = ROOT / "recipes/compress/qat.yaml"
TEACHER = ROOT / "runs/libreoffice_en_cs_teacher/checkpoints/last.ckpt"
TRAINED = Path("runs/libreoffice_en_cs_bottleneck/checkpoints/last.ckpt")  # relative to a student's run directory
FINETUNED = Path("runs/libreoffice_en_cs_bottleneck_finetune_qat/checkpoints/last.ckpt")  # + finetune + qat.yaml
QAT_STEPS = 300  # --qat-steps by default
LAYERS = 12  # 6 encoder + 6 decoder layers: one PKT stage each
ROWS = ("scratch", "jkt", "akt", "pkt", "pkt_qat")  # the students, as --rows names them (the default)
EMBEDDING_ROWS = ("jkt_embed", "pkt_embed", "pkt_embed_qat")  # JKT / PKT from the teacher's factorised embeddings, when named


def transfer_yaml(teacher: Path, mode: str, stage_steps: int) -> str:
    init_args = {"teacher": str(teacher), "mode": mode, "stage_steps": stage_steps, "feature_weight": 100.0,
                 "attention_weight": 1.0, "soft_weight": 0.5, "hard_weight": 0.5, "temperature": 1.0}
    return json.dumps({"trainer": {"callbacks+": [{"class_path": "callbacks.ProgressiveKnowledgeTransfer",
                                                   "init_args": init_args}]}})


def build_rows(args: argparse.Namespace) -> list[tuple[str, Path, Optional[str]]]:
    """(row, checkpoint, export --quantize), training what is missing."""
    from distillation import teacher_checkpoint  # recipes/benchmarks/distillation.py trains the shared teacher

    teacher = teacher_checkpoint(args)
    data = [f"--data.data_dir={args.data_dir}"]

    def student(name: str, add_ons: list[str], options: tuple[str, ...] = ()) -> Path:
        return run_fit(args.out, name, [TINY, BOTTLENECK], add_ons, [*data, *options], TRAINED, args.steps)

    wanted = set(args.rows) | {row.removesuffix("_qat") for row in args.rows}  # a QAT row brings its student
    rows = [("teacher (6+6, width 256)", teacher, "fp32")]
    if "scratch" in wanted:
        rows.append(("bottleneck student from scratch", student("scratch", []), "fp32"))
    for key, mode, name in (("jkt", "joint", "JKT"), ("akt", "auxiliary", "AKT"), ("pkt", "progressive", "PKT")):
        if key in wanted:
            rows.append((name, student(key, [transfer_yaml(teacher, mode, args.stage_steps)]), "fp32"))
    from_teacher = (f"--model.init_from={teacher}", "--model.init_layers=none")
    for key, mode, name in (("jkt_embed", "joint", "JKT, teacher's embeddings"),
                            ("pkt_embed", "progressive", "PKT, teacher's embeddings")):
        if key in wanted:
            rows.append((name, student(key, [transfer_yaml(teacher, mode, args.stage_steps)], from_teacher), "fp32"))
    for key, base in (("pkt_qat", "PKT"), ("pkt_embed_qat", "PKT, teacher's embeddings")):
        if key in args.rows:  # the PKT student, fine-tuned with QAT and exported to int8
            start = next(checkpoint for name, checkpoint, _ in rows if name == base)
            deployed = run_fit(args.out, key, [TINY, BOTTLENECK, FINETUNE, QAT], [],
                               [*data, f"--model.init_from={start}"], FINETUNED, args.qat_steps)
            rows.append((f"{base} + QAT, int8", deployed, None))
    return rows


def decoding_profile(models: dict, lines: list[str]) -> dict[str, dict[str, float]]:
    """Per model, for beam-4 translation of ``lines`` under torch.profiler: operator calls per
    sentence and the share of the operators' self CPU time spent in matrix products (a deep,
    thin model makes more, smaller calls). Wall time comes from the speed rounds, not from
    here: the profiler's own overhead grows with the number of calls."""
    from torch.profiler import ProfilerActivity, profile

    from nmt_lightning.translate import translate_lines

    products = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "quantized::linear_dynamic",
                "quantized::linear")
    first = next(iter(models.values()))
    with profile(activities=[ProfilerActivity.CPU]):  # the profiler's first use pays its start-up
        translate_lines(first, lines[:2], beam=4, progress=False)
    result = {}
    for name, module in models.items():
        translate_lines(module, lines[:8], beam=4, progress=False)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            hypotheses = translate_lines(module, lines, beam=4, progress=False)
        events = profiler.key_averages()
        total = sum(event.self_cpu_time_total for event in events)
        in_products = sum(event.self_cpu_time_total for event in events if event.key in products)
        # Per output token (a decoder step's work), so models that write longer outputs compare fairly.
        pieces = module.tokenization.encode_target(hypotheses)
        result[name] = {"calls_per_token": sum(event.count for event in events) / max(1, sum(map(len, pieces))),
                        "matmul_share": in_products / max(total, 1)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/mobile_transfer")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data/libreoffice_en_cs")
    parser.add_argument("--teacher-checkpoint", type=Path, default=TEACHER)
    parser.add_argument("--steps", type=int, default=2120, help="training steps of every student")
    parser.add_argument("--stage-steps", type=int, default=60, help="steps per PKT layer stage")
    parser.add_argument("--qat-steps", type=int, default=QAT_STEPS, help="QAT fine-tuning steps of the int8 row")
    parser.add_argument("--test-sentences", type=int, default=None, help="score on the first N test sentences (smoke runs)")
    parser.add_argument("--sentences", type=int, default=300, help="sentences per speed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", nargs="+", choices=ROWS + EMBEDDING_ROWS, default=list(ROWS),
                        help="students to train and compare with the teacher (pkt_qat brings pkt, pkt_embed_qat pkt_embed)")
    args = parser.parse_args()
    if args.steps <= LAYERS * args.stage_steps:
        sys.exit(f"--steps {args.steps} leaves no distillation stage after {LAYERS} x --stage-steps {args.stage_steps}")
    args.out, args.data_dir, args.teacher_checkpoint = (p.resolve() for p in (args.out, args.data_dir,
                                                                              args.teacher_checkpoint))
    sources, references = prepared_test_split(args.data_dir, args.test_sentences)
    args.out.mkdir(parents=True, exist_ok=True)
    from nmt_lightning.translation_file import load_exported

    rows = build_rows(args)
    results = {name: export_and_score(args.out, (name, checkpoint, quantize), sources, references)
               for name, checkpoint, quantize in rows}
    models = {name: load_exported(file) for name, (file, _) in results.items()}
    rounds = translation_speed_rounds(args.out / "speed_rounds.json", models, sources[: args.sentences], args.rounds)
    teacher_name = rows[0][0]
    student_name = next((name for name in ("PKT", "PKT, teacher's embeddings") if name in results),
                        rows[-1][0])  # the profile's student
    profile = cached(args.out / f"profile_{file_slug(student_name)}.json", lambda: decoding_profile(  # one per student
        {teacher_name: models[teacher_name], student_name: models[student_name]}, sources[: min(100, args.sentences)]))

    speed = {name: statistics.median(r[name] for r in rounds) for name in results}
    teacher = results[teacher_name][1]
    header = ["model", "parameters", "% of teacher", "bytes on disk", "BLEU beam 4", "chrF2 beam 4", "BLEU greedy",
              "% of teacher BLEU", "sentences/s", "speed vs teacher"]
    table = []
    for name, _, _ in rows:
        result = results[name][1]
        table.append([name, f"{result['parameters'] / 1e6:.2f}M", f"{100 * result['parameters'] / teacher['parameters']:.0f}%",
                      f"{result['bytes']:,}", f"{result['bleu_beam4']:.2f}", f"{result['chrf_beam4']:.2f}",
                      f"{result['bleu_greedy']:.2f}", f"{100 * result['bleu_beam4'] / teacher['bleu_beam4']:.1f}%",
                      f"{speed[name]:.1f}", f"{speed[name] / speed[teacher_name]:.2f}x"])
    text = write_table(args.out / "mobile_transfer_table.csv", header, table)
    text += ["", f"Beam-4 decoding profile (first {min(100, args.sentences)} test sentences; wall time from the "
             f"speed rounds):", "",
             "| model | operator calls / output token | ms / sentence | share of operator time in matrix products |",
             "|---|---|---|---|"]
    text += [f"| {name} | {p['calls_per_token']:.0f} | {1000 / speed[name]:.1f} | {100 * p['matmul_share']:.0f}% |"
             for name, p in profile.items()]
    text += [
        "",
        f"Test split: {len(references)} sentences of {args.data_dir}. Students: tiny-bottleneck, {args.steps} steps "
        f"each; transfer stages of {args.stage_steps} steps per layer"
        + (f"; the int8 row adds {args.qat_steps} QAT steps. " if any(r.endswith("_qat") for r in args.rows) else ". ") +
        f"Speed: beam 4, {args.rounds} rounds over the first {args.sentences} test sentences, models taking turns, "
        f"{torch.get_num_threads()} threads on {cpu_description()}.",
        f"Reproduce: python recipes/benchmarks/mobile_transfer.py --out {args.out} --steps {args.steps} "
        f"--stage-steps {args.stage_steps}" + ("" if args.qat_steps == QAT_STEPS else f" --qat-steps {args.qat_steps}")
        + ("" if args.test_sentences is None else f" --test-sentences {args.test_sentences}")
        + ("" if set(args.rows) == set(ROWS) else f" --rows {' '.join(args.rows)}"),
    ]
    (args.out / "mobile_transfer_table.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    print("\n".join(text))


if __name__ == "__main__":
    main()
