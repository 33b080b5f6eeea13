"""Bottleneck layers of a deep, thin student (MobileBERT, Sun et al. 2020), for encoder and decoder.

Each block keeps the model's width ``d_model`` (MobileBERT's inter-block width) between blocks
and works inside at a narrower ``bottleneck_dim``::

    x (B, T, d_model) -> input_bottleneck -> h (B, T, bottleneck_dim)
    h -> self-attention [-> cross-attention to the encoder output] -> stacked_ffn feed-forwards
    h -> output_bottleneck -> residual with x (B, T, d_model)

every sub-layer with its own residual connection and LayerNorm (post-norm as the paper's
Transformer, or pre-norm). The layer outputs therefore have the teacher's width, so layer-wise
transfer compares them directly, while attention and feed-forward cost the bottleneck's.

Departures from MobileBERT, for simplicity: queries, keys and values all come from the
bottleneck (MobileBERT computes the values from the wide input), LayerNorm stays (MobileBERT
replaces it by an element-wise affine "NoNorm" for latency) and the activation stays ReLU.
All leaves are nn.Linear / nn.LayerNorm, so compression callbacks find them as in the
standard layers.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nmt_lightning.model.attention import LayerCache, MultiHeadAttention
from nmt_lightning.model.features import TransformerFeatures
from nmt_lightning.model.layers import FeedForward, Residual


class _StackedFeedForward(nn.Module):
    """``count`` feed-forward sub-layers, each with its residual connection, at the bottleneck width."""

    def __init__(self, width: int, ffn_dim: int, count: int, dropout: float, activation_dropout: float,
                 pre_norm: bool) -> None:
        super().__init__()
        self.ffns = nn.ModuleList(FeedForward(width, ffn_dim, activation_dropout) for _ in range(count))
        self.blocks = nn.ModuleList(Residual(width, dropout, pre_norm) for _ in range(count))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for ffn, block in zip(self.ffns, self.blocks):
            h = block(h, ffn)
        return h


class BottleneckEncoderLayer(nn.Module):
    def __init__(self, d_model: int, bottleneck_dim: int, heads: int, ffn_dim: int, stacked_ffn: int, dropout: float,
                 attention_dropout: float, activation_dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.input_bottleneck = nn.Linear(d_model, bottleneck_dim)
        self.self_attn = MultiHeadAttention(bottleneck_dim, heads, attention_dropout)
        self.attn_block = Residual(bottleneck_dim, dropout, pre_norm)
        self.feed_forward = _StackedFeedForward(bottleneck_dim, ffn_dim, stacked_ffn, dropout, activation_dropout,
                                                pre_norm)
        self.output_bottleneck = nn.Linear(bottleneck_dim, d_model)
        self.output_block = Residual(d_model, dropout, pre_norm)

    def forward(self, x: torch.Tensor, source_mask: torch.Tensor,
                features: Optional[TransformerFeatures] = None) -> torch.Tensor:
        """x (B, S, d_model); source_mask (B, 1, 1, S), True at real tokens."""
        probabilities = features.attention_sink("encoder_self_attention") if features is not None else None

        def block(wide: torch.Tensor) -> torch.Tensor:
            h = self.input_bottleneck(wide)  # (B, S, bottleneck_dim)
            h = self.attn_block(h, lambda q: self.self_attn(q, q, attn_mask=source_mask,
                                                            probabilities_out=probabilities))
            return self.output_bottleneck(self.feed_forward(h))

        return self.output_block(x, block)


class BottleneckDecoderLayer(nn.Module):
    def __init__(self, d_model: int, bottleneck_dim: int, heads: int, ffn_dim: int, stacked_ffn: int, dropout: float,
                 attention_dropout: float, activation_dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.input_bottleneck = nn.Linear(d_model, bottleneck_dim)
        self.self_attn = MultiHeadAttention(bottleneck_dim, heads, attention_dropout)
        # Queries from the bottleneck, keys and values from the encoder output (d_model wide).
        self.cross_attn = MultiHeadAttention(bottleneck_dim, heads, attention_dropout, kv_dim=d_model)
        self.self_block = Residual(bottleneck_dim, dropout, pre_norm)
        self.cross_block = Residual(bottleneck_dim, dropout, pre_norm)
        self.feed_forward = _StackedFeedForward(bottleneck_dim, ffn_dim, stacked_ffn, dropout, activation_dropout,
                                                pre_norm)
        self.output_bottleneck = nn.Linear(bottleneck_dim, d_model)
        self.output_block = Residual(d_model, dropout, pre_norm)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, source_mask: torch.Tensor,
                cache: Optional[LayerCache] = None, features: Optional[TransformerFeatures] = None) -> torch.Tensor:
        """x (B, T, d_model), memory (B', S, d_model); with a cache, x holds the newest position only
        (the cache then holds keys/values at the bottleneck width)."""
        causal = cache is None or x.shape[1] > 1
        if cache is not None and causal and "self_kv" in cache:
            raise ValueError("incremental decoding feeds one position at a time")
        self_sink = features.attention_sink("decoder_self_attention") if features is not None else None
        cross_sink = features.attention_sink("cross_attention") if features is not None else None

        def block(wide: torch.Tensor) -> torch.Tensor:
            h = self.input_bottleneck(wide)  # (B, T, bottleneck_dim)
            h = self.self_block(h, lambda q: self.self_attn(q, q, is_causal=causal, cache=cache, cache_prefix="self_",
                                                            probabilities_out=self_sink))
            h = self.cross_block(h, lambda q: self.cross_attn(q, memory, attn_mask=source_mask, cache=cache,
                                                              cache_prefix="cross_", static_kv=True,
                                                              probabilities_out=cross_sink))
            return self.output_bottleneck(self.feed_forward(h))

        return self.output_block(x, block)
