"""The seed's distillation table for translation: a 6+6 teacher and half-depth (3+3) students.

    python recipes/benchmarks/distillation.py --out runs/distillation

The teacher is the tiny width at twice the depth (``recipes/libreoffice_en_cs/teacher.yaml``;
trained first if ``--teacher-checkpoint`` does not exist). Every student is the tiny 3+3 model
trained with the tiny recipe for ``--steps`` steps; only what the row names changes:

| row | student |
|---|---|
| from scratch | random initialisation, label-smoothed cross-entropy (the main job's model) |
| teacher's layers | initialised from teacher layers 1, 3, 5 (``init_layers: every_other``) |
| + word-level KD | teacher's layers + KD(T = 2): 0.5 CE + 0.5 T^2 KL(teacher || student) |
| + triple loss | the same + 1.0 cosine loss on the encoder and decoder outputs (DistilBERT) |
| sequence-level KD | teacher's layers, trained on the teacher's beam-4 translations of the training set |
| sequence + word-level KD | both |
| deployment | the best student by BLEU, fine-tuned ``--qat-steps`` with QAT, exported to int8 |
| deployment via CTranslate2 | the same QAT model converted to CTranslate2 int8 (when ctranslate2 is installed) |

Columns: parameters, bytes on disk (fp32 export; int8 for the deployment row), BLEU and chrF2
on the whole test split with beam 4 and greedy, CPU sentences/s with beam 4 relative to the
teacher (``--rounds`` rounds over the first ``--sentences`` test sentences, models taking
turns in one process). Then the training step time of word-level KD against plain training
of the same student, side by side on the same batches. The CTranslate2 row comes from
``recipes/benchmarks/deployment.py`` (run into OUT/deployment), which times every model in its
own process against the teacher with our decoder.

Everything is cached in OUT (trained runs, the distilled corpus, exports, scores, speed
rounds): an interrupted run continues where it stopped when the same command is run again.
Writes OUT/distillation_table.md and .csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the callbacks package lives at the top of the repository

from deployment import BASELINE, CT2_QAT  # noqa: E402  (recipes/benchmarks/deployment.py: its table's row names)
from side_by_side import (MAIN_JOB_MODEL, TEACHER_MODEL, cached, check_given_model, checkpoint_step, cpu_description, export_and_score,  # noqa: E402
                          prepared_test_split, run_fit, sequence_kd_data, translation_speed_rounds,
                          write_table)  # recipes/benchmarks/side_by_side.py

TINY = ROOT / "recipes/libreoffice_en_cs/tiny.yaml"
TEACHER_RECIPE = ROOT / "recipes/libreoffice_en_cs/teacher.yaml"
FINETUNE = ROOT / "recipes/libreoffice_en_cs/finetune.yaml"
QAT = ROOT / "recipes/compress/qat.yaml"
TEACHER = ROOT / "runs/libreoffice_en_cs_teacher/checkpoints/last.ckpt"
MAIN_JOB = ROOT / "runs/libreoffice_en_cs_tiny/checkpoints/last.ckpt"
TRAINED = Path("runs/libreoffice_en_cs_tiny/checkpoints/last.ckpt")  # relative to a student's run directory
FINETUNED = Path("runs/libreoffice_en_cs_tiny_finetune_qat/checkpoints/last.ckpt")  # tiny + finetune + qat.yaml
RECIPE_STEPS = 1400  # tiny.yaml's max_steps: the main job's model is the from-scratch row at this budget
TEACHER_STEPS = 4000  # teacher.yaml's max_steps


def distillation_yaml(teacher: Path, hidden_weight: float = 0.0) -> str:
    init_args = {"teacher": str(teacher), "temperature": 2.0, "soft_weight": 0.5, "hard_weight": 0.5,
                 "hidden_weight": hidden_weight}
    return json.dumps({"trainer": {"callbacks+": [{"class_path": "callbacks.KnowledgeDistillation",
                                                   "init_args": init_args}]}})


def student(args: argparse.Namespace, name: str, data_dir: Path, init: bool, add_ons: list[str]) -> Path:
    overrides = [f"--data.data_dir={data_dir}"]
    if init:
        overrides += [f"--model.init_from={args.teacher_checkpoint}", "--model.init_layers=every_other"]
    return run_fit(args.out, name, [TINY], add_ons, overrides, TRAINED, args.steps)


def teacher_checkpoint(args: argparse.Namespace) -> Path:
    """``--teacher-checkpoint``; the default one is trained (or its interrupted training resumed) here."""
    path = args.teacher_checkpoint
    if path != TEACHER.resolve():
        if not path.is_file():
            sys.exit(f"--teacher-checkpoint {path}: no such file")
        check_given_model(path, "--teacher-checkpoint", {**TEACHER_MODEL, "what": "a 6+6 teacher"}, default=False)
        return path
    done = checkpoint_step(path)
    if done < TEACHER_STEPS:
        print(f"training the teacher ({TEACHER_RECIPE.name}) ...", file=sys.stderr, flush=True)
        command = [sys.executable, "-m", "nmt_lightning.cli", "fit", "--config", str(TINY), "--config",
                   str(TEACHER_RECIPE), f"--data.data_dir={args.data_dir}", "--trainer.max_time=null"]
        if done:
            resumed = path.with_name("resume_from.ckpt")
            resumed.write_bytes(path.read_bytes())
            command.append(f"--ckpt_path={resumed}")
        subprocess.run(command, cwd=ROOT, check=True)
    check_given_model(path, "--teacher-checkpoint", TEACHER_MODEL, default=True)
    return path


def sequence_level_data(args: argparse.Namespace) -> Path:
    """The teacher's beam-4 translations of the training source, prepared with the teacher's BPE."""
    return sequence_kd_data(args.out / "sequence_level_data", args.out / "sequence_level_corpus" / "train",
                            args.teacher_checkpoint, args.data_dir)


def build_rows(args: argparse.Namespace) -> list[tuple[str, Path, Optional[str]]]:
    """(row, checkpoint, export --quantize), training what is missing, most telling rows first."""
    teacher = teacher_checkpoint(args)
    kd = distillation_yaml(teacher)
    rows = [("teacher (6+6)", teacher, "fp32")]
    if args.steps == RECIPE_STEPS and MAIN_JOB.is_file():
        check_given_model(MAIN_JOB, "the student from scratch", MAIN_JOB_MODEL, default=True)
        scratch = MAIN_JOB
    else:
        scratch = student(args, "scratch", args.data_dir, False, [])
    rows.append(("student from scratch", scratch, "fp32"))
    rows.append(("teacher's layers", student(args, "teacher_layers", args.data_dir, True, []), "fp32"))
    rows.append(("+ word-level KD", student(args, "word_kd", args.data_dir, True, [kd]), "fp32"))
    rows.append(("+ triple loss", student(args, "triple_loss", args.data_dir, True,
                                          [distillation_yaml(teacher, hidden_weight=1.0)]), "fp32"))
    sequence_data = sequence_level_data(args)
    rows.append(("sequence-level KD", student(args, "sequence_kd", sequence_data, True, []), "fp32"))
    rows.append(("sequence + word-level KD", student(args, "sequence_word_kd", sequence_data, True, [kd]), "fp32"))
    return rows


def deployment_row(args: argparse.Namespace, best: tuple[str, Path, Optional[str]]) -> tuple[str, Path, Optional[str]]:
    name, checkpoint, _ = best
    finetuned = run_fit(args.out, "deployment_qat", [TINY, FINETUNE, QAT], [],
                        [f"--data.data_dir={args.data_dir}", f"--model.init_from={checkpoint}"], FINETUNED,
                        args.qat_steps)
    return (f"deployment: {name} + QAT, int8", finetuned, None)


def ctranslate2_deployment(args: argparse.Namespace, qat_checkpoint: Path) -> Optional[dict[str, str]]:
    """The deployment row's model converted to CTranslate2 int8, against the fp32 teacher with our
    decoder: ``recipes/benchmarks/deployment.py`` (its own cache in OUT/deployment; each model
    translates in its own process, as torch and CTranslate2 in one process slow each other).
    Returns its table's rows by model name; None when CTranslate2 is not installed."""
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        print("ctranslate2 is not installed: no CTranslate2 deployment row", file=sys.stderr)
        return None
    out = args.out / "deployment"
    subprocess.run([sys.executable, str(Path(__file__).with_name("deployment.py")), "--out", str(out),
                    "--data-dir", str(args.data_dir), "--fp32-checkpoint", str(args.teacher_checkpoint),
                    "--qat-checkpoint", str(qat_checkpoint), "--sentences", str(args.sentences),
                    "--threads", str(torch.get_num_threads())], check=True)
    with open(out / "deployment_table.csv", newline="", encoding="utf-8") as handle:
        return {row["model"]: row for row in csv.DictReader(handle)}


