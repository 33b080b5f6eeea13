"""int8 linear layers for CPU inference: int8 weights, int8 x int8 matrix products, fp32 output.

The kernels are FBGEMM's (the x86 quantized engine of PyTorch): the weight is packed once,
and every call quantizes the input, multiplies in int8 with int32 accumulation and scales
the result back to fp32 in one operator. Two ways to quantize the input:

- static (Q8BERT at inference): with the activation range ``input_absmax`` that
  quantization-aware training learnt (its EMA of max|x|), x is rounded on the grid the model
  was trained on, ``S_x = M / input_absmax``. The kernel takes it as uint8 with zero point
  128, which holds the training grid [-127, 127] plus one level, -128, that training would
  have clipped to -127. Grids of fewer bits are clipped to the range first.
- dynamic (post-training quantization, Q8BERT's "DQ"): the range of every batch is measured
  at run time, with 7-bit activations (torch.ao's ``reduce_range``).

8-bit activations need a CPU with VNNI (AVX512_VNNI, AVX-VNNI or AMX). Without it, FBGEMM
(and oneDNN) add pairs of uint8 x int8 products in 16 bits, which saturate when inputs and
weights are both large (a third of the outputs of a per-channel test layer came out wrong). ``static_activation_bits()``
tries the kernel once on such a pair; where it saturates, static layers quantize to 7 bits
(codes within [-63, 63] around zero point 64, clipped to the trained range): the trained
range, one bit coarser. ``tests/test_int8.py`` checks both against integer arithmetic. Where
the quantized engine is not x86 (ARM's qnnpack), every layer runs dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
from torch import nn

from compression_contract.grid import quantize_weight  # the grid QAT trains on: the export stores its codes

__all__ = ["Int8Weight", "Int8Linear", "quantize_weight", "static_activation_bits", "use_int8_linears"]


def _pack(values: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.ScriptObject:
    """FBGEMM's packed form of ``values * scale`` (per tensor, or per row when scale is (out, 1))."""
    if scale.dim() == 0:
        qweight = torch._make_per_tensor_quantized_tensor(values, float(scale), 0)
    else:
        scales = scale.flatten().double()
        qweight = torch._make_per_channel_quantized_tensor(values, scales, torch.zeros_like(scales, dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float().contiguous())


@lru_cache(maxsize=None)
def static_activation_bits() -> int:
    """The widest static activation grid this machine's int8 kernel multiplies exactly: 8 with
    VNNI; 7 where 16-bit pair sums saturate (inputs at uint8 255 times weights of 127 overflow
    them); 0 where the quantized engine has no static fp32-output kernel (not x86)."""
    try:
        packed = _pack(torch.full((1, 8), 127, dtype=torch.int8), torch.tensor(1.0), None)
        x = torch.full((1, 8), 127.0)  # step 1, zero point 128: uint8 code 255
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, 1.0, 128, packed)
    except RuntimeError:
        return 0
    return 8 if abs(float(y) - 8 * 127 * 127) < 0.5 else 7


@dataclass(frozen=True)
class Int8Weight:
    """One linear layer's int8 weight: ``weight ~= values * scale``.

    values: (out, in) int8; scale: () per tensor or (out, 1) per output channel, float32.
    input_absmax: the static activation range (QAT's EMA of max|x|), or None for dynamic.
    bits: the integer grid of both (8 is Q8BERT; fewer bits are stored in int8 too).
    """

    values: torch.Tensor
    scale: torch.Tensor
    input_absmax: Optional[float] = None
    bits: int = 8


class Int8Linear(nn.Module):
    """Inference-only replacement of an nn.Linear: ``x (..., in) -> (..., out)`` in fp32."""

    def __init__(self, weight: Int8Weight, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        values, scale = weight.values, weight.scale
        if values.dtype != torch.int8 or values.dim() != 2:
            raise ValueError(f"int8 weight values must be a 2-D int8 tensor, got {values.dtype} {tuple(values.shape)}")
        self.out_features, self.in_features = values.shape
        self.bits = weight.bits
        self._packed = _pack(values, scale, bias)
        if weight.input_absmax is not None and not weight.input_absmax > 0:
            raise ValueError(f"input_absmax must be > 0, got {weight.input_absmax}")
        # Static where a range was learnt and the engine has the kernel (x86), dynamic otherwise.
        self.input_absmax = weight.input_absmax if static_activation_bits() else None
        self.activation_bits = 7  # dynamic: torch.ao's reduce_range
        if self.input_absmax is not None:
            self.activation_bits = min(self.bits, static_activation_bits())
            self._input_step = self.input_absmax / (2 ** (self.activation_bits - 1) - 1)  # 1 / S_x
            self._zero_point = 2 ** (self.activation_bits - 1)  # uint8 code of 0

    @property
    def static(self) -> bool:
        return self.input_absmax is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:  # the kernels take fp32; hand back the caller's dtype
            return self.forward(x.float()).to(x.dtype)  # forward, not __call__: hooks fire once
        if not self.static:
            return torch.ops.quantized.linear_dynamic(x, self._packed, reduce_range=True)
        if self.activation_bits < 8:  # uint8 codes reach far beyond +-M: clip as training did
            x = x.clamp(-self.input_absmax, self.input_absmax)
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x, self._input_step, self._zero_point, self._packed)

    def weight_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 values (out, in), scale () or (out, 1)) as packed: the grid the kernel multiplies with."""
        qweight, _ = torch.ops.quantized.linear_unpack(self._packed)
        if qweight.qscheme() == torch.per_tensor_affine:
            return qweight.int_repr(), torch.tensor(qweight.q_scale(), dtype=torch.float32)
        return qweight.int_repr(), qweight.q_per_channel_scales().float().unsqueeze(1)

    def extra_repr(self) -> str:
        activations = (f"static {self.activation_bits}-bit, input_absmax={self.input_absmax:.4g}" if self.static
                       else "dynamic 7-bit")
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, activations {activations}"


def use_int8_linears(model: nn.Module, weights: dict[str, Int8Weight]) -> None:
    """In place: each nn.Linear named in ``weights`` becomes an Int8Linear on that grid (its bias kept)."""
    for name, weight in weights.items():
        linear = model.get_submodule(name)
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attribute, Int8Linear(weight, linear.bias))
