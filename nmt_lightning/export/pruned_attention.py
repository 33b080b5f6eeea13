"""An nn.MultiheadAttention with heads cut out: what a loaded model holds in its place.

``nn.MultiheadAttention`` derives ``head_dim = embed_dim // num_heads`` and checks that the
heads fill ``embed_dim``, so it cannot hold fewer heads of the same width: its q, k and v rows
are ``3 x embed_dim``. After ``StructuredPruning`` removed heads of one, the export keeps only
the kept heads' rows (``3 x num_heads x head_dim``) and columns (of ``out_proj``), and
``load_module`` puts this module in the attention's place. It takes the same call and returns
the same output; its attention weights (``need_weights=True``) cover the kept heads only.

Not torch's code: torch's ``F.multi_head_attention_forward`` has the same width check. The
attention itself is ``F.scaled_dot_product_attention`` (the explicit softmax where the weights
are asked for). The checks torch's fused inference path makes on an attention fail on this one
(``_qkv_same_embed_dim`` is False), so ``nn.TransformerEncoderLayer`` and friends call it as a
module; ``nn.TransformerEncoder``'s nested-tensor path must be off
(``disable_nested_tensor_paths``), since this module takes dense tensors only.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["PrunedMultiheadAttention", "disable_nested_tensor_paths"]


class PrunedMultiheadAttention(nn.Module):
    """``num_heads`` heads of ``head_dim`` each over inputs of ``embed_dim`` (``num_heads x
    head_dim`` may be less than ``embed_dim``). Parameters as nn.MultiheadAttention names them:
    ``in_proj_weight`` (3 x num_heads x head_dim, embed_dim), ``in_proj_bias``, ``out_proj``
    (an nn.Linear read by weight, as nn.MultiheadAttention reads its own).

    ``kept_heads``: which heads of the original ``original_heads`` these are, in order; a 3-D
    ``attn_mask`` of the original's ``batch x original_heads`` rows is narrowed to them (one of
    ``batch x num_heads`` rows is taken as it is)."""

    reads_out_proj_by_weight = True  # compression_contract.torch_layers.linears_read_by_weight
    _qkv_same_embed_dim = False  # torch's fused attention paths check it and step aside

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, kept_heads: Optional[Sequence[int]] = None,
                 original_heads: Optional[int] = None, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if embed_dim < 1 or num_heads < 1 or head_dim < 1:
            raise ValueError(f"embed_dim, num_heads and head_dim must be >= 1, got {embed_dim}, {num_heads}, {head_dim}")
        kept = list(range(num_heads)) if kept_heads is None else [int(h) for h in kept_heads]
        original = num_heads if original_heads is None else int(original_heads)
        if len(kept) != num_heads or len(set(kept)) != num_heads or any(not 0 <= h < original for h in kept):
            raise ValueError(f"kept_heads must be {num_heads} distinct heads of 0..{original - 1}, got {kept}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = float(dropout), batch_first
        self.kept_heads, self.original_heads = kept, original
        inner = num_heads * head_dim
        options = {"device": device, "dtype": dtype}
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, **options))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner, **options)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **options)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention; a loaded file overwrites it

    @classmethod
    def like(cls, attention: nn.MultiheadAttention, kept_heads: Sequence[int]) -> "PrunedMultiheadAttention":
        """An empty one shaped as ``attention`` with only ``kept_heads`` (weights filled afterwards)."""
        weight = attention.in_proj_weight
        return cls(attention.embed_dim, len(kept_heads), attention.head_dim, dropout=attention.dropout,
                   bias=attention.in_proj_bias is not None, batch_first=attention.batch_first, kept_heads=kept_heads,
                   original_heads=attention.num_heads, device=weight.device, dtype=weight.dtype)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads} (heads {self.kept_heads} of "
                f"{self.original_heads}), head_dim={self.head_dim}, batch_first={self.batch_first}")

    def _additive_mask(self, attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                       batch: int, target: int, source: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """attn_mask ((T, S) or (batch x heads, T, S)) and key_padding_mask ((B, S)) as one float
        mask added to the scores, (B, heads or 1, T, S); True in a bool mask is a position not
        attended to, as in nn.MultiheadAttention."""
        def additive(mask: torch.Tensor) -> torch.Tensor:
            if mask.dtype == torch.bool:
                return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
            return mask.to(dtype)

        merged = None
        if attn_mask is not None:
            mask = additive(attn_mask)
            if mask.dim() == 2:
                merged = mask.view(1, 1, target, source)
            elif mask.dim() == 3 and mask.shape[0] == batch * self.num_heads:
                merged = mask.view(batch, self.num_heads, target, source)
            elif mask.dim() == 3 and mask.shape[0] == batch * self.original_heads:
                merged = mask.view(batch, self.original_heads, target, source)[:, self.kept_heads]
            else:
                raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)}: expected ({target}, {source}) or "
                                 f"({batch} x heads, {target}, {source}) with {self.num_heads} heads (or the "
                                 f"{self.original_heads} before pruning)")
        if key_padding_mask is not None:
            padding = additive(key_padding_mask).view(batch, 1, 1, source)
            merged = padding if merged is None else merged + padding
        return merged

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """nn.MultiheadAttention's call: query (T, B, E) (batch_first: (B, T, E); unbatched: (T, E)),
        key and value (S, B, E) -> (output like query, weights (B, T, S) averaged over the kept
        heads or (B, kept heads, T, S), or None)."""
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal is a hint that attn_mask is the causal mask (as for nn.MultiheadAttention): "
                               "pass the mask too")
        unbatched = query.dim() == 2
        if unbatched:  # (T, E): a batch of one, sequence first
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        target, batch, _ = query.shape
        source = key.shape[0]
        inner = self.num_heads * self.head_dim
        weight, bias = self.in_proj_weight, self.in_proj_bias
        q, k, v = (F.linear(x, weight[i * inner:(i + 1) * inner], None if bias is None else bias[i * inner:(i + 1) * inner])
                   for i, x in enumerate((query, key, value)))
        # (T or S, B, heads x head_dim) -> (B, heads, T or S, head_dim)
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).permute(1, 2, 0, 3) for t in (q, k, v))
        mask = self._additive_mask(attn_mask, key_padding_mask, batch, target, source, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            probabilities = (scores if mask is None else scores + mask).softmax(-1)
            probabilities = F.dropout(probabilities, p=dropout) if dropout > 0 else probabilities
            heads = probabilities @ v
            weights = probabilities.mean(1) if average_attn_weights else probabilities
            weights = weights.squeeze(0) if unbatched else weights
        else:
            heads = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        heads = heads.permute(2, 0, 1, 3).flatten(2)  # (T, B, heads x head_dim)
        output = F.linear(heads, self.out_proj.weight, self.out_proj.bias)
        if unbatched:
            output = output.squeeze(1)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, weights


def disable_nested_tensor_paths(model: nn.Module) -> None:
    """Turn off the nested-tensor path of every nn.TransformerEncoder holding a pruned attention:
    it would hand the layers nested tensors (chosen when the encoder was built, with torch's
    attention in place)."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(inner, PrunedMultiheadAttention) for inner in module.modules()):
            module.use_nested_tensor = False
