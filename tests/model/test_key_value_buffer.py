"""nmt_lightning.model.attention.KeyValueBuffer: the self-attention cache of incremental decoding."""

from __future__ import annotations

import torch

from nmt_lightning.model.attention import KeyValueBuffer

B, HEADS, HEAD_DIM = 6, 2, 3


def step(generator: torch.Generator, rows: int = B, positions: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(rows, HEADS, positions, HEAD_DIM, generator=generator),
            torch.randn(rows, HEADS, positions, HEAD_DIM, generator=generator))


def test_appending_past_the_capacity_keeps_every_position() -> None:
    generator = torch.Generator().manual_seed(0)
    buffer, keys, values = KeyValueBuffer(), [], []
    for positions in [3] + [1] * 40:  # a prefix of 3, then one position at a time: the buffer grows twice
        k, v = step(generator, positions=positions)
        keys.append(k), values.append(v)
        got_k, got_v = buffer.append(k, v)
        assert torch.equal(got_k, torch.cat(keys, dim=2)) and torch.equal(got_v, torch.cat(values, dim=2))
    assert buffer.length == 43 and buffer.storage.shape[0] >= 43


def test_reorder_keeps_the_chosen_rows_and_may_drop_some() -> None:
    generator = torch.Generator().manual_seed(1)
    buffer = KeyValueBuffer()
    k, v = step(generator, positions=4)
    buffer.append(k, v)
    order = torch.tensor([2, 2, 0, 5])  # hypotheses copied, reordered and dropped, as beam search does
    buffer.reorder(order)
    assert torch.equal(buffer.view(0), k[order]) and torch.equal(buffer.view(1), v[order])
    k2, v2 = step(generator, rows=4)
    got_k, got_v = buffer.append(k2, v2)
    assert torch.equal(got_k, torch.cat([k[order], k2], dim=2)) and torch.equal(got_v, torch.cat([v[order], v2], dim=2))


def test_an_empty_buffer_reorders_to_nothing() -> None:
    buffer = KeyValueBuffer()
    buffer.reorder(torch.tensor([0]))
    assert buffer.storage is None and buffer.length == 0
