"""What a LightningModule offers the distillation callbacks, as ``typing.Protocol``s.

A callback cannot change the loss a ``training_step`` returns, so the module offers an
extension point (``LossTermHost``): it sums the registered terms into its training loss,
calling each with a ``LossContext``; a term that needs per-layer features gets a
``FeatureRecorder`` filled by the forward pass. docs/using_callbacks.md describes each member.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Protocol, runtime_checkable

import torch

__all__ = ["TASK_LOSS", "FeatureRecorder", "LossContext", "LossTermHost", "missing_members"]

TASK_LOSS = "cross_entropy"  # the name under which a module's own task loss is weighed


@runtime_checkable
class LossTermHost(Protocol):
    """The module side: ``register_loss_term`` adds ``weight * fn(context)`` to the training
    loss (``fn`` returns a sum over the batch's target positions); ``remove_loss_term`` ignores a
    name never registered; ``set_loss_weight(TASK_LOSS, w)`` weighs the module's own loss.
    Optional: ``loss_weight(name)``, the current weight (so a callback can restore it)."""

    def register_loss_term(self, name: str, fn: Callable[[Any], torch.Tensor], weight: float = 1.0,
                           features: Iterable[str] = ()) -> None: ...

    def remove_loss_term(self, name: str) -> None: ...

    def set_loss_weight(self, name: str, weight: float) -> None: ...


class LossContext(Protocol):
    """What a loss term is called with at every training step."""

    batch: Any  # the training batch (the teacher's inputs are taken from it)
    logits: torch.Tensor  # (..., vocabulary)
    target_mask: torch.Tensor  # bool (...), True where a target position counts
    num_tokens: Any  # the number of target positions
    source_mask: Optional[torch.Tensor]  # bool over encoder positions
    features: Optional["FeatureRecorder"]  # given to every term once any term asked for features
    module: Any  # the LightningModule


class FeatureRecorder(Protocol):
    """Filled by a forward pass that is given it as its last argument: states index 0 the
    embeddings and l the output of layer l; attention lists index l - 1 for layer l."""

    encoder_states: list[torch.Tensor]  # (batch, positions, width) each
    decoder_states: list[torch.Tensor]
    encoder_self_attention: list[torch.Tensor]  # (batch, heads, queries, keys) probabilities each
    decoder_self_attention: list[torch.Tensor]
    cross_attention: list[torch.Tensor]

    @classmethod
    def requesting(cls, names: Iterable[str]) -> "FeatureRecorder": ...


def missing_members(obj: Any, members: Iterable[str]) -> list[str]:
    """The callable ``members`` that ``obj`` lacks (a protocol checked at setup, all at once)."""
    return [name for name in members if not callable(getattr(obj, name, None))]
