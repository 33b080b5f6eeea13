"""fp32 against int8 (post-training and quantization-aware) on the embedded en->cs corpus.

    python recipes/benchmarks/int8_quantization.py --out runs/int8_benchmark --control

1. the fp32 model: ``--fp32-checkpoint`` (default: the tiny recipe's last.ckpt; trained with
   ``nmt-lightning fit --config recipes/libreoffice_en_cs/tiny.yaml`` if missing);
2. QAT: 8-bit quantization-aware fine-tuning from it (tiny.yaml + libreoffice_en_cs/finetune.yaml
   + compress/qat.yaml, through the CLI), unless ``--qat-checkpoint`` is given; ``--control``
   also runs the same fine-tuning without the callback, so the extra steps are not credited
   to quantization;
3. exports with ``nmt-lightning export``'s code: fp32, post-training int8 of the fp32 model
   (Q8BERT's "DQ" column) and the QAT int8 model;
4. translates the test split with each (beam 4) for BLEU/chrF, and measures CPU speed by
   translating the same sentences with the same batch size, models taking turns, several rounds;
5. writes ``OUT/int8_table.md`` and ``OUT/int8_table.csv`` (and the hypotheses), and below the
   table where the decoding time goes: in every round each model also runs once with timers
   around its linear layers, the only part int8 makes faster.

Rows are written as soon as each is measured, so an interrupted run keeps what it has.

To measure the same models on another CPU (a deployment machine, say), copy the exported files
and the prepared test split there and pass ``--exports DIR``: nothing is trained or exported,
and the fake-quantized comparison (which needs the QAT checkpoint) is left out. Pin the cores
the way they will be used, e.g. ``OMP_NUM_THREADS=2 taskset -c 0,2 python ...``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the callbacks package lives at the top of the repository

from callbacks import QuantizationAwareTraining  # noqa: E402
from nmt_lightning.evaluation import read_lines, score  # noqa: E402
from nmt_lightning.checkpoint_reading import read_checkpoint  # noqa: E402
from nmt_lightning.translation_file import export_checkpoint, load_exported  # noqa: E402
from nmt_lightning.export.plan import compression_manifest  # noqa: E402
from nmt_lightning.export.codecs.int8_kernels import Int8Linear  # noqa: E402
from nmt_lightning.module import TranslationModule  # noqa: E402
from nmt_lightning.translate import translate_lines  # noqa: E402
from side_by_side import MAIN_JOB_MODEL, check_given_model, cpu_description, weight_bytes  # noqa: E402

RECIPES = ROOT / "recipes"
TINY = RECIPES / "libreoffice_en_cs" / "tiny.yaml"
DEFAULT_FP32 = "runs/libreoffice_en_cs_tiny/checkpoints/last.ckpt"
FINETUNE = RECIPES / "libreoffice_en_cs" / "finetune.yaml"
QAT = RECIPES / "compress" / "qat.yaml"
PTQ_ROW = "PTQ int8 (dynamic, no training)"  # the fp32 model's own int8 copy: the same decoding work, int8 arithmetic
CONTROL_ROW = "fp32 + same fine-tuning (control)"
EXPORT_FILES = {"fp32": "fp32.safetensors", PTQ_ROW: "ptq.int8.safetensors", "QAT int8": "qat.int8.safetensors",
                CONTROL_ROW: "control.fp32.safetensors"}  # row -> file name in OUT
FINETUNED = Path("runs/libreoffice_en_cs_tiny_finetune/checkpoints/last.ckpt")  # relative to the run's directory
QAT_FINETUNED = Path("runs/libreoffice_en_cs_tiny_finetune_qat/checkpoints/last.ckpt")  # qat.yaml's run_suffixes


@dataclass
class Row:
    name: str
    model_file: Path
    bleu: float = float("nan")
    bleu_uncased: float = float("nan")
    chrf: float = float("nan")
    speeds: list[float] = field(default_factory=list)

    @property
    def speed(self) -> float:
        return statistics.median(self.speeds) if self.speeds else float("nan")

    def speed_ratio(self, baseline: "Row") -> float:
        """Median over the rounds of this row's speed over the baseline's in the same round: the
        two ran seconds apart, so a slow spell of the shared host hits both, where a ratio of
        separate medians can pair a fast round of one with a slow round of the other."""
        return statistics.median(mine / theirs for mine, theirs in zip(self.speeds, baseline.speeds))


def run_cli(arguments: list[str], cwd: Path) -> None:
    cwd.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "nmt_lightning.cli", *arguments]
    print(f"$ (cd {cwd} && nmt-lightning {' '.join(arguments)})", flush=True)
    subprocess.run(command, cwd=cwd, check=True)


def finetune(fp32_checkpoint: Path, data_dir: Path, run_dir: Path, quantize: bool) -> Path:
    """The fine-tuning recipe, run in ``run_dir`` (its relative paths land there)."""
    checkpoint = run_dir / (QAT_FINETUNED if quantize else FINETUNED)
    if checkpoint.is_file():
        print(f"reusing {checkpoint} (delete {run_dir} to fine-tune again)")
        return checkpoint
    configs = ["--config", str(TINY), "--config", str(FINETUNE)] + (["--config", str(QAT)] if quantize else [])
    run_cli(["fit", *configs, f"--data.data_dir={data_dir}", f"--model.init_from={fp32_checkpoint}"], run_dir)
    return checkpoint


def load_fake_quantized(path: Path) -> TranslationModule:
    """The QAT checkpoint as it trained: fp32 weights, fake quantization with the EMA input ranges."""
    checkpoint = read_checkpoint(path)
    int8 = {name[: -len(".weight")]: step for name, steps in compression_manifest(checkpoint).items()
            for step in steps if step["codec"] == "int8"}
    if not int8 or not any(key.startswith("QuantizationAwareTraining") for key in checkpoint.get("callbacks", {})):
        raise SystemExit(f"{path}: not trained with QuantizationAwareTraining")
    step = next(iter(int8.values()))
    module = TranslationModule.from_hyperparameters(checkpoint["hyper_parameters"])
    QuantizationAwareTraining(bits=step["bits"], per_channel=step["per_channel"],
                              include=list(int8)).quantize_modules(module)
    module.load_state_dict(checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)
    return module.eval()


LAYER_GROUPS = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "out_proj": "attention",
                "fc1": "feed-forward", "fc2": "feed-forward", "output_projection": "output projection"}


def time_in_linear_layers(model: torch.nn.Module, work: Callable[[], object]) -> tuple[float, dict[str, float]]:
    """(seconds of ``work()``, seconds of it spent inside the model's fp32 or int8 Linear layers,
    by group of ``LAYER_GROUPS``: attention projections, feed-forward, output projection, other)."""
    linear_types = (torch.nn.Linear, Int8Linear)
    inside: dict[str, float] = {}
    started = [0.0]

    def enter(*_: object) -> None:
        started[0] = time.perf_counter()

    def leave_for(group: str) -> Callable[..., None]:
        def leave(*_: object) -> None:
            inside[group] = inside.get(group, 0.0) + time.perf_counter() - started[0]
        return leave

    handles = []
    for name, layer in model.named_modules():
        if isinstance(layer, linear_types):
            group = LAYER_GROUPS.get(name.rpartition(".")[2], "other linear")
            handles += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave_for(group))]
    try:
        begin = time.perf_counter()
        work()
        return time.perf_counter() - begin, inside
    finally:
        for handle in handles:
            handle.remove()


def breakdown_table(rows: list[Row], timings: dict[str, list[tuple[float, dict[str, float]]]],
                    target: float = 1.8) -> list[str]:
    """Markdown lines: per model, decoding seconds inside each group of linear layers and outside
    (medians over the rounds), and what they imply for the int8 speed-up."""
    groups = sorted({group for passes in timings.values() for _, inside in passes for group in inside})
    lines = ["", "Where decoding time goes (each round also runs every model once more with timers around its linear "
             "layers; medians over the rounds):", "",
             "| model | total s | " + " | ".join(f"{group} s" for group in groups)
             + " | all linear layers s | everything else s | linear share |", "|---" * (len(groups) + 5) + "|"]
    linear_seconds, other_seconds = {}, {}
    for row in rows:
        passes = timings[row.name]
        total = statistics.median(seconds for seconds, _ in passes)
        linear_seconds[row.name] = statistics.median(sum(inside.values()) for _, inside in passes)
        other_seconds[row.name] = statistics.median(seconds - sum(inside.values()) for seconds, inside in passes)
        lines.append(f"| {row.name} | {total:.2f} | "
                     + " | ".join(f"{statistics.median(inside.get(group, 0.0) for _, inside in passes):.2f}" for group in groups)
                     + f" | {linear_seconds[row.name]:.2f} | {other_seconds[row.name]:.2f} "
                     + f"| {linear_seconds[row.name] / total:.0%} |")
    # fp32 against its own post-training int8 copy: the same weights up to rounding, hence close
    # to the same decoding steps, so the difference is the arithmetic (the QAT model is fine-tuned
    # and writes other translations, of other lengths).
    fp32, int8 = linear_seconds[rows[0].name], linear_seconds[PTQ_ROW]
    rest_allowed = (fp32 - target * int8) / (target - 1)  # (fp32 + rest) / (int8 + rest) = target
    lines += ["", f"The int8 linear layers of the post-training copy are {fp32 / int8:.2f}x as fast as the fp32 ones, "
                  f"the most the whole model could gain if nothing else took any time. Everything else takes "
                  f"{other_seconds[rows[0].name]:.2f} s in fp32 and {other_seconds[PTQ_ROW]:.2f} s in int8; "
              + (f"for {target}x it would have to fall to {rest_allowed:.2f} s." if rest_allowed > 0 else
                 f"{target}x is out of reach whatever it costs.")]
    return lines


def write_table(rows: list[Row], out: Path, baseline: Row, notes: list[str]) -> str:
    header = ["model", "BLEU", "BLEU (uncased)", "chrF2", "file bytes", "weight bytes", "weights vs fp32",
              "sentences/s (median)", "speed vs fp32 (median of rounds)"]
    table = []
    for row in rows:
        size, weights = row.model_file.stat().st_size, weight_bytes(row.model_file)
        table.append([row.name, f"{row.bleu:.2f}", f"{row.bleu_uncased:.2f}", f"{row.chrf:.2f}", f"{size:,}", f"{weights:,}",
                      f"{weights / weight_bytes(baseline.model_file):.1%}", f"{row.speed:.2f}" if row.speeds else "",
                      f"{row.speed_ratio(baseline):.2f}x" if row.speeds and baseline.speeds else ""])
    markdown = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                          *("| " + " | ".join(line) + " |" for line in table), "", *notes]) + "\n"
    (out / "int8_table.md").write_text(markdown, encoding="utf-8")
    with open(out / "int8_table.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([[cell.replace(",", "") for cell in line] for line in table])
    return markdown


def train_and_export(args: argparse.Namespace, out: Path, data_dir: Path) -> tuple[dict[str, Path], Path]:
    """Train (or reuse) the fp32, QAT and control models and export them: (row -> file, QAT checkpoint)."""
    fp32_checkpoint = Path(args.fp32_checkpoint).resolve()
    if not fp32_checkpoint.is_file():
        if not (data_dir / "prepare.json").is_file():
            run_cli(["prepare", "--corpus", "libreoffice", "--src", "en", "--tgt", "cs", "--out", str(data_dir)], Path.cwd())
        run_cli(["fit", "--config", str(TINY), f"--data.data_dir={data_dir}"], Path.cwd())
        if not fp32_checkpoint.is_file():
            raise SystemExit(f"{fp32_checkpoint}: still missing after training tiny.yaml (pass --fp32-checkpoint)")
    check_given_model(fp32_checkpoint, "--fp32-checkpoint", MAIN_JOB_MODEL, default=not args.fp32_given)
    qat_checkpoint = (Path(args.qat_checkpoint).resolve() if args.qat_checkpoint
                      else finetune(fp32_checkpoint, data_dir, out / "qat_finetune", quantize=True))

    exports = {
        "fp32": export_checkpoint(fp32_checkpoint, out / EXPORT_FILES["fp32"], "fp32"),
        PTQ_ROW: export_checkpoint(fp32_checkpoint, out / EXPORT_FILES[PTQ_ROW], "int8"),
        "QAT int8": export_checkpoint(qat_checkpoint, out / EXPORT_FILES["QAT int8"]),
    }
    if args.control:
        control, name = finetune(fp32_checkpoint, data_dir, out / "fp32_finetune", quantize=False), CONTROL_ROW
        exports[name] = export_checkpoint(control, out / EXPORT_FILES[name], "fp32")
    return {name: report.output for name, report in exports.items()}, qat_checkpoint


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/int8_benchmark", help="output directory (default: %(default)s)")
    parser.add_argument("--data-dir", default="data/libreoffice_en_cs", help="prepared data (default: %(default)s)")
    parser.add_argument("--fp32-checkpoint", help=f"default: {DEFAULT_FP32}, which must have trained the recipe's "
                        "steps; a checkpoint given here (as the main job gives the one it trained, however far its "
                        "time cap let it go) may have trained any number")
    parser.add_argument("--qat-checkpoint", help="a checkpoint trained with QuantizationAwareTraining (skips fine-tuning)")
    parser.add_argument("--control", action="store_true", help="also fine-tune fp32 with the same budget, no QAT")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--speed-sentences", type=int, default=300, help="test sentences timed per round")
    parser.add_argument("--speed-rounds", type=int, default=3)
    parser.add_argument("--exports", help="measure the exported files of an earlier run in this directory "
                                          "(fp32.safetensors, ptq.int8.safetensors, ...) instead of training")
    args = parser.parse_args(argv)
    args.fp32_given = args.fp32_checkpoint is not None
    args.fp32_checkpoint = args.fp32_checkpoint or DEFAULT_FP32
    out, data_dir = Path(args.out).resolve(), Path(args.data_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.exports:
        model_files = {name: Path(args.exports) / file for name, file in EXPORT_FILES.items()
                       if (Path(args.exports) / file).is_file()}
        if not {"fp32", PTQ_ROW} <= set(model_files):
            raise SystemExit(f"{args.exports}: needs at least fp32.safetensors and ptq.int8.safetensors")
        qat_checkpoint, origin = None, f"Exported files of {Path(args.exports).resolve()}."
    else:
        model_files, qat_checkpoint = train_and_export(args, out, data_dir)
        fp32_checkpoint = Path(args.fp32_checkpoint).resolve()
        origin = (f"The fp32 Lightning checkpoint ({fp32_checkpoint.name}, with optimiser state) is "
                  f"{fp32_checkpoint.stat().st_size:,} bytes.")
    rows = [Row(name, path) for name, path in model_files.items()]
    models = {row.name: load_exported(row.model_file) for row in rows}
    sources, references = read_lines(data_dir / "test.en"), read_lines(data_dir / "test.cs")
    threads = torch.get_num_threads()
    notes = [f"Test split: {len(sources)} sentences of {data_dir}; beam {args.beam}, batch {args.batch_size}, "
             f"{threads} CPU threads on {cpu_description()}, torch {torch.__version__}, quantized engine "
             f"{torch.backends.quantized.engine}.",
             f"Speed: {args.speed_rounds} rounds over the first {args.speed_sentences} test sentences, models taking "
             f"turns; sentences/s is the median round, the speed ratio the median of the rounds' ratios. Weight bytes: "
             f"the tensors of the exported file without the sentencepiece models.",
             origin,
             "Reproduce: python recipes/benchmarks/int8_quantization.py " + " ".join(sys.argv[1:] if argv is None else argv)]

    hypotheses: dict[str, list[str]] = {}
    for index, row in enumerate(rows):
        hypotheses[row.name] = translate_lines(models[row.name], sources, beam=args.beam, batch_size=args.batch_size)
        (out / f"test.hyp{index}.cs").write_text("".join(h + "\n" for h in hypotheses[row.name]), encoding="utf-8")
        scores = score(hypotheses[row.name], references)
        row.bleu, row.bleu_uncased, row.chrf = scores.bleu, scores.bleu_uncased, scores.chrf
        print(f"{row.name}: {scores.bleu_text}", flush=True)
        write_table(rows[: index + 1], out, rows[0], notes)

    if qat_checkpoint is not None:  # the exported int8 model against the graph it was trained in
        fake = translate_lines(load_fake_quantized(qat_checkpoint), sources, beam=args.beam, batch_size=args.batch_size)
        same = sum(a == b for a, b in zip(fake, hypotheses["QAT int8"]))
        fake_bleu = score(fake, references).bleu
        layers = [m for m in models["QAT int8"].model.modules() if isinstance(m, Int8Linear)]
        static = [m for m in layers if m.static]
        bits = sorted({m.activation_bits for m in static})
        notes.append(f"QAT int8 export vs the fake-quantized training graph: {same}/{len(sources)} identical "
                     f"translations (BLEU {fake_bleu:.2f} fake-quantized). {len(static)} of {len(layers)} int8 layers "
                     f"quantize their input with the trained EMA range at {'/'.join(map(str, bits)) or '-'} bits"
                     + (" (this CPU's int8 kernel saturates 8-bit products: no VNNI)" if bits == [7] else "")
                     + "; the post-training model measures the range of every batch (dynamic, 7-bit).")

    timed = sources[: args.speed_sentences]
    timings: dict[str, list[tuple[float, dict[str, float]]]] = {row.name: [] for row in rows}
    for _ in range(args.speed_rounds):
        for row in rows:  # the timed passes of a round back to back, so they share the host's state
            started = time.perf_counter()
            translate_lines(models[row.name], timed, beam=args.beam, batch_size=args.batch_size, progress=False)
            row.speeds.append(len(timed) / (time.perf_counter() - started))
        for row in rows:  # timers cost a little: the breakdown comes from separate passes
            model = models[row.name]
            timings[row.name].append(time_in_linear_layers(model.model, lambda: translate_lines(
                model, timed, beam=args.beam, batch_size=args.batch_size, progress=False)))
        print("sentences/s this round: " + ", ".join(f"{row.name} {row.speeds[-1]:.2f}" for row in rows), flush=True)
    notes.append("Sentences/s by round: " + "; ".join(f"{row.name} " + ", ".join(f"{speed:.1f}" for speed in row.speeds)
                                                    for row in rows) + ".")
    print(write_table(rows, out, rows[0], notes + breakdown_table(rows, timings)))


if __name__ == "__main__":
    main()
