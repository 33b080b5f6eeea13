"""Translating lists of detokenized lines with a trained TranslationModule or a Translator."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Iterator, Optional, Union

import numpy as np
import torch
from tqdm import tqdm

from nmt_lightning.bpe import EOS_ID
from nmt_lightning.data.dataset import pad_batch
from nmt_lightning.decoding import beam_search, greedy_search
from nmt_lightning.shortlist import Shortlist
from nmt_lightning.translator import Translator

if TYPE_CHECKING:
    from nmt_lightning.module import TranslationModule


def source_batches(token_ids: list[list[int]], batch_size: int,
                   limit: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(indices into ``token_ids``, source (B, S)) batches of sentences of similar length, to
    limit padding; every sentence is cut to ``limit`` tokens and ends with eos."""
    ids = [np.array(tokens[:limit] + [EOS_ID]) for tokens in token_ids]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        yield chunk, pad_batch([ids[i] for i in chunk])


def translate_lines(module: Union[TranslationModule, Translator], lines: list[str], beam: int = 4, batch_size: int = 32,
                    progress: bool = True, use_cache: bool = True, shortlist: Optional[Shortlist] = None) -> list[str]:
    """Translate ``lines``, returned in the same order. Batches group sentences of similar
    length to limit padding; greedy search when ``beam == 1``. ``shortlist``: each batch
    produces only its candidate target ids (``Shortlist.read`` of a vocabulary map)."""
    if beam < 1 or batch_size < 1:
        raise ValueError(f"beam and batch_size must be >= 1, got beam={beam}, batch_size={batch_size}")
    module.eval()
    batches = source_batches(module.tokenization.encode_source(lines), batch_size,
                             limit=module.model.config.max_positions - 1)
    results: list[str] = [""] * len(lines)
    hp = module.hparams
    with torch.inference_mode(), tqdm(total=len(lines), desc="translating", unit=" sent", file=sys.stderr,
                                      disable=not progress) as bar:
        for chunk, source in batches:
            vocabulary = None if shortlist is None else shortlist.candidates(source)
            source = source.to(module.device)
            if beam == 1:
                found = greedy_search(module.model, source, hp.max_len_a, hp.max_len_b, use_cache=use_cache,
                                      vocabulary=vocabulary)
            else:
                found = beam_search(module.model, source, beam, hp.length_penalty, hp.max_len_a, hp.max_len_b,
                                    use_cache=use_cache, vocabulary=vocabulary)
            for index, text in zip(chunk, module.tokenization.decode(found.tokens)):
                results[index] = text
            bar.update(len(chunk))
    return results
