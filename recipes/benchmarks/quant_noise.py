"""The seed's Quant-Noise table (Fan et al. 2020, Table 1) for the LibreOffice en->cs tiny model.

    python recipes/benchmarks/quant_noise.py --out runs/quant_noise

Every trained row starts from the main job's fp32 model (``--fp32-checkpoint``;
``bash recipes/libreoffice_en_cs/main_job.sh`` trains it) with the same budget, so the extra
training is not credited to a method:

| row | training (from the fp32 model) | export |
|---|---|---|
| uncompressed | fine-tuning, ``--steps`` steps, no callback (the control) | fp32 |
| uncompressed, the iPQ rows' budget | the same for ``--steps`` + ``--ipq-steps`` steps: what the extra training alone buys | fp32 |
| int8 / int4 / iPQ, post-processing | the control | ``--quantize int8`` / ``int4`` / k-means without fine-tuning |
| int8 / int4, QAT | fine-tuning with QAT at 8 / 4 bits | its grid |
| int8 / int4, Quant-Noise | fine-tuning with Quant-Noise int8 / int4, p = ``--p`` | its grid |
| iPQ, QAT | the control, then iPQ: 3 stages of ``--ipq-steps`` / 3 (Stock et al.) | ipq |
| iPQ, Quant-Noise | fine-tuning with Quant-Noise pq, then iPQ with Quant-Noise pq on the layers still dense | ipq |
| iPQ & int8, Quant-Noise | the same with int8 codebooks | ipq, int8 codebooks, biases and norms in 8 bits |
| iPQ & int8, Quant-Noise, bits moved | the same, stages embeddings first, the embedding with 4096 codewords (12-bit codes), feed-forward blocks of 16 (noise too): about the same bytes | the same |
| iPQ, Quant-Noise + distillation | as iPQ, Quant-Noise, with word-level KD from the control during iPQ (the paper's recipe) | ipq |
| iPQ & int8, Quant-Noise + distillation, bits moved | the "bits moved" row with that distillation | as "bits moved" |

(every iPQ row thus trains ``--steps`` + ``--ipq-steps``, by default 2 ``--steps``). Columns: bytes on disk, compression
ratio against the fp32 export (the files, and the weights alone as fairseq counts them), BLEU
and chrF2 (beam 4, the whole test split), CPU sentences/s (``--rounds`` rounds over the first ``--sentences`` test sentences, models taking
turns). Then the training throughput of Quant-Noise against plain training, side by side.

``--ipq-lr`` sets the iPQ stages' peak learning rate (each stage restarts the schedule and warms
up to it again; default finetune.yaml's 0.001); those runs and rows are named after it.
``--rows`` trains and scores only some rows (with the control); use a new OUT for another
``--steps``, since finished runs are reused by name.

Every fine-tuned checkpoint, export, score and round is cached in OUT: an interrupted run
continues where it stopped (rerun the same command). Writes OUT/quant_noise_table.md and
.csv, and OUT/quant_noise_frontier.png (BLEU against bytes on disk, log scale; needs
matplotlib).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the callbacks package lives at the top of the repository

from side_by_side import (MAIN_JOB_MODEL, cached, check_given_model, cpu_description, run_fit,  # noqa: E402
                          translation_speed_rounds, weight_bytes, write_table)  # (recipes/benchmarks/side_by_side.py)

TINY = ROOT / "recipes/libreoffice_en_cs/tiny.yaml"
FINETUNE = ROOT / "recipes/libreoffice_en_cs/finetune.yaml"
FINETUNED = Path("runs/libreoffice_en_cs_tiny_finetune/checkpoints/last.ckpt")  # relative to a run's directory
FP32 = ROOT / "runs/libreoffice_en_cs_tiny/checkpoints/last.ckpt"
IPQ_STAGES = [["*.ffn.*"], ["*embed*", "*output_projection"], ["*attn.*"]]  # fairseq's order
EMBEDDINGS_FIRST = [IPQ_STAGES[1], IPQ_STAGES[0], IPQ_STAGES[2]]
BLOCK_SIZES = {"*attn.*": 4}  # fairseq's: 8 columns, 4 in attention
MOVED = {"stages": EMBEDDINGS_FIRST, "block_sizes": {"*attn.*": 4, "*.ffn.*": 16}, "centroid_counts": {"*embed*": 4096}}
ROWS = ("fp32_ipq_budget", "int8_post", "int8_qat", "int8_quant_noise", "int4_post", "int4_qat", "int4_quant_noise",
        "ipq_post", "ipq_qat", "ipq_quant_noise", "ipq_int8_quant_noise", "ipq_int8_quant_noise_moved",
        "ipq_quant_noise_kd", "ipq_int8_quant_noise_moved_kd")  # --rows names, in the table's order


def callback_yaml(class_path: str, **init_args) -> str:
    return json.dumps({"trainer": {"callbacks+": [{"class_path": class_path, "init_args": init_args}]}})


def quant_noise(args: argparse.Namespace, scheme: str, block_sizes: dict = BLOCK_SIZES) -> str:
    return callback_yaml("callbacks.QuantNoise", p=args.p, scheme=scheme, block_size=8, block_sizes=block_sizes,
                         include=["model.*"], per_channel=True, seed=0)


def ipq(args: argparse.Namespace, centroid_bits: int, stages: list = IPQ_STAGES, block_sizes: dict = BLOCK_SIZES,
        centroid_counts: Optional[dict] = None) -> str:
    counts = {"centroid_counts": centroid_counts} if centroid_counts else {}
    return callback_yaml("callbacks.IterativeProductQuantization", steps_per_stage=args.ipq_steps // 3,
                         stages=stages, centroids=256, **counts, block_size=8, block_sizes=block_sizes,
                         centroid_bits=centroid_bits, seed=0)


def distillation(teacher: Path) -> str:
    """Word-level KD from the uncompressed model during iPQ fine-tuning: the paper's recipe
    (Fan et al. fine-tune the codewords with a distillation loss; fairseq's release does not)."""
    return callback_yaml("callbacks.KnowledgeDistillation", teacher=str(teacher), temperature=2.0, soft_weight=0.5,
                         hard_weight=0.5)


def qat(bits: int) -> str:
    return callback_yaml("callbacks.QuantizationAwareTraining", bits=bits, per_channel=bits <= 4,
                         include=["model.*"], quantize_embeddings=True)


def finetune(args: argparse.Namespace, name: str, start: Path, add_ons: list[str], steps: int,
             lr: Optional[float] = None) -> Path:
    """``nmt-lightning fit`` of the tiny recipe + finetune.yaml + ``add_ons`` (YAML texts) from ``start``,
    in OUT/runs/<name>: a finished run is reused, an interrupted one resumes from its last checkpoint.
    ``lr``: the peak learning rate instead of finetune.yaml's (the run's name says so)."""
    overrides = [f"--data.data_dir={args.data_dir}", f"--model.init_from={start}"]
    if lr is not None:
        overrides.append(f"--model.lr={lr}")
    if args.val_bleu_sentences is not None:  # validation's beam search is a third of a 1-thread epoch
        overrides.append(f"--model.val_bleu_sentences={args.val_bleu_sentences}")
    return run_fit(args.out, name, [TINY, FINETUNE], add_ons, overrides, FINETUNED, steps)


def build_rows(args: argparse.Namespace) -> list[tuple[str, str, Path, Optional[str]]]:
    """(row, training, checkpoint, export --quantize) for the uncompressed control and every row
    of ``args.rows``, training what is missing."""
    steps, start, ipq_steps = args.steps, args.fp32_checkpoint, args.ipq_steps
    control = finetune(args, "control", start, [], steps)
    lr = args.ipq_lr  # the iPQ stages' peak learning rate (None: finetune.yaml's); it names their runs and rows
    lr_name = f"_lr{lr:g}" if lr else ""  # run directory suffix
    lr_label = f", peak lr {lr:g}" if lr else ""  # training column

    def ipq_finetune(name: str, begin: Path, add_ons: list[str]) -> Path:
        return finetune(args, name + lr_name, begin, add_ons, ipq_steps, lr)

    ipq_noise = [ipq(args, 16), quant_noise(args, "pq")]  # iPQ with Quant-Noise pq on the layers still dense
    ipq_int8_noise_moved = [ipq(args, 8, **MOVED), quant_noise(args, "pq", MOVED["block_sizes"])]  # "bits moved"

    @functools.cache
    def qn_pq() -> Path:  # the Quant-Noise pq model the Quant-Noise iPQ rows start from (looked up once)
        return finetune(args, "quant_noise_pq", start, [quant_noise(args, "pq")], steps)

    rows = {  # --rows name: (method, training, how to train it, export --quantize)
        "fp32_ipq_budget": ("uncompressed", f"fp32 fine-tuning, {steps + ipq_steps} steps (the iPQ rows' budget)",
                            lambda: finetune(args, f"control_{steps + ipq_steps}", start, [], steps + ipq_steps), "fp32"),
        "int8_post": ("int8", "post-processing", lambda: control, "int8"),
        "int8_qat": ("int8", "QAT", lambda: finetune(args, "qat8", start, [qat(8)], steps), None),
        "int8_quant_noise": ("int8", "Quant-Noise", lambda: finetune(
            args, "quant_noise_int8", start, [quant_noise(args, "int8")], steps), None),
        "int4_post": ("int4", "post-processing", lambda: control, "int4"),
        "int4_qat": ("int4", "QAT", lambda: finetune(args, "qat4", start, [qat(4)], steps), None),
        "int4_quant_noise": ("int4", "Quant-Noise", lambda: finetune(
            args, "quant_noise_int4", start, [quant_noise(args, "int4")], steps), None),
        "ipq_post": ("iPQ", "post-processing", lambda: control, "ipq"),
        "ipq_qat": ("iPQ", f"QAT (iPQ fine-tuning){lr_label}", lambda: ipq_finetune("ipq", control, [ipq(args, 16)]),
                    None),
        "ipq_quant_noise": ("iPQ", f"Quant-Noise{lr_label}", lambda: ipq_finetune(
            "quant_noise_ipq", qn_pq(), ipq_noise), None),
        "ipq_int8_quant_noise": ("iPQ & int8", f"Quant-Noise{lr_label}", lambda: ipq_finetune(
            "quant_noise_ipq_int8", qn_pq(), [ipq(args, 8), quant_noise(args, "pq")]), "int8"),
        "ipq_int8_quant_noise_moved": ("iPQ & int8", f"Quant-Noise, bits moved{lr_label}", lambda: ipq_finetune(
            "quant_noise_ipq_int8_moved", qn_pq(), ipq_int8_noise_moved), "int8"),
        "ipq_quant_noise_kd": ("iPQ", f"Quant-Noise + distillation{lr_label}", lambda: ipq_finetune(
            "quant_noise_ipq_kd", qn_pq(), ipq_noise + [distillation(control)]), None),
        "ipq_int8_quant_noise_moved_kd": ("iPQ & int8", f"Quant-Noise + distillation, bits moved{lr_label}",
                                          lambda: ipq_finetune("quant_noise_ipq_int8_moved_kd", qn_pq(),
                                                               ipq_int8_noise_moved + [distillation(control)]), "int8"),
    }
    assert tuple(rows) == ROWS, "ROWS names the rows of build_rows, in order"
    selected = [("uncompressed", "fp32 fine-tuning (control)", control, "fp32")]
    for name, (method, training, train, quantize) in rows.items():
        if name in args.rows:
            selected.append((method, training, train(), quantize))
    return selected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/quant_noise")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data/libreoffice_en_cs")
    parser.add_argument("--fp32-checkpoint", type=Path, default=FP32)
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps of a row (iPQ rows: these, then --ipq-steps)")
    parser.add_argument("--ipq-steps", type=int, default=None,
                        help="iPQ fine-tuning steps, a third per stage (default: 2 x --steps)")
    parser.add_argument("--ipq-lr", type=float, default=None,
                        help="peak learning rate of the iPQ stages (default: finetune.yaml's 0.001, each stage "
                             "warming up to it again); the iPQ runs and rows are named after it")
    parser.add_argument("--p", type=float, default=0.1, help="Quant-Noise's fraction of noised blocks")
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--val-bleu-sentences", type=int, default=None,
                        help="validation BLEU on this many sentences while fine-tuning (default: the recipe's 300); "
                             "it only informs the log, rows export their last checkpoint")
    parser.add_argument("--throughput-steps", type=int, default=30)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                        help="rows to train and score besides the uncompressed control (default: all)")
    args = parser.parse_args()
    # Fine-tuning runs in its own directory: every path handed to it must be absolute.
    args.out, args.data_dir, args.fp32_checkpoint = (p.resolve() for p in (args.out, args.data_dir, args.fp32_checkpoint))
    for path, what in ((args.fp32_checkpoint, "--fp32-checkpoint"), (args.data_dir / "test.en", "--data-dir")):
        if not path.exists():
            sys.exit(f"{what}: {path} does not exist; run bash recipes/libreoffice_en_cs/main_job.sh first")
    check_given_model(args.fp32_checkpoint, "--fp32-checkpoint", MAIN_JOB_MODEL,
                      default=args.fp32_checkpoint == parser.get_default("fp32_checkpoint").resolve())
    if args.ipq_steps is None:
        args.ipq_steps = 2 * args.steps
    if args.ipq_steps < 3:
        sys.exit(f"--ipq-steps: {args.ipq_steps} leaves an iPQ stage without a step; give at least 3")
    if args.ipq_lr is not None and not args.ipq_lr > 0:
        sys.exit(f"--ipq-lr: {args.ipq_lr}; give a learning rate above 0")
    if args.val_bleu_sentences is not None and args.val_bleu_sentences < 1:
        sys.exit(f"--val-bleu-sentences: {args.val_bleu_sentences}; give at least 1 (or leave it out for the recipe's 300)")
    args.out.mkdir(parents=True, exist_ok=True)

    from nmt_lightning.evaluation import read_lines, score
    from nmt_lightning.translation_file import export_checkpoint, load_exported
    from nmt_lightning.translate import translate_lines

    rows = build_rows(args)
    sources, references = read_lines(args.data_dir / "test.en"), read_lines(args.data_dir / "test.cs")
    results, files = [], {}
    for method, training, checkpoint, quantize in rows:
        key = f"{method}, {training}"
        slug = key.replace(" ", "_").replace(",", "").replace("&", "and").replace("(", "").replace(")", "")
        model_file = args.out / "exports" / f"{slug}.safetensors"
        if not model_file.is_file():
            model_file.parent.mkdir(parents=True, exist_ok=True)
            export_checkpoint(checkpoint, model_file, quantize)
        files[key] = model_file

        def evaluate() -> dict:
            print(f"translating the test split: {key}", file=sys.stderr, flush=True)
            hypotheses = translate_lines(load_exported(model_file), sources, beam=4)
            scores = score(hypotheses, references)
            return {"bleu": scores.bleu, "chrf": scores.chrf, "bytes": model_file.stat().st_size}

        results.append((method, training, key, cached(args.out / "scores" / f"{slug}.json", evaluate)))

    models = {key: load_exported(path) for key, path in files.items()}
    rounds = translation_speed_rounds(args.out / "speed_rounds.json", models, sources[: args.sentences], args.rounds)
    throughput = cached(args.out / "throughput.json", lambda: training_throughput(args))

    fp32_bytes, fp32_weights = results[0][3]["bytes"], weight_bytes(files[results[0][2]])
    header = ["method", "training", "bytes on disk", "compression", "weights only", "BLEU", "chrF2", "sentences/s"]
    table = []
    for method, training, key, result in results:
        speed = statistics.median(r[key] for r in rounds)
        table.append([method, training, f"{result['bytes']:,}", f"x{fp32_bytes / result['bytes']:.1f}",
                      f"x{fp32_weights / weight_bytes(files[key]):.1f}", f"{result['bleu']:.2f}",
                      f"{result['chrf']:.2f}", f"{speed:.1f}"])
    text = write_table(args.out / "quant_noise_table.csv", header, table)
    text += [
        "",
        f"Test split: {len(references)} sentences of {args.data_dir}, beam 4. Every row fine-tuned {args.steps} steps "
        f"from {args.fp32_checkpoint} (iPQ rows {args.steps} + {args.ipq_steps}); Quant-Noise p = {args.p}, blocks of 8 columns "
        f"(4 in attention); iPQ: 256 codewords, stages feed-forward, embeddings, attention (\"bits moved\": "
        f"embeddings with 4096 codewords first, then feed-forward in blocks of 16, then attention). Compression: the fp32 "
        f"export's bytes over the row's (both include the sentencepiece model); weights only: the same for the "
        f"tensors alone, without the sentencepiece model and the file's header (what the paper's ratios count). "
        f"Speed: {args.rounds} rounds over the first {args.sentences} test sentences, models taking turns, "
        f"{torch.get_num_threads()} threads on {cpu_description()}.",
        "Training throughput (target tokens/s, Lightning, the same batches, taking turns; median of rounds): "
        + ", ".join(f"{name} {value:.0f} ({value / throughput['plain'] - 1:+.1%})" for name, value in throughput.items()),
        f"Reproduce: python recipes/benchmarks/quant_noise.py --out {args.out} --steps {args.steps} --p {args.p}"
        + ("" if args.fp32_checkpoint == parser.get_default("fp32_checkpoint").resolve()
           else f" --fp32-checkpoint {args.fp32_checkpoint}")
        + ("" if args.data_dir == parser.get_default("data_dir").resolve() else f" --data-dir {args.data_dir}")
        + ("" if args.ipq_steps == 2 * args.steps else f" --ipq-steps {args.ipq_steps}")
        + ("" if args.ipq_lr is None else f" --ipq-lr {args.ipq_lr:g}")
        + ("" if args.val_bleu_sentences is None else f" --val-bleu-sentences {args.val_bleu_sentences}")
        + ("" if args.throughput_steps == parser.get_default("throughput_steps")
           else f" --throughput-steps {args.throughput_steps}")
        + ("" if set(args.rows) == set(ROWS) else f" --rows {' '.join(args.rows)}"),
    ]
    (args.out / "quant_noise_table.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    print("\n".join(text))
    plot(results, args.out / "quant_noise_frontier.png")


def training_throughput(args: argparse.Namespace) -> dict[str, float]:
    """Target tokens/s of plain training and of training with each Quant-Noise scheme, side by side."""
    from training_throughput import first_batches, lightning_loop  # recipes/benchmarks/training_throughput.py

    from callbacks import QuantNoise
    from nmt_lightning.module import TranslationModule

    datamodule, batches, tokens = first_batches(args.data_dir, args.throughput_steps, max_tokens=4096)

    def fresh() -> TranslationModule:
        torch.manual_seed(0)
        return TranslationModule(datamodule.src_vocab_size, datamodule.tgt_vocab_size, preset="tiny", pre_norm=True,
                                 val_bleu=False)

    variants = {"plain": lambda: (), **{f"Quant-Noise {s}": (lambda s=s: (QuantNoise(
        p=args.p, scheme=s, block_size=8, block_sizes={"*attn.*": 4}),)) for s in ("int8", "int4", "pq")}}
    lightning_loop(fresh(), batches[:3])  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(3):
        for name, callbacks in variants.items():
            rates[name].append(tokens / lightning_loop(fresh(), batches, callbacks()))
    return {name: statistics.median(values) for name, values in rates.items()}


def plot(results: list, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    markers = (("fp32", "D"), ("post-processing", "o"), ("QAT", "s"), ("Quant-Noise + distillation", "P"),
               ("Quant-Noise", "*"))  # by how the training column starts, first match
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for method, training, _, result in results:
        marker = next((m for start, m in markers if training.startswith(start)), "o")
        axes.scatter(result["bytes"] / 1e6, result["bleu"], marker=marker, s=70, label=f"{method}, {training}")
    axes.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    axes.xaxis.set_major_formatter(plain)
    axes.xaxis.set_minor_formatter(plain)
    axes.set_xlabel("bytes on disk (MB, log scale)")
    axes.set_ylabel("BLEU (test, beam 4)")
    axes.set_title("LibreOffice en→cs, tiny Transformer: size against quality")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
