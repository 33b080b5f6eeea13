"""affine8: 256 evenly spaced levels between a tensor's minimum and maximum, one byte a value.

For what stays dense beside quantized weights (biases, LayerNorm gains and shifts) in an
"iPQ & int8" export: ``values = round((x - low) / step)`` in uint8, ``step = (high - low) / 255``,
and ``range = [low, step]`` (fp32) beside them. An asymmetric grid, because a LayerNorm gain
sits around 1 (a symmetric grid from max|x| would spend half its levels on negative values it
never takes); the decoding error is at most ``step / 2``, a 510th of the tensor's spread.
"""

from __future__ import annotations

from typing import Mapping

import torch

from nmt_lightning.export.codecs import Codec, Parts, register

LEVELS = 255  # the largest uint8


class Affine8Codec(Codec):
    name = "affine8"
    quantizes = True

    def encode(self, parts: Parts, spec: Mapping) -> Parts:
        tensor = parts[""].float()
        low, high = (tensor.min(), tensor.max()) if tensor.numel() else (torch.tensor(0.0), torch.tensor(0.0))
        step = (high - low) / LEVELS if high > low else torch.tensor(1.0)  # a constant tensor: every value is `low`
        values = torch.round((tensor - low) / step).clamp(0, LEVELS).to(torch.uint8)
        rest = {k: v for k, v in parts.items() if k}
        return {**rest, "": values, "range": torch.stack([low, step]).float()}

    def decode(self, parts: Parts, spec: Mapping) -> Parts:
        low, step = parts["range"].float()
        rest = {k: v for k, v in parts.items() if k not in ("", "range")}
        return {**rest, "": low + parts[""].float() * step}


register(Affine8Codec())
