"""Multi-head attention over torch's scaled_dot_product_attention, with a key/value cache.

SDPA never materialises the attention probabilities. When a caller asks for them (a list in
``probabilities_out``: layer-wise attention transfer reads them), the same attention is
computed with an explicit softmax instead; the default path is SDPA, untouched."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn


class KeyValueBuffer:
    """Self-attention keys and values of the positions decoded so far (incremental decoding).

    Stored time-major, (capacity, 2, B, heads, head_dim), so the filled part is one contiguous
    block: a step's keys/values are written in place, where ``torch.cat`` copied the whole past
    at every step, and reordering the hypotheses copies only the filled part, keys and values in
    one call. The capacity doubles when it runs out. Attention reads strided
    (B, heads, T, head_dim) views; SDPA takes them as they are, at the speed of contiguous ones.
    Beam search got 2 to 4% faster on 2 CPU cores (the 6+6 teacher and the int8 3+3 student of
    docs/benchmarks.md; same translations)."""

    def __init__(self) -> None:
        self.storage: Optional[torch.Tensor] = None
        self.length = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values (B, heads, T, head_dim) of the new positions -> all of them so far, (B, heads, length, head_dim)."""
        new = torch.stack((keys, values)).permute(3, 0, 1, 2, 4)  # (T, 2, B, heads, head_dim)
        end = self.length + new.shape[0]
        if self.storage is None or end > self.storage.shape[0]:
            grown = new.new_empty((max(16, 2 * end), *new.shape[1:]))
            if self.storage is not None:
                grown[: self.length] = self.storage[: self.length]
            self.storage = grown
        self.storage[self.length : end] = new
        self.length = end
        return self.view(0), self.view(1)

    def view(self, which: int) -> torch.Tensor:
        """0: the keys, 1: the values, (B, heads, length, head_dim)."""
        return self.storage[: self.length, which].permute(1, 2, 0, 3)

    def reorder(self, order: torch.Tensor) -> None:
        """Keep the hypotheses (rows) of ``order`` (N,), in that order; N may be fewer than B."""
        if self.storage is None:
            return
        kept = self.storage.new_empty((self.storage.shape[0], 2, len(order), *self.storage.shape[3:]))
        torch.index_select(self.storage[: self.length], 2, order, out=kept[: self.length])
        self.storage = kept


# Per-layer cache for incremental decoding: "self_kv" -> the self-attention's KeyValueBuffer;
# "cross_k", "cross_v" -> the encoder's keys/values (B', heads, S, head_dim), computed once.
LayerCache = dict[str, Union[torch.Tensor, KeyValueBuffer]]


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention. Four nn.Linear leaves so compression callbacks find them.

    ``kv_dim``: the width of the keys' and values' input when it differs from the queries'
    (cross-attention of a bottleneck decoder layer reads the wider encoder output)."""

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0, kv_dim: Optional[int] = None) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} is not divisible by heads={heads}")
        self.heads, self.head_dim, self.dropout = heads, d_model // heads, dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(kv_dim or d_model, d_model)
        self.v_proj = nn.Linear(kv_dim or d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, D) -> (B, heads, T, head_dim)
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key_value: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        cache: Optional[LayerCache] = None,
        cache_prefix: str = "",
        static_kv: bool = False,
        probabilities_out: Optional[list[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """query (B, T, D), key_value (B', S, kv_dim) -> (B, T, D).

        attn_mask: boolean, True where attention is allowed, broadcastable to (B', heads, T, S).
        cache: for incremental decoding. Self-attention (static_kv=False) appends this step's
            keys/values to the cache's KeyValueBuffer; cross-attention (static_kv=True)
            computes the encoder's keys/values once and reuses them.
        B may be a multiple g of B' (beam search: the g hypotheses of a sentence, in consecutive
        rows, attend to that sentence's one copy of the encoder output); then is_causal must be
        False, as the g queries of a row become g * T queries of one attention.
        probabilities_out: when given, the attention probabilities (B, heads, T, S), before
            dropout, are appended to it (explicit softmax instead of SDPA).
        """
        q = self._split(self.q_proj(query))
        key_name, value_name = f"{cache_prefix}k", f"{cache_prefix}v"
        if cache is not None and static_kv and key_name in cache:
            k, v = cache[key_name], cache[value_name]
        else:
            k, v = self._split(self.k_proj(key_value)), self._split(self.v_proj(key_value))
            if cache is not None and static_kv:
                cache[key_name], cache[value_name] = k, v
            elif cache is not None:
                k, v = cache.setdefault(f"{cache_prefix}kv", KeyValueBuffer()).append(k, v)
        group = q.shape[0] // k.shape[0]
        if group * k.shape[0] != q.shape[0]:
            raise ValueError(f"{q.shape[0]} query rows cannot share {k.shape[0]} key/value rows")
        if group > 1:
            if is_causal:
                raise ValueError("grouped queries (more query rows than key/value rows) need is_causal=False")
            # (g * B', h, T, hd) -> (B', h, g * T, hd): rows b * g + j become query j * T + t of row b.
            q = q.unflatten(0, (k.shape[0], group)).transpose(1, 2).flatten(2, 3)
        dropout = self.dropout if self.training else 0.0
        if probabilities_out is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal)
        else:
            out, probabilities = explicit_attention(q, k, v, attn_mask, is_causal, dropout)
            if group > 1:
                probabilities = probabilities.unflatten(2, (group, -1)).transpose(1, 2).flatten(0, 1)
            probabilities_out.append(probabilities)
        if group > 1:  # back to (g * B', h, T, hd)
            out = out.unflatten(2, (group, -1)).transpose(1, 2).flatten(0, 1)
        return self.out_proj(out.transpose(1, 2).flatten(-2))


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                       is_causal: bool, dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What SDPA computes, with the probabilities: q (B, h, T, hd), k/v (B, h, S, hd) ->
    (output (B, h, T, hd), probabilities (B, h, T, S) before dropout). The softmax runs in fp32."""
    scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5
    if is_causal:
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()  # as SDPA: top-left aligned
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probabilities = scores.softmax(-1)
    weights = F.dropout(probabilities, dropout) if dropout > 0 else probabilities
    return weights.to(v.dtype) @ v, probabilities
