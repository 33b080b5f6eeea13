"""ipq: product quantization, as trained by ``callbacks.IterativeProductQuantization``.

A weight (rows, columns) is stored as one codeword index per block of ``block_size`` columns
(uint8 for up to 256 codewords; beyond, ceil(log2 k) bits each, packed into bytes, with a
small ``index_layout`` part: rows, blocks per row, bits) and its codebook (k, block_size): fp16, or int8
with one scale (``centroid_bits: 8``, the paper's "iPQ & int8"). Decoding gathers the codewords
back into the dense fp32 weight: the same values the trained model computed with (up to the
codebook's fp16 or int8 rounding). The codebook and assignments come from the checkpoint (the
step names their state_dict keys); there is no faster kernel, so layers run dense.
"""

from __future__ import annotations

from typing import Mapping

import torch

from nmt_lightning.export.codecs import Codec, Parts, register
from nmt_lightning.export.codecs.int8_kernels import quantize_weight


class ProductQuantizationCodec(Codec):
    name = "ipq"
    quantizes = True
    state_inputs = ("centroids", "assignments")

    def encode(self, parts: Parts, spec: Mapping) -> Parts:
        weight, centroids, assignments = parts[""], parts["centroids"].float(), parts["assignments"]
        block_size = int(spec["block_size"])
        if weight.dim() != 2 or weight.shape[1] != assignments.shape[1] * block_size or weight.shape[0] != len(assignments):
            raise ValueError(f"ipq: assignments {tuple(assignments.shape)} with blocks of {block_size} do not cover "
                             f"a weight of shape {tuple(weight.shape)}")
        # The weight's shape is (assignment rows, assignment columns x block_size): not stored
        # (older files carry it as a part "shape", which decoding ignores).
        if len(centroids) <= 256:
            encoded = {"": assignments.to(torch.uint8)}
        else:
            bits = (len(centroids) - 1).bit_length()
            encoded = {"": pack_indices(assignments.flatten(), bits),
                       "index_layout": torch.tensor([*assignments.shape, bits], dtype=torch.int32)}
        if int(spec.get("centroid_bits", 16)) == 8:
            values, scale = quantize_weight(centroids, 8, per_channel=False)
            encoded.update(centroids=values, centroid_scale=scale)
        else:
            encoded["centroids"] = centroids.half()
        rest = {k: v for k, v in parts.items() if k not in ("", "centroids", "assignments")}
        return {**rest, **encoded}

    def decode(self, parts: Parts, spec: Mapping) -> Parts:
        centroids = parts["centroids"].float()
        if "centroid_scale" in parts:
            centroids = centroids * parts["centroid_scale"].float()
        if "index_layout" in parts:
            rows, blocks, bits = (int(v) for v in parts["index_layout"])
            assignments = unpack_indices(parts[""], bits, rows * blocks).view(rows, blocks)
        else:  # (rows, columns / block_size) uint8, or int16 in files before packing (read as unsigned)
            assignments = parts[""].long() % 65536 if parts[""].dtype == torch.int16 else parts[""].long()
        weight = centroids[assignments].reshape(len(assignments), -1)  # (rows, columns)
        rest = {k: v for k, v in parts.items() if k not in ("", "centroids", "centroid_scale", "shape", "index_layout")}
        return {**rest, "": weight}


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """indices (n,) in [0, 2^bits) -> uint8 (ceil(n * bits / 8),): each index's bits, most
    significant first, one after the other (the last byte padded with zeros)."""
    shifts = torch.arange(bits - 1, -1, -1)
    stream = ((indices.long()[:, None] >> shifts) & 1).flatten()  # (n * bits,)
    stream = torch.cat([stream, stream.new_zeros(-len(stream) % 8)])
    return (stream.view(-1, 8) << torch.arange(7, -1, -1)).sum(dim=1).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The inverse of ``pack_indices``: (count,) int64."""
    stream = ((packed.long()[:, None] >> torch.arange(7, -1, -1)) & 1).flatten()[: count * bits]
    return (stream.view(count, bits) << torch.arange(bits - 1, -1, -1)).sum(dim=1)


register(ProductQuantizationCodec())
