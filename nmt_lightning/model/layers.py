"""Encoder and decoder layers, post-norm (the paper) or pre-norm (more stable when deep)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from nmt_lightning.model.attention import LayerCache, MultiHeadAttention
from nmt_lightning.model.features import TransformerFeatures


class FeedForward(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, activation_dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.dropout = nn.Dropout(activation_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(torch.relu(self.fc1(x))))


class Residual(nn.Module):
    """x + dropout(f(x)) with LayerNorm before f (pre-norm) or after the sum (post-norm)."""

    def __init__(self, d_model: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, ffn_dim: int, dropout: float, attention_dropout: float,
                 activation_dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, heads, attention_dropout)
        self.ffn = FeedForward(d_model, ffn_dim, activation_dropout)
        self.attn_block = Residual(d_model, dropout, pre_norm)
        self.ffn_block = Residual(d_model, dropout, pre_norm)

    def forward(self, x: torch.Tensor, source_mask: torch.Tensor,
                features: Optional[TransformerFeatures] = None) -> torch.Tensor:
        """x (B, S, D); source_mask (B, 1, 1, S), True at real tokens."""
        probabilities = features.attention_sink("encoder_self_attention") if features is not None else None
        x = self.attn_block(x, lambda h: self.self_attn(h, h, attn_mask=source_mask, probabilities_out=probabilities))
        return self.ffn_block(x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, ffn_dim: int, dropout: float, attention_dropout: float,
                 activation_dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, heads, attention_dropout)
        self.cross_attn = MultiHeadAttention(d_model, heads, attention_dropout)
        self.ffn = FeedForward(d_model, ffn_dim, activation_dropout)
        self.self_block = Residual(d_model, dropout, pre_norm)
        self.cross_block = Residual(d_model, dropout, pre_norm)
        self.ffn_block = Residual(d_model, dropout, pre_norm)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, source_mask: torch.Tensor,
                cache: Optional[LayerCache] = None, features: Optional[TransformerFeatures] = None) -> torch.Tensor:
        """x (B, T, D), memory (B, S, D). With a cache, x holds only the newest position(s)
        and attends to every cached one, so no causal mask is needed for a single step."""
        causal = cache is None or x.shape[1] > 1
        if cache is not None and causal and "self_kv" in cache:
            raise ValueError("incremental decoding feeds one position at a time")
        self_sink = features.attention_sink("decoder_self_attention") if features is not None else None
        cross_sink = features.attention_sink("cross_attention") if features is not None else None
        x = self.self_block(x, lambda h: self.self_attn(h, h, is_causal=causal, cache=cache, cache_prefix="self_",
                                                        probabilities_out=self_sink))
        x = self.cross_block(x, lambda h: self.cross_attn(h, memory, attn_mask=source_mask, cache=cache,
                                                          cache_prefix="cross_", static_kv=True,
                                                          probabilities_out=cross_sink))
        return self.ffn_block(x, self.ffn)