def step_times(args: argparse.Namespace) -> dict[str, float]:
    """Seconds per training step of the 3+3 student: plain, with word-level KD (the fp32 teacher,
    and its post-training int8 export as a faster teacher), with the triple loss (Lightning
    loops over the same batches, taking turns; median of 3 rounds)."""
    from training_throughput import first_batches, lightning_loop  # recipes/benchmarks/training_throughput.py

    from callbacks import KnowledgeDistillation
    from nmt_lightning.translation_file import export_checkpoint
    from nmt_lightning.module import TranslationModule

    datamodule, batches, _ = first_batches(args.data_dir, args.throughput_steps, max_tokens=2048)

    def fresh() -> TranslationModule:
        torch.manual_seed(0)
        return TranslationModule(datamodule.src_vocab_size, datamodule.tgt_vocab_size, preset="tiny", pre_norm=True,
                                 val_bleu=False)

    teacher = str(args.teacher_checkpoint)
    int8_teacher = args.out / "exports" / "teacher_int8.safetensors"
    if not int8_teacher.is_file():
        export_checkpoint(teacher, int8_teacher, "int8")
    variants = {
        "plain": lambda: (),
        "word-level KD": lambda: (KnowledgeDistillation(teacher),),
        "word-level KD, int8 teacher": lambda: (KnowledgeDistillation(
            str(int8_teacher), teacher_loader="nmt_lightning.loading.load_translation_module"),),
        "triple loss": lambda: (KnowledgeDistillation(teacher, hidden_weight=1.0),),
    }
    lightning_loop(fresh(), batches[:3])  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(3):
        for name, callbacks in variants.items():
            seconds[name].append(lightning_loop(fresh(), batches, callbacks()) / len(batches))
    return {name: statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    from nmt_lightning.cpu_allocator import relaunch_with_tuned_allocator

    relaunch_with_tuned_allocator()  # the allocator settings `nmt-lightning fit` trains with
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/distillation")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data/libreoffice_en_cs")
    parser.add_argument("--teacher-checkpoint", type=Path, default=TEACHER)
    parser.add_argument("--steps", type=int, default=RECIPE_STEPS, help="training steps of every student")
    parser.add_argument("--qat-steps", type=int, default=300, help="QAT fine-tuning steps of the deployment row")
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--throughput-steps", type=int, default=20)
    args = parser.parse_args()
    # Students train in their own directories: every path handed to them must be absolute.
    args.out, args.data_dir, args.teacher_checkpoint = (p.resolve() for p in (args.out, args.data_dir,
                                                                              args.teacher_checkpoint))
    sources, references = prepared_test_split(args.data_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = build_rows(args)
    results = {name: export_and_score(args.out, (name, checkpoint, quantize), sources, references)
               for name, checkpoint, quantize in rows}
    best = max(rows[1:], key=lambda row: results[row[0]][1]["bleu_beam4"])
    deployment = deployment_row(args, best)
    rows.append(deployment)
    results[deployment[0]] = export_and_score(args.out, deployment, sources, references)
    from nmt_lightning.translation_file import load_exported

    models = {name: load_exported(file) for name, (file, _) in results.items()}
    rounds = translation_speed_rounds(args.out / "speed_rounds.json", models, sources[: args.sentences], args.rounds)
    steps = cached(args.out / "step_times.json", lambda: step_times(args))

    teacher_name = rows[0][0]
    speed = {name: statistics.median(r[name] for r in rounds) for name in results}
    teacher_bleu = results[teacher_name][1]["bleu_beam4"]
    header = ["model", "parameters", "bytes on disk", "BLEU beam 4", "chrF2 beam 4", "BLEU greedy", "chrF2 greedy",
              "% of teacher BLEU", "sentences/s", "speed vs teacher"]
    table = []
    for name, _, _ in rows:
        result = results[name][1]
        table.append([name, f"{result['parameters'] / 1e6:.1f}M", f"{result['bytes']:,}", f"{result['bleu_beam4']:.2f}",
                      f"{result['chrf_beam4']:.2f}", f"{result['bleu_greedy']:.2f}", f"{result['chrf_greedy']:.2f}",
                      f"{100 * result['bleu_beam4'] / teacher_bleu:.1f}%", f"{speed[name]:.1f}",
                      f"{speed[name] / speed[teacher_name]:.2f}x"])
    converted = ctranslate2_deployment(args, deployment[1])
    if converted is not None:
        row = converted[CT2_QAT]
        bleu = float(row["BLEU"])
        table.append(["deployment via CTranslate2 int8 (the same QAT model)", table[-1][1], row["bytes on disk"],
                      f"{bleu:.2f}", row["chrF2"], "–", "–", f"{100 * bleu / teacher_bleu:.1f}%", row["sentences/s"],
                      row["vs ours fp32"]])
    text = write_table(args.out / "distillation_table.csv", header, table)
    text += [
        "",
        f"Test split: {len(references)} sentences of {args.data_dir}. Students: the tiny 3+3 model, {args.steps} "
        f"steps each; KD rows start from the teacher's layers 1, 3, 5. Deployment: the best student by BLEU "
        f"({best[0]}), {args.qat_steps} steps of QAT, int8 export. Speed: beam 4, {args.rounds} rounds over the "
        f"first {args.sentences} test sentences, models taking turns, {torch.get_num_threads()} threads on "
        f"{cpu_description()}.",
        "Training step time of the student (same batches, taking turns; median of 3 rounds; glibc's malloc "
        "thresholds raised as nmt-lightning does, see nmt_lightning/cpu_allocator.py): "
        + ", ".join(f"{name} {value * 1000:.0f} ms ({value / steps['plain']:.2f}x)" for name, value in steps.items()),
        *([f"CTranslate2 row: recipes/benchmarks/deployment.py in {args.out / 'deployment'} (5 rounds, each model in "
           f"its own process; ours fp32 = the teacher at {converted[BASELINE]['sentences/s']} sentences/s there); "
           f"no greedy scores."] if converted is not None else []),
        f"Reproduce: python recipes/benchmarks/distillation.py --out {args.out} --steps {args.steps}",
    ]
    (args.out / "distillation_table.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    print("\n".join(text))


if __name__ == "__main__":
    main()
