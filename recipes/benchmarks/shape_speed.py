"""How fast a model shape decodes, before any training: latency and throughput of random-weight
models of given depths and pruned widths, in every engine of ``efficiency.py``.

    python recipes/benchmarks/shape_speed.py --out runs/shape_speed \\
        --shape "teacher 6+6=6+6" --shape "student 6+2=6+2" \\
        --shape "student 6+2, half removed=6+2,prune=0.5" \\
        --shape "student 6+2, decoder 3/4 removed=6+2,prune=0.5:0.75"

A shape is ``ENCODER+DECODER`` layers at the ``--preset`` width (the tiny one: d_model 256, 4
heads, 1,024 feed-forward neurons, the 8,000-piece vocabulary of ``--data-dir``, shared
embeddings), optionally with ``prune=F`` (that fraction of every layer's heads and feed-forward
neurons removed, as ``StructuredPruning(scope="layer")`` leaves a model) or ``prune=FE:FD`` (one
fraction for the encoder, one for the decoder). The first shape is the reference.

The time of a translation depends on the weights only through the length of what it emits, so
the lengths are fixed: every sentence decodes exactly as many target pieces as its reference
translation has (beam ``--beam``; end of sentence forbidden before, forced after). Latency: one
thread, one sentence at a time, the first ``--latency-sentences`` test sentences. Throughput:
``--threads`` threads, batches of 32 sentences of similar source length (as both engines batch),
each batch decoding its sentences' mean reference length, the first ``--sentences`` sentences.
Sentencepiece runs before the clock starts. Each row in a fresh process, ``--rounds`` rounds
with the shapes taking turns; a ratio is the median of the per-round ratios to the reference's
``CTranslate2 float32`` row. The random models are built, exported and converted once (cached in
``--out``); rounds are cached. Writes ``--out``/shape_speed.md, .csv and .png (each ratio, per
shape and engine).

What it answers: which student shape can reach a speed target, and how much of a ratio the
parts that do not shrink (the embeddings, the output layer, the search) allow, before paying
for the training. A trained model's own ratio also carries its output lengths; compare with
``efficiency.py`` on the trained models (docs/fast_students.md does). To time a CPU without
AVX-512 or VNNI on one with them, cap the libraries' kernels in the environment
(``side_by_side.ISA_CAPS``, e.g. ``ONEDNN_MAX_CPU_ISA=AVX2``); the table's CPU line and its
command name the caps. Never time anything while another job trains on the same machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficiency import (ENGINES, REFERENCE_ENGINE, THROUGHPUT_BATCH, Row, add_measurement_options,  # noqa: E402
                        add_worker_options, bytes_on_disk, check_measurement_options, deployed_rows, percentile,
                        sentences_file, speed_rounds, worker_report)
from side_by_side import cpu_description, file_slug, reproduce_line, write_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Shape:
    name: str
    encoder_layers: int
    decoder_layers: int
    encoder_prune: float = 0.0  # fraction of each encoder layer's heads and neurons removed
    decoder_prune: float = 0.0  # the same for every decoder attention (self and cross) and feed-forward block


def parse_shape(text: str) -> Shape:
    """``NAME=E+D[,prune=F | ,prune=FE:FD]`` -> Shape; ValueError naming the part that is wrong."""
    name, _, spec = text.partition("=")
    if not name or not spec:
        raise ValueError(f"--shape {text!r}: give NAME=ENCODER+DECODER[,prune=F or FE:FD]")
    depth, *options = spec.split(",")
    try:
        encoder, decoder = (int(part) for part in depth.split("+"))
    except ValueError:
        raise ValueError(f"--shape {text!r}: the layers are ENCODER+DECODER, e.g. 6+2, got {depth!r}") from None
    if encoder < 1 or decoder < 1:
        raise ValueError(f"--shape {text!r}: at least one encoder and one decoder layer")
    fractions = (0.0, 0.0)
    for option in options:
        key, _, value = option.partition("=")
        if key.strip() != "prune":
            raise ValueError(f"--shape {text!r}: unknown option {option!r} (only prune=F or prune=FE:FD)")
        try:
            parts = [float(part) for part in value.split(":")]
        except ValueError:
            raise ValueError(f"--shape {text!r}: prune takes fractions, got {value!r}") from None
        if len(parts) not in (1, 2) or not all(0.0 <= part < 1.0 for part in parts):
            raise ValueError(f"--shape {text!r}: prune is F or FE:FD, each in [0, 1), got {value!r}")
        fractions = (parts[0], parts[-1])
    return Shape(name.strip(), encoder, decoder, *fractions)


def build_checkpoint(shape: Shape, data_dir: Path, preset: str, path: Path, **width: Optional[int]) -> Path:
    """A checkpoint of a random-weight model of ``shape``, its pruned units recorded as a
    ``StructuredPruning`` run records them (so the export cuts them out), written to ``path``.
    ``width``: d_model, ffn_dim, heads other than the preset's (None: the preset's)."""
    import torch

    from callbacks import StructuredPruning
    from nmt_lightning.data import TranslationDataModule
    from nmt_lightning.module import TranslationModule
    from nmt_lightning.tokenization import Tokenization

    torch.manual_seed(0)
    data = TranslationDataModule(str(data_dir))
    module = TranslationModule(data.src_vocab_size, data.tgt_vocab_size, preset=preset, pre_norm=True,
                               share_embeddings="all", encoder_layers=shape.encoder_layers,
                               decoder_layers=shape.decoder_layers, **width)
    module.tokenization = Tokenization.from_datamodule(data)
    prunings = []
    for part, fraction in (("encoder", shape.encoder_prune), ("decoder", shape.decoder_prune)):
        if fraction > 0:
            # Which units go does not matter for the time: the smallest by magnitude, as the baseline picks.
            pruning = StructuredPruning(prune_heads=fraction, prune_neurons=fraction, importance="magnitude",
                                        start_step=0, end_step=0, include=[f"model.{part}_layers.*"])
            pruning.setup(None, module, "fit")
            pruning.on_train_start(None, module)
            pruning.prune(step=0)
            prunings.append(pruning)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    for pruning in prunings:
        pruning.on_save_checkpoint(None, module, checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def reference_lengths(data_dir: Path, count: int, checkpoint: Path) -> list[int]:
    """Target pieces of the first ``count`` reference translations of the test split."""
    from nmt_lightning.evaluation import read_lines
    from nmt_lightning.loading import load_translation_module

    tokenization = load_translation_module(checkpoint).tokenization
    return [len(ids) for ids in tokenization.encode_target(read_lines(data_dir / "test.cs")[:count])]


def worker(args: argparse.Namespace) -> None:
    """Load one model, decode the input at its fixed lengths as ``--mode`` asks, print a JSON report."""
    import torch

    from nmt_lightning.evaluation import read_lines

    torch.set_num_threads(args.threads)
    lines = read_lines(args.input)
    lengths = json.loads(Path(args.lengths).read_text())[: len(lines)]
    batch_size = 1 if args.mode == "latency" else THROUGHPUT_BATCH
    if args.kind == "ctranslate2":
        from nmt_lightning.deploy import CTranslate2Model

        model = CTranslate2Model(args.path, threads=args.threads, shortlist=args.shortlist)
        processor = model.tokenization._processor("src")
        limit = model.decoding["max_positions"] - 1
        sources = [processor.id_to_piece(ids[:limit]) for ids in model.tokenization.encode_source(lines)]
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        batches = [([sources[i] for i in chunk], round(statistics.mean(lengths[i] for i in chunk)))
                   for chunk in (order[s : s + batch_size] for s in range(0, len(order), batch_size))]

        def translate(work: list) -> list[int]:
            # length + 1 steps, as our decoder's (whose last emits eos; CTranslate2 stops at the cap
            # without it); all queued at once (asynchronous), so one batch runs per thread, as
            # CTranslate2Model.translate_lines does.
            pending = [model.translator.translate_batch(
                pieces, beam_size=args.beam, max_input_length=0, min_decoding_length=length + 1,
                max_decoding_length=length + 1, use_vmap=model.shortlist, asynchronous=True)
                for pieces, length in work]
            return [len(future.result().hypotheses[0]) for futures in pending for future in futures]
    else:
        from nmt_lightning.decoding import beam_search
        from nmt_lightning.loading import load_for_translation
        from nmt_lightning.shortlist import Shortlist
        from nmt_lightning.translate import source_batches

        module = load_for_translation(args.path, "cpu")
        shortlist = Shortlist.read(args.vocabulary_map, module.tokenization) if args.shortlist else None
        limit = module.model.config.max_positions - 1
        batches = [(source, round(statistics.mean(lengths[i] for i in chunk)))
                   for chunk, source in source_batches(module.tokenization.encode_source(lines), batch_size, limit)]

        def translate(work: list) -> list[int]:
            steps = []
            with torch.inference_mode():
                for source, length in work:
                    vocabulary = None if shortlist is None else shortlist.candidates(source)
                    # length + 1 tokens, eos the last: forbidden before, the only choice at the cap.
                    found = beam_search(module.model, source, args.beam, max_len_a=0.0, max_len_b=length + 1,
                                        min_length=length + 1, vocabulary=vocabulary)
                    steps += [len(tokens) + 1 for tokens in found.tokens]  # + 1: the eos step
            return steps

    translate(batches[:2])  # warm-up: lazy initialisation is not timed
    report: dict = {}
    if args.mode == "latency":
        times, steps = [], []
        for batch in batches:
            started = time.perf_counter()
            steps += translate([batch])
            times.append(time.perf_counter() - started)
        report["milliseconds"] = [1000 * t for t in times]
    else:
        started = time.perf_counter()
        steps = translate(batches)
        report["seconds"] = time.perf_counter() - started
    # The premise of the timing: every sentence ran exactly its batch's length + 1 decoder steps.
    expected = [length + 1 for sources, length in batches for _ in range(len(sources))]  # (B, S) or B piece lists
    if steps != expected:
        raise RuntimeError(f"{args.path}: the decoder ran {sum(steps)} steps in all, not the {sum(expected)} asked for")
    report["decoder_steps"] = steps
    print(json.dumps(report))


def run_worker(args: argparse.Namespace, row: Row, mode: str, threads: int) -> dict:
    """Decode the first ``--latency-sentences`` or ``--sentences`` test sentences at their fixed lengths
    in a fresh process; its JSON report (per-sentence times or seconds, decoder steps)."""
    count = args.latency_sentences if mode == "latency" else args.sentences
    return worker_report(Path(__file__), row, mode, args.out / f"test_{count}.en", threads, args.beam,
                         ["--lengths", str(args.out / "lengths.json")])


def plot(path: Path, shapes: list[str], engines: list[str], ratios: dict[tuple[str, str], tuple[float, float]]) -> None:
    """Throughput and latency gain of every shape (rows) in every engine (bars), on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(shapes) * len(engines) / 3 + 2), sharey=True)
    height = 0.8 / len(engines)
    for which, (axis, title) in enumerate(zip(axes, ("throughput vs reference", "latency gain"))):
        for index, engine in enumerate(engines):
            values = [ratios[(shape, engine)][which] for shape in shapes]
            axis.barh([row + index * height for row in range(len(shapes))], values, height, label=engine)
        axis.axvline(1.0, color="black", linewidth=0.6)
        axis.set_xscale("log")
        axis.set_xlabel(f"{title} (x)")
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks([row + 0.4 - height / 2 for row in range(len(shapes))], shapes, fontsize=7)
    axes[0].invert_yaxis()
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="benchmark", choices=["benchmark", "worker"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/shape_speed")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data/libreoffice_en_cs",
                        help="a prepared corpus: its vocabulary, test split and (for the shortlist) training data")
    parser.add_argument("--shape", action="append", default=[], metavar="NAME=E+D[,prune=F|FE:FD]",
                        help="a model shape to time; repeat; the first is the reference")
    parser.add_argument("--preset", default="tiny", help="the width (a Transformer preset; default: %(default)s)")
    for option in ("--d-model", "--ffn-dim", "--heads"):
        parser.add_argument(option, type=int, help="the preset's, unless given")
    add_measurement_options(parser)
    add_worker_options(parser, "--lengths")
    args = parser.parse_args(argv)
    if args.mode == "worker":
        args.mode = args.worker_mode
        worker(args)
        return
    try:
        shapes = [parse_shape(text) for text in args.shape]
    except ValueError as error:
        parser.error(str(error))
    if not shapes:
        parser.error("give the shapes to time: --shape NAME=E+D[,prune=F] (the first is the reference)")
    if len({shape.name for shape in shapes}) != len(shapes):
        parser.error("--shape: every shape needs its own name")
    check_measurement_options(parser, args)
    if not (args.data_dir / "test.en").is_file():
        parser.error(f"--data-dir {args.data_dir}: no test.en (prepare the corpus first: nmt-lightning prepare)")
    args.out.mkdir(parents=True, exist_ok=True)
    width = {"d_model": args.d_model, "ffn_dim": args.ffn_dim, "heads": args.heads}
    # What each name was built as: the exports, conversions and rounds under --out are cached by name.
    record = args.out / "shapes.json"
    built = json.loads(record.read_text()) if record.is_file() else {}
    for shape in shapes:
        spec = {**asdict(shape), "preset": args.preset, **width}
        if built.get(shape.name, spec) != spec:
            parser.error(f"--shape {shape.name}: {args.out} holds a model of that name built as {built[shape.name]}; "
                         f"give it another name or another --out")
        built[shape.name] = spec
    record.write_text(json.dumps(built, indent=1))
    checkpoints = {}
    for shape in shapes:
        path = args.out / "checkpoints" / f"{file_slug(shape.name)}.ckpt"
        checkpoints[shape.name] = path if path.is_file() else build_checkpoint(shape, args.data_dir, args.preset, path,
                                                                               **width)
    for count in {args.sentences, args.latency_sentences}:
        sentences_file(args, count, f"test_{count}")
    lengths = reference_lengths(args.data_dir, max(args.sentences, args.latency_sentences), checkpoints[shapes[0].name])
    (args.out / "lengths.json").write_text(json.dumps(lengths))
    rows = deployed_rows(args, checkpoints)
    speeds = speed_rounds(args, rows, lambda row: {
        "milliseconds": run_worker(args, row, "latency", 1)["milliseconds"],
        "sentences_per_second": args.sentences / run_worker(args, row, "throughput", args.threads)["seconds"]})
    reference = speeds[Row(shapes[0].name, REFERENCE_ENGINE, Path()).name]

    def per_round(row: Row, value) -> list[float]:  # reference / row of each round, both from that round
        return [value(b) / value(a) for a, b in zip(speeds[row.name], reference)]

    def ratio(row: Row, value) -> float:
        return statistics.median(per_round(row, value))

    def median_ms(measured: dict) -> float:
        return statistics.median(measured["milliseconds"])

    table, ratios = [], {}
    for row in rows:
        rounds = speeds[row.name]
        spread = sorted(per_round(row, lambda r: 1 / r["sentences_per_second"]))  # the rounds' throughput ratios
        throughput, latency = ratios[(row.model, row.engine)] = (statistics.median(spread), ratio(row, median_ms))
        table.append([row.model, row.engine, f"{bytes_on_disk(row.path):,}",
                      f"{statistics.median(median_ms(r) for r in rounds):.1f}",
                      f"{percentile([ms for r in rounds for ms in r['milliseconds']], 0.9):.1f}",
                      f"{latency:.2f}x", f"{statistics.median(r['sentences_per_second'] for r in rounds):.1f}",
                      f"{throughput:.2f}x", f"{spread[0]:.2f}x to {spread[-1]:.2f}x"])
    header = ["shape", "engine", "bytes on disk", "latency median (ms)", "latency p90 (ms)", "latency gain",
              "sentences/s", "throughput vs reference", "rounds' throughput ratios"]
    text = write_table(args.out / "shape_speed.csv", header, table)
    text += ["", f"Random-weight models at the {args.preset} width, every sentence decoding its reference's length "
                 f"in target pieces, beam {args.beam}; reference: {shapes[0].name}, {REFERENCE_ENGINE}. Latency: 1 "
                 f"thread, one sentence at a time, the first {args.latency_sentences} test sentences (median of the "
                 f"rounds' medians; p90 over every sentence). Throughput: {args.threads} threads, batches of "
                 f"{THROUGHPUT_BATCH}, the first {args.sentences} sentences, the median round. {args.rounds} rounds, "
                 f"the shapes taking turns; ratios are medians of per-round ratios. Measured "
                 f"{time.strftime('%Y-%m-%d')} on {cpu_description()}.",
             "", reproduce_line("shape_speed.py", argv)]
    (args.out / "shape_speed.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    plot(args.out / "shape_speed.png", [shape.name for shape in shapes], [e for e in ENGINES if e in args.engines],
         ratios)
    print("\n".join(text))


if __name__ == "__main__":
    main()
