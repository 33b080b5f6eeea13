"""ipq: product quantization, as trained by ``callbacks.IterativeProductQuantization``.

A weight (rows, columns) is stored as one codeword index per block of ``block_size`` columns
(uint8 for up to 256 codewords, int16 beyond) and its codebook (k, block_size): fp16, or int8
with one scale (``centroid_bits: 8``, the paper's "iPQ & int8"). Decoding gathers the codewords
back into the dense fp32 weight: the same values the trained model computed with (up to the
codebook's fp16 or int8 rounding). The codebook and assignments come from the checkpoint (the
step names their state_dict keys); there is no faster kernel, so layers run dense.
"""

from __future__ import annotations

from typing import Mapping

import torch

from nmt_lightning.export.codecs import Codec, Parts, register
from nmt_lightning.int8 import quantize_weight


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
        index_type = torch.uint8 if len(centroids) <= 256 else torch.int16
        # The weight's shape is (assignment rows, assignment columns x block_size): not stored
        # (older files carry it as a part "shape", which decoding ignores).
        encoded = {"": assignments.to(index_type)}
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
        assignments = parts[""].long()  # (rows, columns / block_size)
        weight = centroids[assignments].reshape(len(assignments), -1)  # (rows, columns)
        rest = {k: v for k, v in parts.items() if k not in ("", "centroids", "centroid_scale", "shape")}
        return {**rest, "": weight}


register(ProductQuantizationCodec())
