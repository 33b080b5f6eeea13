"""Encoder-decoder Transformer (Vaswani et al. 2017) with sinusoidal positions and tied embeddings."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

from nmt_lightning.model.attention import KeyValueBuffer, LayerCache
from nmt_lightning.model.bottleneck import BottleneckDecoderLayer, BottleneckEncoderLayer
from nmt_lightning.model.features import TransformerFeatures
from nmt_lightning.model.layers import DecoderLayer, EncoderLayer

SHARE_CHOICES = ("none", "decoder", "all")


@dataclass(frozen=True)
class TransformerConfig:
    """Architecture. ``share_embeddings``: "none"; "decoder" ties the target embedding and
    the output projection (Press & Wolf 2017); "all" also shares the source embedding (needs
    a joint vocabulary).

    A deep, thin student (MobileBERT): ``bottleneck_dim`` makes every layer a bottleneck block
    (``model/bottleneck.py``) whose attention and ``stacked_ffn`` feed-forward layers (of
    ``ffn_dim``) work at that width, ``heads`` dividing it; ``embedding_dim`` narrows the
    embeddings, with a linear map to ``d_model`` after the lookup and one back before the
    (tied) output projection.
    """

    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 512
    ffn_dim: int = 2048
    heads: int = 8
    encoder_layers: int = 6
    decoder_layers: int = 6
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    pre_norm: bool = False
    share_embeddings: str = "all"
    max_positions: int = 1024
    pad_id: int = 0
    bottleneck_dim: Optional[int] = None
    stacked_ffn: int = 1
    embedding_dim: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("src_vocab_size", "tgt_vocab_size", "d_model", "ffn_dim", "heads", "encoder_layers",
                     "decoder_layers", "max_positions", "stacked_ffn"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("bottleneck_dim", "embedding_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or None), got {getattr(self, name)}")
        attention_width = self.bottleneck_dim or self.d_model
        if attention_width % self.heads:
            raise ValueError(f"{'bottleneck_dim' if self.bottleneck_dim else 'd_model'}={attention_width} is not "
                             f"divisible by heads={self.heads}")
        if self.stacked_ffn != 1 and self.bottleneck_dim is None:
            raise ValueError(f"stacked_ffn={self.stacked_ffn} stacks feed-forward layers inside bottleneck blocks; "
                             f"set bottleneck_dim too")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.share_embeddings not in SHARE_CHOICES:
            raise ValueError(f"share_embeddings must be one of {SHARE_CHOICES}, got '{self.share_embeddings}'")
        if self.share_embeddings == "all" and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(
                f"share_embeddings='all' needs one joint vocabulary, but the source has {self.src_vocab_size} "
                f"entries and the target {self.tgt_vocab_size}; use 'decoder' or 'none'"
            )


# Architectures of the paper (base, big) and a CPU-sized one. The seed experiments' big model
# uses 16 heads, as the paper does.
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=256, ffn_dim=1024, heads=4, encoder_layers=3, decoder_layers=3, dropout=0.1),
    "base": dict(d_model=512, ffn_dim=2048, heads=8, encoder_layers=6, decoder_layers=6, dropout=0.1),
    "big": dict(d_model=1024, ffn_dim=4096, heads=16, encoder_layers=6, decoder_layers=6, dropout=0.3),
    # A MobileBERT-style student of the 6+6 teacher (recipes/libreoffice_en_cs/teacher.yaml):
    # the same depth and inter-block width, every block narrowed to a 64-wide bottleneck.
    "tiny-bottleneck": dict(d_model=256, ffn_dim=256, heads=4, encoder_layers=6, decoder_layers=6, dropout=0.1,
                            bottleneck_dim=64, stacked_ffn=2, embedding_dim=128),
}


# What a TranslationModule's hyper-parameters (its __init__ arguments, stored in every checkpoint
# and export) say about its Transformer, with that module's defaults: the preset, the non-None
# fields of the preset that override it, and the fields no preset sets.
PRESET_FIELDS = ("d_model", "ffn_dim", "heads", "encoder_layers", "decoder_layers", "dropout", "bottleneck_dim",
                 "stacked_ffn", "embedding_dim")
ARCHITECTURE_DEFAULTS: dict[str, Any] = dict(src_vocab_size=8000, tgt_vocab_size=8000, attention_dropout=0.0,
                                             activation_dropout=0.0, pre_norm=False, share_embeddings="all",
                                             max_positions=1024)


def config_from_hyperparameters(hyper_parameters: Mapping[str, Any], pad_id: int = 0) -> TransformerConfig:
    """The architecture of the TranslationModule with these hyper-parameters (other keys, such as
    the learning rate, are ignored): ``preset`` ("tiny" when absent) with the fields given."""
    preset = hyper_parameters.get("preset", "tiny")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got '{preset}'")
    overrides = {k: hyper_parameters[k] for k in PRESET_FIELDS if hyper_parameters.get(k) is not None}
    fixed = {k: hyper_parameters.get(k, default) for k, default in ARCHITECTURE_DEFAULTS.items()}
    return TransformerConfig(**{**PRESETS[preset], **overrides}, **fixed, pad_id=pad_id)


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    """(length, d_model): sin on even dimensions, cos on odd ones, as in the paper."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: d_model // 2])
    return table


