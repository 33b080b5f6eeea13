"""Batches by token count, grouped by length, split across DDP ranks.

Like fairseq's ``max_tokens``: a batch holds as many sentences as fit in
``max_tokens >= batch_size * longest_sentence`` (source or target, padding included), so
batches of short sentences are large and batches of long ones small, and GPU memory use is
flat. Sentences are sorted by length (ties broken at random) before batching, which keeps
padding low, and the order of the batches is shuffled every epoch from ``seed + epoch``.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np
from torch.utils.data import Dataset, DistributedSampler


class TokenBatchSampler(DistributedSampler):
    """Yields lists of sentence indices; rank ``r`` of ``R`` gets every R-th batch.

    Every rank computes the same global batch list (same seed, same epoch). When the number
    of batches is not a multiple of the number of ranks, the largest batches are halved until
    it is, so ranks get the same number of batches, no sentence is seen twice and none is
    left out (a rank that runs out early would hang a DDP all-reduce).

    Evaluation (``evaluation=True``) never leaves a sentence out: the position limits truncate
    (the dataset cuts such sentences) instead of skipping, a sentence larger than
    ``max_tokens`` even so gets a batch of its own, and ranks may get unequal numbers of
    batches (evaluation has no per-step collective that would wait for the others).

    This subclasses DistributedSampler only so that Lightning recognises it as already
    distributed and does not wrap it in a second sampler; the parent's logic is not used.
    Use it as ``DataLoader(dataset, sampler=TokenBatchSampler(...), batch_size=None)`` with
    a dataset whose ``__getitem__`` takes a list of indices.
    """

    def __init__(
        self,
        source_lengths: np.ndarray,
        target_lengths: np.ndarray,
        max_tokens: int,
        max_sentences: Optional[int] = None,
        shuffle: bool = True,
        seed: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
        max_source_positions: Optional[int] = None,
        max_target_positions: Optional[int] = None,
        dataset: Optional[Dataset] = None,
        evaluation: bool = False,
    ) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if max_sentences is not None and max_sentences < 1:
            raise ValueError(f"max_sentences must be >= 1 or None, got {max_sentences}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if len(source_lengths) != len(target_lengths):
            raise ValueError(f"{len(source_lengths)} source lengths but {len(target_lengths)} target lengths")
        self.dataset = dataset
        self.num_replicas, self.rank = num_replicas, rank
        self.max_tokens, self.max_sentences = max_tokens, max_sentences
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.drop_last = False
        self.evaluation = evaluation
        if evaluation:  # truncated, never skipped: the sizes the batches will really have
            if max_source_positions is not None:
                source_lengths = np.minimum(source_lengths, max_source_positions)
            if max_target_positions is not None:
                target_lengths = np.minimum(target_lengths, max_target_positions)
        self.sizes = np.maximum(source_lengths, target_lengths).astype(np.int64)
        keep = np.ones(len(self.sizes), dtype=bool) if evaluation else self.sizes <= max_tokens
        if not evaluation and max_source_positions is not None:
            keep &= source_lengths <= max_source_positions
        if not evaluation and max_target_positions is not None:
            keep &= target_lengths <= max_target_positions
        self.kept_indices = np.flatnonzero(keep)
        self.num_skipped = int(len(keep) - len(self.kept_indices))
        if not evaluation and len(self.kept_indices) < num_replicas:
            raise ValueError(
                f"only {len(self.kept_indices)} sentences fit max_tokens={max_tokens} and the position limits; "
                f"{num_replicas} ranks need at least one each"
            )
        self.num_skipped_for_ranks = 0
        self._cache: tuple[int, list[np.ndarray]] | None = None
        self._resume: tuple[int, int] | None = None  # (epoch, batches of this rank already trained on)
        self.start = 0  # where the current iteration started

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """The next iteration of ``epoch`` starts after its first ``batches_done`` batches of this rank
        (a resume in the middle of an epoch); an iteration of another epoch starts at the first."""
        self._resume = (epoch, batches_done)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[np.ndarray]:
        """All batches of this epoch, in the order the ranks will take them (round robin)."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        indices = rng.permutation(self.kept_indices) if self.shuffle else self.kept_indices
        # A stable sort keeps the random order among sentences of equal length.
        indices = indices[np.argsort(self.sizes[indices], kind="stable")]
        batches = self._pack(indices)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        batches = self._make_divisible(batches)
        self._cache = (self.epoch, batches)
        return batches

    def _pack(self, sorted_indices: np.ndarray) -> list[np.ndarray]:
        # Sizes ascend, so the newest sentence is always the longest of its batch.
        sizes = self.sizes[sorted_indices]
        limit = self.max_sentences or math.inf
        batches, start = [], 0
        for end in range(1, len(sorted_indices) + 1):
            if end == len(sorted_indices):
                batches.append(sorted_indices[start:end])
            elif (end + 1 - start) * sizes[end] > self.max_tokens or end - start >= limit:
                batches.append(sorted_indices[start:end])
                start = end
        return batches

    def _make_divisible(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        while len(batches) % self.num_replicas:
            largest = max(range(len(batches)), key=lambda i: len(batches[i]))
            batch = batches[largest]
            if len(batch) == 1:
                # Every batch is a single sentence at the token limit: nothing left to split.
                if self.evaluation:  # ranks may differ by one batch; no line is left out
                    return batches
                # Training: leave out the last few so the ranks stay in step.
                self.num_skipped_for_ranks = len(batches) % self.num_replicas
                return batches[: len(batches) - self.num_skipped_for_ranks]
            half = len(batch) // 2
            batches[largest : largest + 1] = [batch[:half], batch[half:]]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        resume, self._resume = self._resume, None
        self.start = resume[1] if resume is not None and resume[0] == self.epoch else 0
        for batch in self.global_batches()[self.rank :: self.num_replicas][self.start:]:
            yield batch.tolist()

    def __len__(self) -> int:
        return len(self.global_batches()[self.rank :: self.num_replicas])
