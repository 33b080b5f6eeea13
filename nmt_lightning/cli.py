"""The ``nmt-lightning`` command.

``prepare`` builds a data directory. Training commands (fit/validate/test/predict) go
through LightningCLI and arrive with the model.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

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


COMMANDS = {"prepare": prepare_main}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: nmt-lightning {" + ",".join(COMMANDS) + "} ...", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
