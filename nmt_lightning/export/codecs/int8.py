"""int8: symmetric integer grid of ``bits`` (<= 8) in int8 containers, as Q8BERT.

``values = clamp(round(W / scale), -M, M)``, ``scale = max|W| / M`` per tensor or per row
(``per_channel``), ``M = 2**(bits-1) - 1``. An nn.Linear deploys as ``Int8Linear`` (FBGEMM
int8 products on CPU), with static input quantization on the trained activation range when
the step names one (QAT) and dynamic quantization otherwise (post-training).
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from nmt_lightning.export.codecs import Codec, Parts, register
from nmt_lightning.export.codecs.int8_kernels import Int8Linear, Int8Weight, quantize_weight


class Int8Codec(Codec):
    name = "int8"
    quantizes = True
    quantizes_inputs = True
    runtime_options = ("activation_range",)

    def encode(self, parts: Parts, spec: Mapping) -> Parts:
        values, scale = quantize_weight(parts[""].float(), int(spec.get("bits", 8)), bool(spec.get("per_channel", False)))
        return {**{k: v for k, v in parts.items() if k}, "": values, "scale": scale}

    def decode(self, parts: Parts, spec: Mapping) -> Parts:
        rest = {k: v for k, v in parts.items() if k not in ("", "scale")}
        return {**rest, "": parts[""].float() * parts["scale"].float()}

    def runtime_linear(self, parts: Parts, spec: Mapping, bias: Optional[torch.Tensor],
                       options: Mapping[str, torch.Tensor]) -> Optional[nn.Module]:
        if parts[""].dim() != 2:
            return None
        activation_range = options.get("activation_range")
        absmax = float(activation_range) if activation_range is not None and float(activation_range) > 0 else None
        return Int8Linear(Int8Weight(parts[""], parts["scale"].float(), absmax, int(spec.get("bits", 8))), bias)


register(Int8Codec())
