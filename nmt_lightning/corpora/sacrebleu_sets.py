"""WMT test sets (newstest2018, newstest2019, ...) through sacrebleu's own dataset registry.

sacrebleu downloads a set once into its cache (``$SACREBLEU``, default ``~/.sacrebleu``) and
reads it from there afterwards; on a machine without internet the cache must be copied in.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

from nmt_lightning.corpora.parallel_text import read_parallel
from nmt_lightning.errors import CorpusError

PREFIX = "sacrebleu:"


def is_sacrebleu_name(spec: str) -> bool:
    return str(spec).startswith(PREFIX)


def sacrebleu_files(test_set: str, src: str, tgt: str) -> tuple[Path, Path]:
    """``(source file, reference file)`` of ``test_set`` for ``src`` -> ``tgt``, from the cache.

    When the set only exists in the other direction (wmt19 has en-cs but no cs-en), its
    sides are swapped: the text is the same, only the original translation direction differs.
    """
    from sacrebleu.dataset import DATASETS
    from sacrebleu.utils import SACREBLEU_DIR

    if test_set not in DATASETS:
        raise CorpusError(f"unknown sacrebleu test set '{test_set}' (e.g. wmt18, wmt19; see 'sacrebleu --list')")
    dataset = DATASETS[test_set]
    for langpair, swapped in ((f"{src}-{tgt}", False), (f"{tgt}-{src}", True)):
        if langpair in dataset.langpairs:
            break
    else:
        raise CorpusError(f"sacrebleu test set '{test_set}' has no {src}-{tgt} language pair")
    sacrebleu_logger = logging.getLogger("sacrebleu")
    previous_level = sacrebleu_logger.level
    sacrebleu_logger.setLevel(logging.CRITICAL)
    try:
        source_file = Path(dataset.get_source_file(langpair))
        reference_file = Path(dataset.get_reference_files(langpair)[0])
    except (Exception, SystemExit) as error:  # sacrebleu calls sys.exit when a download fails
        raise CorpusError(
            f"sacrebleu test set {test_set} {langpair} is not in the sacrebleu cache {SACREBLEU_DIR} "
            f"and could not be downloaded ({type(error).__name__}: no network?); copy the cache from a "
            "machine with internet ('sacrebleu -t TEST -l PAIR --echo src' fills it) or set SACREBLEU=DIR"
        ) from None
    finally:
        sacrebleu_logger.setLevel(previous_level)
    return (reference_file, source_file) if swapped else (source_file, reference_file)


def sacrebleu_pairs(spec: str, src: str, tgt: str) -> Iterator[tuple[int, str, str]]:
    """Pairs of a ``sacrebleu:NAME`` spec, as ``read_parallel`` yields them."""
    source_file, reference_file = sacrebleu_files(spec[len(PREFIX):], src, tgt)
    yield from read_parallel(source_file, reference_file)
