"""int4: a symmetric grid of 4 bits (or fewer: ``bits``), two weights a byte.

``values = clamp(round(W / scale), -7, 7)``, ``scale = max|W| / 7`` per row (``per_channel``,
the default of post-training ``--quantize int4``) or per tensor: the same rounding as
quantization-aware training and Quant-Noise's int4 scheme, so a model trained for the grid
exports the codes it trained with. Stored as ``values + 8`` (1..15) in nibbles, the even
column in the low and the odd column in the high half of each byte (rows padded to an even
width), plus the scales and the shape. An nn.Linear deploys as ``Int8Linear`` with the 4-bit
codes in int8 containers (FBGEMM's int8 kernel; static activations on the grid and range QAT
trained, dynamic otherwise): PyTorch has no int4 CPU kernel, so int4 saves disk and download,
not time over int8.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from nmt_lightning.export.codecs import Codec, Parts, register
from nmt_lightning.export.codecs.int8_kernels import Int8Linear, Int8Weight, quantize_weight


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """(rows, columns) int8 in [-7, 7] -> (rows, ceil(columns / 2)) uint8."""
    codes = (values.to(torch.int16) + 8).to(torch.uint8)
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1), value=8)  # a zero weight in the padding column
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """The inverse of ``pack_nibbles``: (rows, columns) int8."""
    low, high = packed & 0x0F, packed >> 4
    codes = torch.stack([low, high], dim=2).flatten(1)[:, :columns]
    return (codes.to(torch.int16) - 8).to(torch.int8)


class Int4Codec(Codec):
    name = "int4"
    quantizes = True
    quantizes_inputs = True
    runtime_options = ("activation_range",)  # QAT at 4 bits: the inputs' trained range

    def encode(self, parts: Parts, spec: Mapping) -> Parts:
        weight = parts[""].float()
        if weight.dim() != 2:
            raise ValueError(f"int4 encodes 2-D weights, got shape {tuple(weight.shape)}")
        bits = int(spec.get("bits", 4))
        if not 2 <= bits <= 4:
            raise ValueError(f"int4 stores grids of 2 to 4 bits, got bits={bits}")
        values, scale = quantize_weight(weight, bits, bool(spec.get("per_channel", True)))
        rest = {k: v for k, v in parts.items() if k}
        return {**rest, "": pack_nibbles(values), "scale": scale, "shape": torch.tensor(weight.shape, dtype=torch.int64)}

    def _values(self, parts: Parts) -> torch.Tensor:
        return unpack_nibbles(parts[""], int(parts["shape"][1]))

    def decode(self, parts: Parts, spec: Mapping) -> Parts:
        rest = {k: v for k, v in parts.items() if k not in ("", "scale", "shape")}
        return {**rest, "": self._values(parts).float() * parts["scale"].float()}

    def runtime_linear(self, parts: Parts, spec: Mapping, bias: Optional[torch.Tensor],
                       options: Mapping[str, torch.Tensor]) -> Optional[nn.Module]:
        activation_range = options.get("activation_range")
        absmax = float(activation_range) if activation_range is not None and float(activation_range) > 0 else None
        return Int8Linear(Int8Weight(self._values(parts), parts["scale"].float(), absmax, int(spec.get("bits", 4))), bias)


register(Int4Codec())
