"""What a forward pass can tell besides the logits, recorded only when a caller asks.

Pass a ``TransformerFeatures`` to ``Transformer.forward`` (or ``encode`` / ``decode``) and it
is filled during the pass; without one nothing is recorded and attention runs on SDPA.
Hidden states cost nothing extra (the tensors exist anyway); attention probabilities switch
the attention layers to an explicit softmax, so ask for them only when they are used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

FEATURE_NAMES = ("hidden_states", "attention")


@dataclass
class TransformerFeatures:
    """Per-layer tensors of one forward pass (B: batch, S: source, T: target positions, D: width, h: heads).

    encoder_states: the embeddings, then each encoder layer's output: L_enc + 1 tensors (B, S, D)
    decoder_states: likewise for the decoder: L_dec + 1 tensors (B, T, D)
    encoder_output: the encoder's result after its final norm (the memory), (B, S, D)
    decoder_output: the decoder's result after its final norm, before the output projection, (B, T, D)
    encoder_self_attention, decoder_self_attention, cross_attention: per layer, the attention
        probabilities before dropout, (B, h, S, S), (B, h, T, T) and (B, h, T, S)
    (With pre-norm, layer outputs are the un-normalised residual stream; post-norm layers end
    with their LayerNorm.)
    """

    hidden_states: bool = True
    attention: bool = False
    encoder_states: list[torch.Tensor] = field(default_factory=list)
    decoder_states: list[torch.Tensor] = field(default_factory=list)
    encoder_output: Optional[torch.Tensor] = None
    decoder_output: Optional[torch.Tensor] = None
    encoder_self_attention: list[torch.Tensor] = field(default_factory=list)
    decoder_self_attention: list[torch.Tensor] = field(default_factory=list)
    cross_attention: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def requesting(cls, names: Iterable[str]) -> "TransformerFeatures":
        """A recorder for the named features (a subset of ``FEATURE_NAMES``)."""
        names = set(names)
        unknown = names - set(FEATURE_NAMES)
        if unknown:
            raise ValueError(f"unknown model features {sorted(unknown)}; choose from {list(FEATURE_NAMES)}")
        return cls(hidden_states="hidden_states" in names, attention="attention" in names)

    def attention_sink(self, kind: str) -> Optional[list[torch.Tensor]]:
        """The list the attention layers of ``kind`` append their probabilities to, if requested."""
        return getattr(self, kind) if self.attention else None

    def add_state(self, side: str, x: torch.Tensor) -> None:
        if self.hidden_states:
            getattr(self, f"{side}_states").append(x)
