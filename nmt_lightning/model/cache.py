"""Key/value cache for incremental decoding, laid out so that beam search never moves it.

The usual cache keeps one (N, heads, t, head_dim) key tensor per layer for N = sentences * beam
hypotheses, grows it by concatenation at every step and reorders its rows whenever beam search
reshuffles hypotheses: two copies of the whole history per step, keys and values, in every
layer. Here the keys/values of each step are written once, into a buffer per sentence:

    keys (sentences, heads, capacity * beam, head_dim): position t of the hypothesis in slot j
    (row sentence * beam + j of the decoder's input) lies at t * beam + j.

A hypothesis's history may have passed through other slots, so ``lineage`` (N, capacity)
records from which slot it inherited each position; beam search reorders only that small
table. The hypotheses of a sentence attend together, as ``beam`` grouped queries over the
sentence's ``t * beam`` keys, with a mask that keeps each one to its own lineage: ``beam``
times the attention arithmetic instead of copying the history.

What it buys depends on the length (the copies it saves grow with it at every step): on two
CPU cores with the tiny model at beam 4, a self-attention step alone costs about 30% less at
20 positions and half at 40, but whole translations gain little at the lengths of the
LibreOffice test split (about 2% on its 150 longest sentences, within noise on the rest),
where the masked attention over ``beam`` times the keys eats most of it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

KeysValues = tuple[torch.Tensor, torch.Tensor]


class LayerCache:
    """One decoder layer's keys/values: the encoder's (cross-attention, computed once) and
    its own self-attention history."""

    def __init__(self, shared: "DecoderCache") -> None:
        self.shared = shared
        self.keys: Optional[torch.Tensor] = None  # (sentences, heads, capacity * beam, head_dim)
        self.values: Optional[torch.Tensor] = None
        self.encoder: Optional[KeysValues] = None  # each (sentences, heads, S, head_dim)

    def encoder_keys_values(self, compute: Callable[[], KeysValues]) -> KeysValues:
        if self.encoder is None:
            self.encoder = compute()
        return self.encoder

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Store this step's keys/values (N, heads, 1, head_dim); return the sentence's keys and
        values so far, (sentences, heads, (t + 1) * beam, head_dim) views, and the mask
        (sentences, 1, beam, (t + 1) * beam) that keeps each hypothesis to its lineage (None
        for a beam of one)."""
        shared = self.shared
        beam, position = shared.beam, shared.position
        rows, heads, length, head_dim = keys.shape
        if length != 1:
            raise ValueError(f"incremental decoding feeds one position at a time, got {length}")
        if self.keys is None or self.keys.shape[2] < (position + 1) * beam:
            self.keys, self.values = (self._grown(buffer, rows // beam, heads, head_dim, like=keys)
                                      for buffer in (self.keys, self.values))
        filled = (position + 1) * beam
        # (N, h, 1, d) -> (sentences, h, beam, d): slot j of a sentence is its row j
        self.keys[:, :, filled - beam : filled] = keys.view(-1, beam, heads, head_dim).transpose(1, 2)
        self.values[:, :, filled - beam : filled] = values.view(-1, beam, heads, head_dim).transpose(1, 2)
        return self.keys[:, :, :filled], self.values[:, :, :filled], shared.self_attention_mask

    def _grown(self, buffer: Optional[torch.Tensor], sentences: int, heads: int, head_dim: int,
               like: torch.Tensor) -> torch.Tensor:
        """A buffer of twice the capacity (or the initial one), holding what ``buffer`` holds."""
        current = 0 if buffer is None else buffer.shape[2] // self.shared.beam  # positions
        capacity = max(self.shared.capacity, 2 * current)
        grown = like.new_zeros(sentences, heads, capacity * self.shared.beam, head_dim)
        if buffer is not None:
            grown[:, :, : buffer.shape[2]] = buffer
        return grown

    def keep_sentences(self, keep: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys.index_select(0, keep), self.values.index_select(0, keep)
        if self.encoder is not None:
            self.encoder = tuple(value.index_select(0, keep) for value in self.encoder)


class DecoderCache:
    """Everything incremental decoding keeps between steps, for ``sentences * beam`` rows of
    hypotheses (a sentence's hypotheses in consecutive rows) decoded one position at a time.

    ``capacity`` is the number of positions allocated at first; buffers double when it runs out.
    """

    def __init__(self, layers: int, beam: int = 1, capacity: int = 64) -> None:
        if beam < 1 or capacity < 1:
            raise ValueError(f"beam and capacity must be >= 1, got beam={beam}, capacity={capacity}")
        self.beam, self.capacity = beam, capacity
        self.position = 0  # positions stored so far
        self.layers = [LayerCache(self) for _ in range(layers)]
        self.lineage: Optional[torch.Tensor] = None  # (N, capacity) long: slot of each position
        self.self_attention_mask: Optional[torch.Tensor] = None  # (sentences, 1, beam, (t + 1) * beam)

    def begin_step(self, rows: int, device: torch.device) -> None:
        """Before the layers see position ``self.position`` of ``rows`` hypotheses."""
        if rows % self.beam:
            raise ValueError(f"{rows} decoder rows do not split into sentences of beam={self.beam}")
        if self.beam == 1:
            return  # every hypothesis is alone in its sentence: nothing to mask
        position, slots = self.position, torch.arange(self.beam, device=device)
        if self.lineage is None or self.lineage.shape[1] <= position:
            grown = torch.zeros(rows, max(self.capacity, 2 * position), dtype=torch.long, device=device)
            if self.lineage is not None:
                grown[:, :position] = self.lineage
            self.lineage = grown
        self.lineage[:, position] = slots.repeat(rows // self.beam)  # each writes into its own slot
        # (N, t + 1, beam): True at the slot of each of its positions -> (sentences, 1, beam, (t + 1) * beam)
        own = self.lineage[:, : position + 1].unsqueeze(-1) == slots
        self.self_attention_mask = own.view(rows // self.beam, 1, self.beam, (position + 1) * self.beam)

    def end_step(self) -> None:
        self.position += 1

    def reorder(self, order: torch.Tensor) -> None:
        """Row i continues the history of row ``order[i]``, which must be a hypothesis of the
        same sentence (beam search only reshuffles within a sentence)."""
        rows = torch.arange(len(order), device=order.device)
        if not bool((order // self.beam == rows // self.beam).all()):
            raise ValueError("a cache reorder can only move hypotheses within their sentence")
        if self.lineage is not None:  # a beam of one has nothing to reorder
            self.lineage = self.lineage.index_select(0, order)

    def keep_sentences(self, keep: torch.Tensor) -> None:
        """Drop every sentence but ``keep`` (indices into the current ones, in their new order)."""
        if self.lineage is not None:
            rows = (keep.unsqueeze(1) * self.beam + torch.arange(self.beam, device=keep.device)).flatten()
            self.lineage = self.lineage.index_select(0, rows)
        for layer in self.layers:
            layer.keep_sentences(keep)
