"""sparse: a pruned weight as a bitmask and its surviving values.

Recorded by the pruning callbacks as the last step of a weight's chain (after any
quantization), so it stores the survivors in whatever form the step before left them: fp32
values, or the int8 codes of a QAT-trained or ``--quantize int8`` export (with the scales
untouched). The mask comes from the checkpoint (the step names its state_dict key); it is
stored as one bit per weight, row-major, so a weight of N entries with a fraction s pruned
takes N/8 bytes plus (1 - s) N values. Where that is not smaller than N values (fewer than
1 in 32 fp32 weights pruned, 1 in 8 int8 ones: a checkpoint whose masks have not pruned yet),
the weight is stored dense, its pruned entries zero. Decoding scatters the values back into a
dense tensor of zeros; an int8 weight then runs on the int8 kernel as usual (no sparse kernel
on CPU).
"""

from __future__ import annotations

from typing import Mapping

import torch

from nmt_lightning.export.codecs import Codec, Parts, register

_BIT_VALUES = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """A bool tensor -> uint8, 8 entries a byte, first entry in the highest bit (numpy's packbits)."""
    flat = keep.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-len(flat)) % 8)])
    return (flat.view(-1, 8) * _BIT_VALUES).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The inverse of ``pack_bits``: the first ``count`` entries, as bool."""
    bits = (packed.view(-1, 1) & _BIT_VALUES) != 0
    return bits.flatten()[:count]


class SparseCodec(Codec):
    name = "sparse"
    state_inputs = ("mask",)

    def encode(self, parts: Parts, spec: Mapping) -> Parts:
        values, mask = parts[""], parts["mask"]
        if mask.shape != values.shape:
            raise ValueError(f"sparse: a mask of shape {tuple(mask.shape)} for a weight of shape {tuple(values.shape)}")
        keep = mask.flatten() != 0
        rest = {k: v for k, v in parts.items() if k not in ("", "mask")}
        sparse_bytes = (keep.numel() + 7) // 8 + int(keep.sum()) * values.element_size() + 8 * values.dim()
        if sparse_bytes >= values.numel() * values.element_size():
            return {**rest, "": values.masked_fill(~keep.view(values.shape), 0).contiguous()}
        return {**rest, "": values.flatten()[keep].contiguous(), "bitmask": pack_bits(keep),
                "dense_shape": torch.tensor(values.shape, dtype=torch.int64)}

    def decode(self, parts: Parts, spec: Mapping) -> Parts:
        if "bitmask" not in parts:
            return parts  # stored dense: too few entries pruned for the bitmask to pay
        shape = [int(v) for v in parts["dense_shape"]]
        count = 1
        for size in shape:
            count *= size
        keep = unpack_bits(parts["bitmask"], count)
        values = parts[""]
        dense = values.new_zeros(count)
        dense[keep] = values
        rest = {k: v for k, v in parts.items() if k not in ("", "bitmask", "dense_shape")}
        return {**rest, "": dense.view(shape)}


register(SparseCodec())