class Transformer(nn.Module):
    """``forward(source, decoder_input) -> logits (B, T, tgt_vocab)``.

    With ``features=TransformerFeatures(...)`` the pass also records per-layer hidden states
    and, if asked, attention probabilities into it (see ``model/features.py``).

    For decoding: ``encode`` once, then ``decode_step`` one position at a time with a cache
    from ``new_cache`` (keys/values of every layer), reordered with ``reorder_cache`` when
    beam search reshuffles hypotheses.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        e = config.embedding_dim or d  # the embedding width
        self.src_embed = nn.Embedding(config.src_vocab_size, e, padding_idx=config.pad_id)
        self.tgt_embed = (self.src_embed if config.share_embeddings == "all"
                          else nn.Embedding(config.tgt_vocab_size, e, padding_idx=config.pad_id))
        self.output_projection = nn.Linear(e, config.tgt_vocab_size, bias=False)
        if config.share_embeddings in ("decoder", "all"):
            self.output_projection.weight = self.tgt_embed.weight
        if e != d:  # narrow embeddings: e -> d after the lookup, d -> e before the output projection
            self.encoder_embed_projection = nn.Linear(e, d)
            self.decoder_embed_projection = nn.Linear(e, d)
            self.output_down_projection = nn.Linear(d, e, bias=False)
        self.register_buffer("positions", sinusoidal_positions(config.max_positions, d), persistent=False)
        if config.bottleneck_dim is None:
            layer_args = (d, config.heads, config.ffn_dim, config.dropout, config.attention_dropout,
                          config.activation_dropout, config.pre_norm)
            self.encoder_layers = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(config.encoder_layers))
            self.decoder_layers = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(config.decoder_layers))
        else:
            layer_args = (d, config.bottleneck_dim, config.heads, config.ffn_dim, config.stacked_ffn, config.dropout,
                          config.attention_dropout, config.activation_dropout, config.pre_norm)
            self.encoder_layers = nn.ModuleList(BottleneckEncoderLayer(*layer_args)
                                                for _ in range(config.encoder_layers))
            self.decoder_layers = nn.ModuleList(BottleneckDecoderLayer(*layer_args)
                                                for _ in range(config.decoder_layers))
        # Pre-norm stacks end with a LayerNorm; post-norm layers already end normalised.
        self.encoder_norm = nn.LayerNorm(d) if config.pre_norm else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d) if config.pre_norm else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    @classmethod
    def from_preset(cls, preset: str, src_vocab_size: int, tgt_vocab_size: int, **overrides) -> "Transformer":
        if preset not in PRESETS:
            raise ValueError(f"unknown preset '{preset}'; choose from {sorted(PRESETS)}")
        return cls(TransformerConfig(src_vocab_size, tgt_vocab_size, **{**PRESETS[preset], **overrides}))

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for embedding in {id(e): e for e in (self.src_embed, self.tgt_embed)}.values():
            nn.init.normal_(embedding.weight, mean=0.0, std=embedding.embedding_dim ** -0.5)
            with torch.no_grad():
                embedding.weight[self.config.pad_id].zero_()

    def _embed(self, embedding: nn.Embedding, tokens: torch.Tensor, start: int = 0,
               projection: Optional[nn.Module] = None) -> torch.Tensor:
        """tokens (B, T) -> (B, T, d_model): scaled embeddings (projected to d_model if narrower) plus positions."""
        length = tokens.shape[1]
        if start + length > self.config.max_positions:
            raise ValueError(f"sequence of {start + length} positions exceeds max_positions={self.config.max_positions}")
        x = embedding(tokens) * math.sqrt(self.config.embedding_dim or self.config.d_model)
        if projection is not None:
            x = projection(x)
        x = x + self.positions[start : start + length].to(x.dtype)
        return self.dropout(x)

    def source_mask(self, source: torch.Tensor) -> torch.Tensor:
        """(B, S) ids -> (B, 1, 1, S) boolean, True at real tokens (broadcast over heads and queries)."""
        return (source != self.config.pad_id)[:, None, None, :]

    def encode(self, source: torch.Tensor,
               features: Optional[TransformerFeatures] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """source (B, S) -> (memory (B, S, D), source_mask (B, 1, 1, S))."""
        mask = self.source_mask(source)
        x = self._embed(self.src_embed, source, projection=getattr(self, "encoder_embed_projection", None))
        if features is not None:
            features.add_state("encoder", x)
        for layer in self.encoder_layers:
            x = layer(x, mask, features)
            if features is not None:
                features.add_state("encoder", x)
        memory = self.encoder_norm(x)
        if features is not None and features.hidden_states:
            features.encoder_output = memory
        return memory, mask

    def decode(self, decoder_input: torch.Tensor, memory: torch.Tensor, source_mask: torch.Tensor,
               caches: Optional[list[LayerCache]] = None, start: int = 0,
               features: Optional[TransformerFeatures] = None,
               projection: Optional[nn.Module] = None) -> torch.Tensor:
        """decoder_input (B, T) -> logits (B, T, V). With ``caches``, T is the newest position only.
        ``projection``: another output layer (``restricted_projection``: logits over a shortlist).

        memory (B', S, D) and source_mask (B', 1, 1, S) may hold one row per sentence for g
        hypotheses each (B = g * B', a sentence's hypotheses in consecutive rows): beam search
        then computes and caches the encoder keys/values once per sentence, not once per beam.
        """
        x = self._embed(self.tgt_embed, decoder_input, start, getattr(self, "decoder_embed_projection", None))
        if features is not None:
            features.add_state("decoder", x)
        for index, layer in enumerate(self.decoder_layers):
            x = layer(x, memory, source_mask, None if caches is None else caches[index], features)
            if features is not None:
                features.add_state("decoder", x)
        x = self.decoder_norm(x)
        if features is not None and features.hidden_states:
            features.decoder_output = x
        if hasattr(self, "output_down_projection"):
            x = self.output_down_projection(x)  # (B, T, d_model) -> (B, T, embedding_dim)
        return (projection or self.output_projection)(x)

    def restricted_projection(self, rows: torch.Tensor) -> nn.Module:
        """The output layer over the target ids ``rows`` (C,) only: logits (..., C), column c for
        id ``rows[c]``. A plain nn.Linear is sliced once (the product then costs C / V of the
        full one); another layer (an int8 one) computes every logit and keeps the columns."""
        projection = self.output_projection
        if type(projection) is nn.Linear:
            return _RowsOfLinear(projection.weight.detach().index_select(0, rows),
                                 None if projection.bias is None else projection.bias.detach().index_select(0, rows))
        return _ColumnsOfOutput(projection, rows)

    def forward(self, source: torch.Tensor, decoder_input: torch.Tensor,
                features: Optional[TransformerFeatures] = None) -> torch.Tensor:
        memory, mask = self.encode(source, features)
        return self.decode(decoder_input, memory, mask, features=features)

    # ---------------------------------------------------------------- incremental decoding
    def new_cache(self) -> list[LayerCache]:
        return [{} for _ in self.decoder_layers]

    def decode_step(self, last_tokens: torch.Tensor, memory: torch.Tensor, source_mask: torch.Tensor,
                    caches: list[LayerCache], step: int, projection: Optional[nn.Module] = None) -> torch.Tensor:
        """last_tokens (B, 1) at position ``step`` -> logits (B, V) for position step + 1."""
        return self.decode(last_tokens, memory, source_mask, caches, start=step, projection=projection)[:, -1]

    @staticmethod
    def reorder_cache(caches: list[LayerCache], order: torch.Tensor, encoder_order: Optional[torch.Tensor] = None) -> None:
        """Keep the cache rows of ``order``, in place: the self-attention keys/values, and with
        ``encoder_order`` the cross-attention ones, by their own rows (beam search keeps one
        copy of the encoder keys/values per sentence, and reorders them only when it drops
        sentences).

        Beam search's per-step reorder leaves the cross-attention keys/values alone, as it does
        the encoder output: it only reorders hypotheses within a sentence, which share them.
        """
        if encoder_order is None and bool((order == torch.arange(len(order), device=order.device)).all()):
            return  # every hypothesis continues its own history (about one beam step in six)
        for cache in caches:
            for name, value in cache.items():
                if isinstance(value, KeyValueBuffer):
                    value.reorder(order)
                elif encoder_order is not None:  # the cross-attention keys/values, one copy per sentence
                    cache[name] = value.index_select(0, encoder_order)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def config_dict(self) -> dict:
        return asdict(self.config)



class _RowsOfLinear(nn.Module):
    """x (..., in) -> logits (..., C) over the kept rows of an output layer (no parameters of its own)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class _ColumnsOfOutput(nn.Module):
    """Every logit of ``layer``, then the columns ``rows`` (C,)."""

    def __init__(self, layer: nn.Module, rows: torch.Tensor) -> None:
        super().__init__()
        self.layer, self.rows = layer, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).index_select(-1, self.rows)
