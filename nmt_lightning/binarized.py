"""Token ids on disk: one flat array of ids plus an offsets index, memory-mapped to read.

For a split and language, ``{prefix}.bin`` holds the ids of all sentences back to back
(uint16 when the vocabulary fits, else int32) and ``{prefix}.idx`` holds int64 offsets,
``n + 1`` of them, so sentence ``i`` is ``bin[idx[i]:idx[i + 1]]``. Reading maps both files,
so the resident memory of a dataset does not grow with the corpus (pages are loaded on
demand and can be dropped by the kernel). Writing streams, and is atomic.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from nmt_lightning.atomic import atomic_path


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


class TokenArrayWriter:
    """Append sentences (sequences of ids) to ``{prefix}.bin`` / ``{prefix}.idx``.

    Use as a context manager: the files appear only when the block ends without error.
    """

    def __init__(self, prefix: str | os.PathLike, vocab_size: int) -> None:
        self.prefix = Path(prefix)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.num_sentences = 0
        self.num_tokens = 0

    def __enter__(self) -> "TokenArrayWriter":
        self._stack = contextlib.ExitStack()
        bin_tmp = self._stack.enter_context(atomic_path(f"{self.prefix}.bin"))
        idx_tmp = self._stack.enter_context(atomic_path(f"{self.prefix}.idx"))
        self._bin = self._stack.enter_context(open(bin_tmp, "wb"))
        self._idx = self._stack.enter_context(open(idx_tmp, "wb"))
        self._idx.write(np.zeros(1, dtype=np.int64).tobytes())
        return self

    def add(self, sentences: Sequence[Sequence[int]]) -> None:
        """Append a chunk of sentences (a list of id lists, as sentencepiece returns)."""
        lengths = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
        flat = np.fromiter((t for s in sentences for t in s), dtype=np.int64, count=int(lengths.sum()))
        self.add_flat(flat, lengths)

    def add_flat(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append sentences given as their concatenated ids and their lengths (no Python loop)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(flat):
            raise ValueError(f"lengths add up to {int(lengths.sum())} but {len(flat)} ids were given")
        if len(lengths) == 0:
            return
        if flat.size and (flat.min() < 0 or flat.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}) while writing {self.prefix}")
        self._bin.write(np.asarray(flat).astype(self.dtype, copy=False).tobytes())
        self._idx.write((self.num_tokens + np.cumsum(lengths)).tobytes())
        self.num_sentences += len(lengths)
        self.num_tokens += int(lengths.sum())

    def __exit__(self, *exc_info) -> None:
        # Close the handles first, then let atomic_path move (or discard) the files.
        self._bin.flush()
        self._idx.flush()
        self._stack.__exit__(*exc_info)


class TokenArray:
    """Read-only, memory-mapped view of a ``TokenArrayWriter`` output."""

    def __init__(self, prefix: str | os.PathLike, vocab_size: int) -> None:
        self.prefix = Path(prefix)
        self.offsets = np.memmap(f"{prefix}.idx", dtype=np.int64, mode="r")
        self.tokens = np.memmap(f"{prefix}.bin", dtype=token_dtype(vocab_size), mode="r")
        if len(self.offsets) < 1 or int(self.offsets[-1]) != len(self.tokens):
            raise ValueError(f"{prefix}.idx does not match {prefix}.bin: re-run prepare")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        """Ids of sentence ``index`` as an int64 array (a copy, safe to turn into a tensor)."""
        return self.tokens[self.offsets[index]:self.offsets[index + 1]].astype(np.int64)

    def lengths(self) -> np.ndarray:
        """int32 length of every sentence (computed from the offsets; 4 bytes per sentence)."""
        return np.diff(self.offsets).astype(np.int32)

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(len(self)):
            yield self[index]


def write_token_array(prefix: str | os.PathLike, sentences: Iterable[Sequence[int]], vocab_size: int, chunk: int = 10000) -> int:
    """Write all ``sentences``; returns the number written. Convenience for small data and tests."""
    with TokenArrayWriter(prefix, vocab_size) as writer:
        buffer: list[Sequence[int]] = []
        for sentence in sentences:
            buffer.append(sentence)
            if len(buffer) == chunk:
                writer.add(buffer)
                buffer = []
        writer.add(buffer)
    return writer.num_sentences
