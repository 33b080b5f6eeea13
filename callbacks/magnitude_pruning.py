"""Gradual magnitude pruning while training (Zhu & Gupta 2017): the baseline tickets are measured against.

No rewinding and no restart: every ``frequency`` steps between ``start_step`` and ``end_step``
the smallest-magnitude surviving weights are pruned so that the sparsity follows the cubic
schedule

    s(t) = sparsity * (1 - (1 - (t - start_step) / (end_step - start_step)) ** 3)

(fast at first, while the network can recover, slow near the end), and training simply goes
on. Brix et al. (2020) find that on Transformer-base it matches lottery tickets up to about 85%
sparsity and beats them beyond. Masks are model buffers (``callbacks._pruning``), and the
schedule is a function of the global step, so a resumed run prunes exactly as an uninterrupted
one; every DDP rank computes the same masks from the same weights.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning as L

from callbacks._arguments import flag, globs, integer, number, one_of
from callbacks._pruning import PrunedWeights
from callbacks._transforms import refuse_optimizer_state_of_untransformed_weights

__all__ = ["MagnitudePruning"]

OWNER = "MagnitudePruning"


class MagnitudePruning(L.Callback):
    """Args: ``sparsity`` in [0, 1) reached at ``end_step``; pruning every ``frequency`` steps from
    ``start_step``; ``scope`` "global" or "layer"; module globs and ``prune_embeddings`` as for
    ``LotteryTicketPruning``."""

    def __init__(self, sparsity: float = 0.8, end_step: int = 1000, start_step: int = 0, frequency: int = 100,
                 scope: str = "global", include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                 prune_embeddings: bool = False) -> None:
        self.sparsity = number(OWNER, "sparsity", sparsity, 0.0, 1.0, high_open=True)
        self.start_step = integer(OWNER, "start_step", start_step, minimum=0)
        self.end_step = integer(OWNER, "end_step", end_step, minimum=start_step + 1)
        self.frequency = integer(OWNER, "frequency", frequency, minimum=1)
        self.scope = one_of(OWNER, "scope", scope, ("global", "layer"))
        self.include, self.exclude = globs(OWNER, "include", include, allow_empty=False), globs(OWNER, "exclude", exclude)
        self.prune_embeddings = flag(OWNER, "prune_embeddings", prune_embeddings)
        self.weights: Optional[PrunedWeights] = None
        self.current_sparsity = 0.0

    def target(self, step: int) -> float:
        """The sparsity the schedule asks for at ``step``."""
        if step < self.start_step:
            return 0.0
        progress = min(1.0, (step - self.start_step) / (self.end_step - self.start_step))
        return self.sparsity * (1.0 - (1.0 - progress) ** 3)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.weights is None:
            self.weights = PrunedWeights(pl_module, OWNER, self.include, self.exclude, self.prune_embeddings)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Of the masks as restored; the per-step log reads this (the masks cost a sync per weight).
        self.current_sparsity = self.weights.sparsity()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        on_schedule = step >= self.start_step and ((step - self.start_step) % self.frequency == 0 or step == self.end_step)
        if on_schedule and step <= self.end_step and batch_idx % trainer.accumulate_grad_batches == 0:
            self.weights.prune_to(1.0 - self.target(step), self.scope)
            self.current_sparsity = self.weights.sparsity()
        pl_module.log("pruning/sparsity", self.current_sparsity, on_step=True, on_epoch=False, batch_size=1)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.weights.record(checkpoint, pl_module)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        refuse_optimizer_state_of_untransformed_weights(checkpoint, pl_module, OWNER)

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": [self.sparsity, self.start_step, self.end_step, self.frequency, self.scope]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = [self.sparsity, self.start_step, self.end_step, self.frequency, self.scope]
        if list(state.get("schedule", [])) != mine:
            raise ValueError(f"{OWNER}: the checkpoint was pruned on the schedule {state.get('schedule')}, this run "
                             f"asks for {mine} (sparsity, start_step, end_step, frequency, scope)")
