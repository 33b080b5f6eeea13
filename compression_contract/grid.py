"""The symmetric integer grid of ``bits`` bits (Q8BERT): ``clamp(round(x * M / absmax), -M, M)``,
``M = 2**(bits - 1) - 1``.

QAT's forward pass, Quant-Noise's int noise and the int8/int4 export all round through
``integer_codes``, in fp32, so a QAT-trained model exports the very codes its forward pass
used (exact ties round half to even, IEEE's and torch.round's rule).
"""

from __future__ import annotations

import torch

__all__ = ["absmax_of", "integer_codes", "quantize_weight", "round_to_grid"]


def absmax_of(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """max|W| over the whole tensor, or per row (output channel / embedding entry) as (rows, 1)."""
    weight = weight.detach().float()
    return weight.abs().amax(dim=1, keepdim=True) if per_channel else weight.abs().max()


def _levels(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def integer_codes(x: torch.Tensor, absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """The grid's integer codes of ``x`` (float32 holding integers in [-M, M]); ``absmax`` broadcasts."""
    limit = _levels(bits)
    scale = limit / absmax.float().clamp(min=1e-8)
    return torch.clamp(torch.round(x.float() * scale), -limit, limit)


def round_to_grid(x: torch.Tensor, absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """``x``'s values on the grid (codes / scale), in x's dtype; no gradient path of its own."""
    scale = _levels(bits) / absmax.float().clamp(min=1e-8)
    return (integer_codes(x, absmax, bits) / scale).to(x.dtype)


def quantize_weight(weight: torch.Tensor, bits: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, float32 scale) with ``weight ~= codes * scale``; scale is () or (rows, 1)."""
    absmax = absmax_of(weight, per_channel)
    return integer_codes(weight, absmax, bits).to(torch.int8), absmax.clamp(min=1e-8) / _levels(bits)
