"""Our decoder against CTranslate2, on the same models and sentences: quality, size and speed.

    python recipes/benchmarks/deployment.py --out runs/deployment

Models (the main job's, ``bash recipes/libreoffice_en_cs/main_job.sh``, unless given):
our fp32 checkpoint, our int8 export of it (post-training), our QAT int8 export; CTranslate2
float32 and int8 conversions of the fp32 model and an int8 conversion of the QAT model, plus the
QAT conversion run as one batch at a time on all threads (CTranslate2's other thread layout).
With a GPU (torch.cuda and CTranslate2 both see one) the fp32 model also runs on it, ours and
CTranslate2's float16 and int8_float16.

1. quality: every model translates the whole test split (beam 4) for BLEU, chrF2 and the length
   ratio; our fp32 model and its CTranslate2 float32 conversion also decode greedily, and the
   identical translations are counted (the conversion's exactness);
2. speed: ``--rounds`` rounds over the first ``--sentences`` test sentences, models taking turns
   (the order rotates each round), each in its own process: in one process torch and CTranslate2
   (each with its own OpenMP and MKL) slowed each other's matrix products. Sentences/s is the
   median round; the ratio to our fp32 is the median of the rounds' ratios.

Writes OUT/deployment_table.md and .csv. Converted models, translations and every round are
cached in OUT, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from side_by_side import MAIN_JOB_MODEL, check_given_model, cpu_description, write_table  # side_by_side.py

ROOT = Path(__file__).resolve().parents[2]

FP32 = ROOT / "runs/libreoffice_en_cs_tiny/checkpoints/last.ckpt"
QAT = ROOT / "runs/int8_benchmark/qat_finetune/runs/libreoffice_en_cs_tiny_finetune_qat/checkpoints/last.ckpt"
BASELINE = "ours fp32"
CT2_QAT = "CTranslate2 int8 of QAT"  # the QAT model converted to CTranslate2 int8 (the distillation table reads it)


@dataclass(frozen=True)
class Model:
    name: str
    engine: str  # "ours" or "ctranslate2"
    path: Path  # checkpoint, export file or CTranslate2 directory
    device: str = "cpu"
    parallel_batches: Optional[int] = None  # CTranslate2 only; None: its default (one batch per CPU thread)
    compute_type: str = "default"


def bytes_on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else path.stat().st_size


def build_models(args: argparse.Namespace, cuda: bool) -> list[Model]:
    """Export and convert (each once: cached in OUT/models)."""
    from nmt_lightning.deploy import convert_to_ctranslate2
    from nmt_lightning.translation_file import export_checkpoint

    models_dir = args.out / "models"
    models_dir.mkdir(parents=True, exist_ok=True)

    def export(name: str, checkpoint: Path, quantize: Optional[str]) -> Path:
        path = models_dir / name
        if not path.exists():
            export_checkpoint(checkpoint, path, quantize)
        return path

    def convert(name: str, checkpoint: Path, quantization: str) -> Path:
        path = models_dir / name
        if not path.exists():
            convert_to_ctranslate2(checkpoint, path, quantization)
        return path

    ct2_qat = convert("ct2-qat-int8", args.qat_checkpoint, "int8")
    models = [
        Model(BASELINE, "ours", export("fp32.safetensors", args.fp32_checkpoint, "fp32")),
        Model("ours int8 (post-training)", "ours", export("ptq.int8.safetensors", args.fp32_checkpoint, "int8")),
        Model("ours QAT int8", "ours", export("qat.int8.safetensors", args.qat_checkpoint, None)),
        Model("CTranslate2 float32", "ctranslate2", convert("ct2-float32", args.fp32_checkpoint, "float32")),
        Model("CTranslate2 int8", "ctranslate2", convert("ct2-int8", args.fp32_checkpoint, "int8")),
        Model(CT2_QAT, "ctranslate2", ct2_qat),
        Model(f"{CT2_QAT}, 1 batch x {args.threads} threads", "ctranslate2", ct2_qat, parallel_batches=1),
    ]
    if cuda:
        models += [
            Model("ours fp32 (GPU)", "ours", models_dir / "fp32.safetensors", device="cuda"),
            Model("CTranslate2 float16 (GPU)", "ctranslate2", convert("ct2-float16", args.fp32_checkpoint, "float16"),
                  device="cuda"),
            Model("CTranslate2 int8_float16 of QAT (GPU)", "ctranslate2", ct2_qat, device="cuda",
                  compute_type="int8_float16"),
        ]
    return models


def run_worker(model: Model, args: argparse.Namespace, input_path: Path, output: Path, beam: int,
               limit: int = 0, warmup: bool = False) -> float:
    """Translate in a fresh process; returns the seconds the translation took (model loading excluded)."""
    command = [sys.executable, __file__, "worker", "--engine", model.engine, "--model", str(model.path),
               "--input", str(input_path), "--output", str(output), "--beam", str(beam),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--device", model.device,
               "--compute-type", model.compute_type, "--limit", str(limit)]
    if model.parallel_batches:
        command += ["--parallel-batches", str(model.parallel_batches)]
    if warmup:
        command.append("--warmup")
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # stderr (progress, errors) shows
    if result.returncode != 0:
        raise RuntimeError(f"{model.name}: the worker failed (its error is above)")
    return json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


def worker(args: argparse.Namespace) -> None:
    """One translation run: load, (warm up,) translate, write the output, print the seconds."""
    import torch

    from nmt_lightning.evaluation import read_lines

    torch.set_num_threads(args.threads)
    lines = read_lines(args.input)
    lines = lines[: args.limit] if args.limit else lines
    if args.engine == "ctranslate2":
        from nmt_lightning.deploy import CTranslate2Model

        model = CTranslate2Model(args.model, args.device, args.threads, args.parallel_batches, args.compute_type)

        def translate(batch: list[str]) -> list[str]:
            return model.translate_lines(batch, beam=args.beam, batch_size=args.batch_size, progress=not args.warmup)
    else:
        from nmt_lightning.loading import load_translation_module
        from nmt_lightning.translate import translate_lines

        module = load_translation_module(args.model).to(args.device)

        def translate(batch: list[str]) -> list[str]:
            return translate_lines(module, batch, beam=args.beam, batch_size=args.batch_size, progress=not args.warmup)
    if args.warmup:  # one batch first: lazy initialisation (kernels, caches, packed weights) is not timed
        translate(lines[: args.batch_size])
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    translations = translate(lines)
    seconds = time.perf_counter() - started
    Path(args.output).write_text("".join(line + "\n" for line in translations), encoding="utf-8")
    print(json.dumps({"seconds": seconds}))


def translations(args: argparse.Namespace, model: Model, beam: int) -> list[str]:
    """The whole test split translated by ``model`` (cached in OUT/translations)."""
    from nmt_lightning.evaluation import read_lines

    path = args.out / "translations" / f"{model.name.replace(' ', '_').replace('/', '_')}.beam{beam}.cs"
    test = args.data_dir / "test.en"
    if not path.is_file() or len(read_lines(path)) != len(read_lines(test)):
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"translating the test split: {model.name}, beam {beam}", file=sys.stderr, flush=True)
        partial = path.with_suffix(".partial")
        run_worker(model, args, test, partial, beam)
        partial.rename(path)
    return read_lines(path)


def measure_speeds(args: argparse.Namespace, models: list[Model]) -> dict[str, list[float]]:
    """Sentences/s of every model in every round (cached in OUT/speed_rounds.json)."""
    cache = args.out / "speed_rounds.json"
    rounds: list[dict[str, float]] = json.loads(cache.read_text()) if cache.is_file() else []
    input_path = args.out / "speed_input.en"
    lines = (args.data_dir / "test.en").read_text(encoding="utf-8").splitlines()[: args.sentences]
    input_path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    for index in range(args.rounds):
        if index < len(rounds) and all(m.name in rounds[index] for m in models):
            continue
        if index >= len(rounds):
            rounds.append({})
        order = models[index % len(models):] + models[: index % len(models)]  # rotate: no model always first
        for model in order:
            if model.name not in rounds[index]:
                seconds = run_worker(model, args, input_path, args.out / "speed_output.cs", args.beam, warmup=True)
                rounds[index][model.name] = len(lines) / seconds
                cache.write_text(json.dumps(rounds, indent=1))
                print(f"round {index + 1}: {model.name}: {len(lines) / seconds:.1f} sentences/s", file=sys.stderr,
                      flush=True)
    return {m.name: [r[m.name] for r in rounds[: args.rounds]] for m in models}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="benchmark", choices=["benchmark", "worker"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/deployment")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data/libreoffice_en_cs")
    parser.add_argument("--fp32-checkpoint", type=Path, default=FP32)
    parser.add_argument("--qat-checkpoint", type=Path, default=QAT)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of every model")
    parser.add_argument("--sentences", type=int, default=300, help="test sentences of each speed round")
    parser.add_argument("--rounds", type=int, default=5)
    # worker options
    parser.add_argument("--engine"), parser.add_argument("--model"), parser.add_argument("--input")
    parser.add_argument("--output"), parser.add_argument("--device", default="cpu")
    parser.add_argument("--parallel-batches", type=int), parser.add_argument("--compute-type", default="default")
    parser.add_argument("--limit", type=int, default=0), parser.add_argument("--warmup", action="store_true")
    args = parser.parse_args()
    if args.mode == "worker":
        return worker(args)
    for path, what in ((args.fp32_checkpoint, "--fp32-checkpoint"), (args.qat_checkpoint, "--qat-checkpoint"),
                       (args.data_dir / "test.en", "--data-dir")):
        if not path.exists():
            sys.exit(f"{what}: {path} does not exist; run bash recipes/libreoffice_en_cs/main_job.sh first")
    check_given_model(args.fp32_checkpoint, "--fp32-checkpoint", MAIN_JOB_MODEL,
                      default=args.fp32_checkpoint == parser.get_default("fp32_checkpoint"))
    import torch
    from sacrebleu.metrics import BLEU

    from nmt_lightning.deploy import require_ctranslate2
    from nmt_lightning.evaluation import read_lines, score

    ctranslate2 = require_ctranslate2()
    cuda = torch.cuda.is_available() and ctranslate2.get_cuda_device_count() > 0
    args.out.mkdir(parents=True, exist_ok=True)
    models = build_models(args, cuda)
    references = read_lines(args.data_dir / "test.cs")
    quality = {}
    for model in models:
        hypotheses = translations(args, model, args.beam)
        scores = score(hypotheses, references)
        bleu = BLEU().corpus_score(hypotheses, [references])
        ratio = bleu.sys_len / bleu.ref_len  # sacrebleu's 13a tokens, as in its BLEU line
        quality[model.name] = (scores, ratio, hypotheses)
    greedy_ours = translations(args, models[0], 1)
    greedy_ct2 = translations(args, models[3], 1)
    identical = sum(a == b for a, b in zip(greedy_ours, greedy_ct2))
    beam_identical = sum(a == b for a, b in zip(quality[BASELINE][2], quality[models[3].name][2]))
    speeds = measure_speeds(args, models)
    baseline = speeds[BASELINE]
    header = ["model", "BLEU", "chrF2", "length ratio", "bytes on disk", "sentences/s", "vs ours fp32"]
    rows = []
    for model in models:
        scores, ratio, _ = quality[model.name]
        speed = statistics.median(speeds[model.name])
        relative = statistics.median(s / b for s, b in zip(speeds[model.name], baseline))
        rows.append([model.name, f"{scores.bleu:.2f}", f"{scores.chrf:.2f}", f"{ratio:.3f}",
                     f"{bytes_on_disk(model.path):,}", f"{speed:.1f}", f"{relative:.2f}x"])
    lines = write_table(args.out / "deployment_table.csv", header, rows)
    qat_bleu = quality["ours QAT int8"][0].bleu
    lines += [
        "",
        f"Test split: {len(references)} sentences of {args.data_dir}; beam {args.beam}, batch {args.batch_size}, "
        f"{args.threads} CPU threads on {cpu_description()}; torch {torch.__version__}, CTranslate2 "
        f"{ctranslate2.__version__}. CTranslate2 on CPU runs {args.threads} batches at once on one thread each "
        f"unless the row says otherwise; ours runs one batch on {args.threads} threads.",
        f"Speed: {args.rounds} rounds over the first {args.sentences} test sentences, models taking turns, each in "
        f"its own process after one warm-up batch; sentences/s is the median round, the ratio the median of the "
        f"rounds' ratios to ours fp32.",
        f"Exactness: greedy translations of CTranslate2 float32 identical to ours on {identical}/{len(references)} "
        f"({identical / len(references):.1%}); beam {args.beam}: {beam_identical}/{len(references)} identical, BLEU "
        f"{quality[models[3].name][0].bleu:.2f} against {quality[BASELINE][0].bleu:.2f} "
        f"({quality[models[3].name][0].bleu - quality[BASELINE][0].bleu:+.2f}).",
        f"{CT2_QAT} against ours QAT int8: BLEU {quality[CT2_QAT][0].bleu - qat_bleu:+.2f}.",
        "Sentences/s by round: " + "; ".join(f"{name} " + ", ".join(f"{v:.1f}" for v in values)
                                            for name, values in speeds.items()),
        f"Reproduce: python recipes/benchmarks/deployment.py --out {args.out} --rounds {args.rounds} "
        f"--sentences {args.sentences} --threads {args.threads}",
    ]
    (args.out / "deployment_table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
