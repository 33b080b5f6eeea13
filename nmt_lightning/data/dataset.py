"""A parallel corpus of token ids, read from memory-mapped arrays, that collates whole batches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from nmt_lightning.binarized import TokenArray
from nmt_lightning.bpe import BOS_ID, EOS_ID, PAD_ID

Batch = dict[str, torch.Tensor]


def pad_batch(sequences: Sequence[np.ndarray], pad_id: int = PAD_ID) -> torch.Tensor:
    """Right-pad 1-D id arrays into a (batch, max_len) int64 tensor."""
    out = torch.full((len(sequences), max((len(s) for s in sequences), default=0)), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = torch.from_numpy(sequence)
    return out


class ParallelTokenDataset(Dataset):
    """Sentence pairs of one split, ``{data_dir}/{split}.{lang}.bin/.idx`` for both languages.

    Indexing with a list of sentence indices returns a collated batch (the token-batch
    sampler yields such lists), with:

    - ``source``          (B, S): source ids + eos, right-padded with pad (0)
    - ``source_lengths``  (B,)
    - ``decoder_input``   (B, T): bos + target ids (teacher forcing input)
    - ``target``          (B, T): target ids + eos (what the decoder must predict)
    - ``target_lengths``  (B,)
    - ``indices``         (B,): sentence numbers in the split, to restore file order

    Sentences longer than ``max_source_positions``/``max_target_positions`` (eos/bos
    included) are truncated here; the training sampler skips them instead.
    The memory maps are opened lazily in each process, so DataLoader workers (fork or spawn)
    never receive a copy of the data.
    """

    def __init__(
        self,
        data_dir: Union[str, os.PathLike],
        split: str,
        src_lang: str,
        tgt_lang: str,
        src_vocab_size: int,
        tgt_vocab_size: int,
        max_source_positions: int = 1024,
        max_target_positions: int = 1024,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.split = split
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        self._vocab_sizes = (src_vocab_size, tgt_vocab_size)
        self.max_source_positions = max_source_positions
        self.max_target_positions = max_target_positions
        self._arrays: tuple[TokenArray, TokenArray] | None = None
        source, target = self.arrays
        if len(source) != len(target):
            raise ValueError(
                f"{self.data_dir}: {split}.{src_lang} has {len(source)} sentences but "
                f"{split}.{tgt_lang} has {len(target)}; re-run prepare"
            )

    @property
    def arrays(self) -> tuple[TokenArray, TokenArray]:
        if self._arrays is None:
            self._arrays = (
                TokenArray(self.data_dir / f"{self.split}.{self.src_lang}", self._vocab_sizes[0]),
                TokenArray(self.data_dir / f"{self.split}.{self.tgt_lang}", self._vocab_sizes[1]),
            )
        return self._arrays

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"] = None  # reopen the maps in the worker instead of pickling the data
        return state

    def __len__(self) -> int:
        return len(self.arrays[0])

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(source, target) lengths in tokens as the model sees them (eos / bos included)."""
        source, target = self.arrays
        return source.lengths() + 1, target.lengths() + 1

    def __getitem__(self, index: Union[int, Sequence[int]]) -> Batch:
        indices = [int(index)] if isinstance(index, (int, np.integer)) else [int(i) for i in index]
        source_array, target_array = self.arrays
        eos, bos = np.array([EOS_ID]), np.array([BOS_ID])
        sources, decoder_inputs, targets = [], [], []
        for i in indices:
            source = source_array[i][: self.max_source_positions - 1]
            target = target_array[i][: self.max_target_positions - 1]
            sources.append(np.concatenate([source, eos]))
            decoder_inputs.append(np.concatenate([bos, target]))
            targets.append(np.concatenate([target, eos]))
        return {
            "source": pad_batch(sources),
            "source_lengths": torch.tensor([len(s) for s in sources]),
            "decoder_input": pad_batch(decoder_inputs),
            "target": pad_batch(targets),
            "target_lengths": torch.tensor([len(t) for t in targets]),
            "indices": torch.tensor(indices),
        }
