"""The ``nmt-lightning`` command.

- ``prepare``: build a data directory (text splits, BPE, memory-mapped ids);
- ``fit | validate | test | predict``: LightningCLI with YAML recipes;
- ``translate``: translate a file (or stdin) with a checkpoint, an export or a CTranslate2
  directory, optionally scoring it;
- ``average``: average the weights of several checkpoints;
- ``distill-data``: translate a corpus' source side with a teacher (sequence-level KD data);
- ``export``: write a model to one safetensors file (fp32 or int8), or to a CTranslate2 directory;
- ``shortlist``: a target-vocabulary shortlist (CTranslate2's vocabulary map) from the training data.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from nmt_lightning.cpu_allocator import relaunch_with_tuned_allocator
from nmt_lightning.errors import CorpusError
from nmt_lightning.prepare import PrepareConfig, prepare


def _prepare_parser() -> argparse.ArgumentParser:
    defaults = PrepareConfig(out_dir="")
    parser = argparse.ArgumentParser(
        prog="nmt-lightning prepare",
        description="Build a data directory: clean text splits, a sentencepiece BPE model and memory-mapped token ids.",
    )
    source = parser.add_argument_group("corpus (either --corpus or --train/--valid/--test)")
    source.add_argument("--corpus", choices=["libreoffice"], help="the embedded LibreOffice help corpus (Debian packages)")
    source.add_argument("--train", help="prefix of line-aligned files PREFIX.SRC / PREFIX.TGT (plain or .gz)")
    source.add_argument("--valid", help="file prefix, or sacrebleu:NAME (e.g. sacrebleu:wmt18)")
    source.add_argument("--test", help="file prefix, or sacrebleu:NAME (e.g. sacrebleu:wmt19)")
    source.add_argument("--help-root", help="an unpacked LibreOffice help directory (holds <lang>/text/...); skips apt-get")
    source.add_argument("--cache-dir", default=defaults.cache_dir, help="where downloaded packages are kept (default: %(default)s)")
    parser.add_argument("--src", default=defaults.src, help="source language code (default: %(default)s)")
    parser.add_argument("--tgt", default=defaults.tgt, help="target language code (default: %(default)s)")
    parser.add_argument("--out", required=True, dest="out_dir", help="output data directory")
    split = parser.add_argument_group("splitting and filtering")
    split.add_argument("--valid-size", type=int, default=defaults.valid_size, help="LibreOffice: valid pairs held out (default: %(default)s)")
    split.add_argument("--test-size", type=int, default=defaults.test_size, help="LibreOffice: test pairs held out (default: %(default)s)")
    split.add_argument("--seed", type=int, default=defaults.seed, help="seed of the held-out split (default: %(default)s)")
    split.add_argument("--max-words", type=int, default=defaults.max_words, help="drop training pairs with a longer side (default: %(default)s)")
    split.add_argument("--max-length-ratio", type=float, default=defaults.max_length_ratio, help="drop training pairs whose word counts differ by more (default: %(default)s)")
    bpe = parser.add_argument_group("subwords")
    bpe.add_argument("--vocab-size", type=int, default=defaults.vocab_size, help="BPE vocabulary size (default: %(default)s)")
    bpe.add_argument("--separate-vocab", dest="joint_vocab", action="store_false", help="one BPE model per language instead of a joint one")
    bpe.add_argument("--moses-normalize", action="store_true", help="Moses punctuation normalisation (sacremoses) before BPE")
    bpe.add_argument("--bpe-from", help="reuse the sentencepiece models (and normalisation) of this prepared data "
                                        "directory instead of training new ones: a distilled corpus keeps its teacher's token ids")
    bpe.add_argument("--spm-input-sentence-size", type=int, default=defaults.spm_input_sentence_size, help="sentences sampled to train BPE (default: %(default)s)")
    return parser


def prepare_main(argv: Sequence[str]) -> int:
    args = _prepare_parser().parse_args(argv)
    try:
        prepare(PrepareConfig(**vars(args)))
    except (CorpusError, ValueError, FileNotFoundError) as error:
        print(f"nmt-lightning prepare: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nmt-lightning prepare: interrupted; files already prepared are unchanged", file=sys.stderr)
        return 130
    return 0


def translate_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="nmt-lightning translate",
                                     description="Translate detokenized lines, one sentence a line.")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint written by 'nmt-lightning fit' or 'average', a file written by 'export', "
                             "or a directory written by 'export --format ctranslate2'")
    parser.add_argument("--input", help="source file (default: stdin)")
    parser.add_argument("--output", help="output file (default: stdout)")
    parser.add_argument("--beam", type=int, default=4, help="beam size; 1 is greedy search (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per batch (default: %(default)s)")
    parser.add_argument("--ref", help="reference file: print cased/uncased BLEU and chrF2 on stderr")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda, cuda:1, ... (default: %(default)s); int8/int4 kernels are CPU-only, so on a "
                             "GPU such a model computes with its decoded weights")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's default, one per core)")
    parser.add_argument("--parallel-batches", type=int,
                        help="CTranslate2 only: batches translated at once, sharing --threads "
                             "(default on CPU: one per thread; on GPU: 1)")
    parser.add_argument("--no-shortlist", dest="shortlist", action="store_false", default=None,
                        help="CTranslate2 only: the whole target vocabulary even where the model has a vocabulary "
                             "map (by default it is used when present)")
    parser.add_argument("--vocabulary-map",
                        help="our decoder: restrict each batch's output to the candidates of this vocabulary map "
                             "('nmt-lightning shortlist'); a CTranslate2 model carries its own")
    args = parser.parse_args(argv)
    from nmt_lightning.deploy.ctranslate2_files import is_ctranslate2_model
    from nmt_lightning.evaluation import read_lines, score

    try:
        if args.beam < 1 or args.batch_size < 1:
            raise ValueError(f"--beam and --batch-size must be >= 1, got {args.beam} and {args.batch_size}")
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        if is_ctranslate2_model(args.checkpoint):
            from nmt_lightning.deploy import CTranslate2Model

            if args.vocabulary_map is not None:
                raise ValueError("--vocabulary-map: a CTranslate2 model carries its map (nmt-lightning export "
                                 "--format ctranslate2 --vocabulary-map); --no-shortlist turns it off")
            model = CTranslate2Model(args.checkpoint, args.device, args.threads, args.parallel_batches,
                                     shortlist=args.shortlist)
            translate = model.translate_lines
        else:
            if args.parallel_batches is not None:
                raise ValueError("--parallel-batches applies to CTranslate2 models only")
            if args.shortlist is not None:
                raise ValueError("--no-shortlist applies to CTranslate2 models only (ours uses a map only when "
                                 "given --vocabulary-map)")
            from nmt_lightning.loading import load_for_translation
            from nmt_lightning.translate import translate_lines

            if args.threads is not None:
                import torch

                torch.set_num_threads(args.threads)
            module = load_for_translation(args.checkpoint, args.device)
            shortlist = None
            if args.vocabulary_map is not None:
                from nmt_lightning.shortlist import Shortlist

                shortlist = Shortlist.read(args.vocabulary_map, module.tokenization)

            def translate(lines: list[str], **options) -> list[str]:
                return translate_lines(module, lines, shortlist=shortlist, **options)
        lines = read_lines(args.input) if args.input else sys.stdin.read().splitlines()
        references = read_lines(args.ref) if args.ref else None
        if references is not None and len(references) != len(lines):
            raise CorpusError(f"{args.ref} has {len(references)} lines but the input has {len(lines)}")
        started = time.perf_counter()
        translations = translate(lines, beam=args.beam, batch_size=args.batch_size)
        seconds = time.perf_counter() - started
    except (CorpusError, ValueError, FileNotFoundError, ImportError) as error:
        print(f"nmt-lightning translate: error: {error}", file=sys.stderr)
        return 2
    text = "".join(line + "\n" for line in translations)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    print(f"translated {len(lines)} sentences in {seconds:.1f}s ({len(lines) / max(seconds, 1e-9):.1f} sentences/s, "
          f"beam {args.beam})", file=sys.stderr)
    if references is not None:
        print(score(translations, references).report(), file=sys.stderr)
    return 0


def average_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="nmt-lightning average", description="Average the weights of checkpoints.")
    parser.add_argument("checkpoints", nargs="*", help="checkpoint files")
    parser.add_argument("--dir", help="also take checkpoints from this directory: the last --last by training step")
    parser.add_argument("--last", type=int, default=5, help="with --dir: how many, by training step (default: %(default)s)")
    parser.add_argument("--output", required=True, help="the averaged checkpoint")
    args = parser.parse_args(argv)
    from nmt_lightning.loading import average_checkpoints, last_checkpoints_by_step

    paths = list(args.checkpoints)
    try:
        if args.dir:
            paths += [str(p) for p in last_checkpoints_by_step(args.dir, args.last)]
        output = average_checkpoints(paths, args.output)
    except (CorpusError, ValueError) as error:
        print(f"nmt-lightning average: error: {error}", file=sys.stderr)
        return 2
    print(f"averaged {len(paths)} checkpoints into {output}: " + ", ".join(paths), file=sys.stderr)
    return 0


def _export_ctranslate2(args: argparse.Namespace) -> int:
    from nmt_lightning.deploy import convert_to_ctranslate2

    try:
        if args.quantize is not None:
            raise ValueError("--quantize chooses our own file's encoding; for CTranslate2 use --quantization")
        report = convert_to_ctranslate2(args.checkpoint, args.output, args.quantization, args.force,
                                        args.vocabulary_map)
    except (CorpusError, ValueError, ImportError, OSError) as error:
        print(f"nmt-lightning export: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {report.output}/: CTranslate2 model, weights {report.quantization}, {report.bytes_on_disk:,} bytes "
          f"(model.bin {report.model_bytes:,}); translate with: nmt-lightning translate --checkpoint {report.output}",
          file=sys.stderr)
    return 0


def export_main(argv: Sequence[str]) -> int:
    from nmt_lightning.deploy.ctranslate2_files import QUANTIZATIONS

    parser = argparse.ArgumentParser(prog="nmt-lightning export",
                                     description="Write a trained model to one safetensors file (fp32 or int8), or to a "
                                                 "CTranslate2 model directory.")
    parser.add_argument("--checkpoint", required=True,
                        help="a Lightning checkpoint of a translation model (or, for --format ctranslate2, an export file)")
    parser.add_argument("--output", required=True,
                        help="the .safetensors file to write (--format nmt-lightning) or the directory (ctranslate2)")
    parser.add_argument("--format", choices=["nmt-lightning", "ctranslate2"], default="nmt-lightning",
                        help="nmt-lightning: one safetensors file for 'translate'; ctranslate2: a CTranslate2 model "
                             "directory, written by CTranslate2's converter API (needs the ctranslate2 extra) "
                             "(default: %(default)s)")
    parser.add_argument("--quantize", choices=["int8", "int4", "ipq", "fp32"],
                        help="nmt-lightning format: int8 (per tensor) or int4 (per row, two weights a byte) quantizes "
                             "every nn.Linear / nn.Embedding weight not quantized yet (post-training); ipq: k-means "
                             "product quantization of an uncompressed checkpoint without fine-tuning (256 codewords, "
                             "blocks of 8, 4 in attention); fp32 leaves out the quantization. Default: what the "
                             "checkpoint's compression callbacks recorded (int8 after QuantizationAwareTraining, int4 "
                             "after QuantNoise(scheme='int4'), iPQ after IterativeProductQuantization), else fp32")
    parser.add_argument("--quantization", choices=QUANTIZATIONS,
                        help="ctranslate2 format: the stored weight type (CTranslate2 quantizes each row of a weight "
                             "matrix itself; a QAT-trained model passes its trained int8 grid) (default: float32)")
    parser.add_argument("--force", action="store_true", help="ctranslate2 format: replace an existing model directory")
    parser.add_argument("--vocabulary-map", help="ctranslate2 format: a target-vocabulary shortlist written by "
                                                 "'nmt-lightning shortlist', stored with the model and used when it "
                                                 "translates")
    args = parser.parse_args(argv)
    if args.format == "ctranslate2":
        return _export_ctranslate2(args)
    from nmt_lightning.translation_file import export_checkpoint

    try:
        if args.quantization is not None or args.force or args.vocabulary_map is not None:
            raise ValueError("--quantization, --force and --vocabulary-map apply to --format ctranslate2; our own "
                             "format takes --quantize")
        report = export_checkpoint(args.checkpoint, args.output, args.quantize)
    except (CorpusError, ValueError) as error:
        print(f"nmt-lightning export: error: {error}", file=sys.stderr)
        return 2
    kind = report.quantization if report.activations == "fp32" else f"{report.quantization}, {report.activations} activation ranges"
    print(f"wrote {report.output}: {kind}, {report.bytes_on_disk:,} bytes "
          f"({report.bytes_on_disk / report.weight_bytes_fp32:.1%} of the {report.weight_bytes_fp32:,} bytes of fp32 weights)",
          file=sys.stderr)
    return 0


def distill_data_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="nmt-lightning distill-data",
        description="Sequence-level knowledge distillation (Kim & Rush 2016): translate the source side of a "
                    "corpus with a teacher and write OUTPUT.SRC / OUTPUT.TGT, a parallel corpus for "
                    "'nmt-lightning prepare --train OUTPUT --bpe-from <the teacher's data directory>'. "
                    "Interrupted, the same command continues after the last finished chunk.")
    parser.add_argument("--checkpoint", required=True,
                        help="the teacher: a checkpoint, or a file written by 'export' (int8 translates fastest on CPU)")
    parser.add_argument("--input", required=True, help="corpus prefix: PREFIX.SRC is read (plain or .gz)")
    parser.add_argument("--output", required=True, help="output prefix: OUTPUT.SRC and OUTPUT.TGT are written")
    parser.add_argument("--beam", type=int, default=4, help="beam size (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default: %(default)s)")
    parser.add_argument("--chunk-lines", type=int, default=2000,
                        help="lines translated between two saves of the progress (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's default, one per core)")
    args = parser.parse_args(argv)
    from nmt_lightning.distill_data import distill_with_checkpoint

    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        started = time.perf_counter()
        source, target = distill_with_checkpoint(args.checkpoint, args.input, args.output, args.beam,
                                                 args.batch_size, args.device, args.chunk_lines)
    except (CorpusError, ValueError, FileNotFoundError) as error:
        print(f"nmt-lightning distill-data: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nmt-lightning distill-data: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    print(f"wrote {source} and {target} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 0


def shortlist_main(argv: Sequence[str]) -> int:
    from nmt_lightning.shortlist import BATCH_SENTENCES, DEFAULT_BEST, DEFAULT_FREQUENT, build_shortlist

    parser = argparse.ArgumentParser(
        prog="nmt-lightning shortlist",
        description="Build a target-vocabulary shortlist (CTranslate2's vocabulary map) from a prepared data "
                    "directory's training pairs: the --best target pieces of each source piece by IBM Model 1's "
                    "lexical probability, and the --frequent most frequent target pieces for every sentence. "
                    "Pass it to 'nmt-lightning export --format ctranslate2 --vocabulary-map'.")
    parser.add_argument("--data-dir", required=True, help="a prepared data directory (nmt-lightning prepare)")
    parser.add_argument("--output", required=True, help="the vocabulary map to write (text)")
    parser.add_argument("--src", default="en", help="source language (default: %(default)s)")
    parser.add_argument("--tgt", default="cs", help="target language (default: %(default)s)")
    parser.add_argument("--best", type=int, default=DEFAULT_BEST, help="candidates per source piece (default: %(default)s)")
    parser.add_argument("--frequent", type=int, default=DEFAULT_FREQUENT,
                        help="most frequent target pieces always allowed (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=5, help="EM iterations of IBM Model 1 (default: %(default)s)")
    parser.add_argument("--max-sentences", type=int, help="read at most this many training pairs (default: all)")
    args = parser.parse_args(argv)

    try:
        report = build_shortlist(args.data_dir, args.output, args.src, args.tgt, args.best, args.frequent,
                                 args.iterations, args.max_sentences)
    except (CorpusError, ValueError, FileNotFoundError) as error:
        print(f"nmt-lightning shortlist: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {report.output}: candidates for {report.source_pieces:,} source pieces from {report.sentences:,} "
          f"pairs, {report.always} always allowed; a validation sentence allows {report.mean_candidates:.0f} target "
          f"pieces on average, a batch of {BATCH_SENTENCES} (translate's) {report.mean_batch_candidates:.0f}",
          file=sys.stderr)
    return 0


def lightning_main(argv: Sequence[str]) -> int:
    from nmt_lightning.lightning_cli import run_lightning_cli

    run_lightning_cli(argv)
    return 0


COMMANDS = {"prepare": prepare_main, "translate": translate_main, "average": average_main, "export": export_main,
            "distill-data": distill_data_main, "shortlist": shortlist_main}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def main(argv: Optional[Sequence[str]] = None) -> int:
    if argv is None:  # the process's entry point (not a test calling main): keep big tensors in the heap
        relaunch_with_tuned_allocator()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        return lightning_main(argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: nmt-lightning {" + ",".join([*COMMANDS, *LIGHTNING_COMMANDS]) + "} ... (--help on each)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
