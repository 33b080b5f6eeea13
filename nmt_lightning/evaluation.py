"""Scores with sacrebleu on detokenized text: BLEU (cased, uncased) and chrF2, with signatures.

The numbers are sacrebleu's own (``sacrebleu REF -i HYP``, ``-lc``, ``-m chrf``): the same
library, the same defaults, on the same lines.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from sacrebleu.metrics import BLEU, CHRF

from nmt_lightning.errors import CorpusError


@dataclass
class Scores:
    bleu: float
    bleu_uncased: float
    chrf: float
    bleu_text: str  # sacrebleu's "BLEU = 23.1 54.2/29.3/... (BP = ...)" line
    bleu_uncased_text: str
    chrf_text: str
    bleu_signature: str
    bleu_uncased_signature: str
    chrf_signature: str

    def report(self) -> str:
        return "\n".join([
            f"BLEU (cased)   {self.bleu_text}   {self.bleu_signature}",
            f"BLEU (uncased) {self.bleu_uncased_text}   {self.bleu_uncased_signature}",
            f"chrF2          {self.chrf_text}   {self.chrf_signature}",
        ])

    def as_dict(self) -> dict[str, float]:
        return {"bleu": self.bleu, "bleu_uncased": self.bleu_uncased, "chrf": self.chrf}


def score(hypotheses: Sequence[str], references: Sequence[str]) -> Scores:
    """Corpus-level scores of detokenized ``hypotheses`` against one reference each."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    cased, uncased, chrf = BLEU(), BLEU(lowercase=True), CHRF()
    refs = [list(references)]
    results = (cased.corpus_score(hypotheses, refs), uncased.corpus_score(hypotheses, refs), chrf.corpus_score(hypotheses, refs))
    return Scores(
        bleu=results[0].score, bleu_uncased=results[1].score, chrf=results[2].score,
        bleu_text=str(results[0]), bleu_uncased_text=str(results[1]), chrf_text=str(results[2]),
        bleu_signature=str(cased.get_signature()), bleu_uncased_signature=str(uncased.get_signature()),
        chrf_signature=str(chrf.get_signature()),
    )


def read_lines(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise CorpusError(f"{path}: invalid UTF-8 at byte {error.start}") from None


def score_files(hypothesis_file: str | os.PathLike, reference_file: str | os.PathLike) -> Scores:
    hypotheses, references = read_lines(hypothesis_file), read_lines(reference_file)
    if len(hypotheses) != len(references):
        raise CorpusError(f"{reference_file} has {len(references)} lines but {hypothesis_file} has {len(hypotheses)}")
    return score(hypotheses, references)


@dataclass
class PairedComparison:
    """BLEU and chrF2 of a system against a baseline on the same sentences, with sacrebleu's
    paired-test p-values (the probability of a difference at least this large by chance)."""

    baseline_bleu: float
    system_bleu: float
    bleu_p_value: float
    baseline_chrf: float
    system_chrf: float
    chrf_p_value: float
    test: str  # sacrebleu's test: "bs" (paired bootstrap resampling) or "ar" (approximate randomisation)
    signature: str  # of the BLEU test

    def as_dict(self) -> dict[str, float | str]:
        return dict(vars(self))


def paired_comparison(baseline: Sequence[str], system: Sequence[str], references: Sequence[str],
                      test: str = "bs", samples: int = 1000) -> PairedComparison:
    """sacrebleu's paired significance test of ``system`` against ``baseline`` (the same as
    ``sacrebleu REF -i BASELINE SYSTEM --paired-bs``), for BLEU and chrF2; fixed seed (sacrebleu's 12345)."""
    import logging

    from sacrebleu.significance import PairedTest

    if not len(baseline) == len(system) == len(references):
        raise ValueError(f"paired_comparison: {len(baseline)} baseline, {len(system)} system and {len(references)} "
                         f"reference lines; a paired test needs the same sentences")
    if test not in ("bs", "ar"):
        raise ValueError(f"paired_comparison: test must be 'bs' or 'ar', got {test!r}")
    quiet = logging.getLogger("sacrebleu")
    level, quiet.level = quiet.level, logging.WARNING  # it logs each resampling round at INFO
    try:
        signatures, results = PairedTest([("baseline", list(baseline)), ("system", list(system))],
                                         {"BLEU": BLEU(), "chrF2": CHRF()}, references=[list(references)],
                                         test_type=test, n_samples=samples)()
    finally:
        quiet.level = level
    bleu, chrf = results["BLEU"], results["chrF2"]
    return PairedComparison(bleu[0].score, bleu[1].score, float(bleu[1].p_value), chrf[0].score, chrf[1].score,
                            float(chrf[1].p_value), test, str(signatures["BLEU"]))
