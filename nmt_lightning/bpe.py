"""Subword vocabulary: sentencepiece BPE, optionally after Moses punctuation normalisation.

The ids 0..3 are fixed so every part of the library can rely on them: pad=0, unk=1,
bos=2, eos=3. A joint model (one vocabulary for both languages) is the default, as it lets
the model tie source, target and output embeddings.
"""

from __future__ import annotations

import io
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from nmt_lightning.atomic import atomic_open

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_IDS = (PAD_ID, UNK_ID, BOS_ID, EOS_ID)  # every piece of the text has an id above them


class TextNormalizer:
    """Moses punctuation normalisation for one language, or the identity."""

    def __init__(self, lang: str, enabled: bool) -> None:
        self.lang = lang
        self.enabled = enabled
        if enabled:
            from sacremoses import MosesPunctNormalizer

            self._moses = MosesPunctNormalizer(lang=lang)

    def __call__(self, text: str) -> str:
        return self._moses.normalize(text).strip() if self.enabled else text


def train_sentencepiece(
    sentences: Iterable[str],
    model_path: str | os.PathLike,
    vocab_size: int,
    input_sentence_size: int = 2_000_000,
    character_coverage: float = 1.0,
    seed_sentencepiece_size: int = 1_000_000,
    num_threads: int | None = None,
) -> None:
    """Train a BPE model on ``sentences`` and write it atomically to ``model_path``.

    input_sentence_size: sentencepiece samples at most this many sentences (reservoir
        sampling over the stream), which keeps training time bounded on corpora of CzEng size.
    The vocabulary may come out smaller than ``vocab_size`` on a tiny corpus (soft limit).
    """
    if vocab_size < 8:
        raise ValueError(f"vocab_size must be >= 8, got {vocab_size}")
    buffer = io.BytesIO()
    try:
        _train(sentences, buffer, vocab_size, input_sentence_size, character_coverage, seed_sentencepiece_size, num_threads)
    except RuntimeError as error:
        match = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(error))
        if match:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: the training text has {match.group(2)} distinct "
                "characters and special pieces, and each needs a vocabulary entry"
            ) from None
        raise
    with atomic_open(model_path, "wb") as handle:
        handle.write(buffer.getvalue())


def _train(sentences, buffer, vocab_size, input_sentence_size, character_coverage, seed_sentencepiece_size, num_threads) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=seed_sentencepiece_size,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )


@lru_cache(maxsize=8)
def load_sentencepiece(model_path: str | os.PathLike) -> spm.SentencePieceProcessor:
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no sentencepiece model (run 'nmt-lightning prepare' first)")
    return spm.SentencePieceProcessor(model_file=str(path))


def chunked(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
