"""The lottery ticket hypothesis: iterative magnitude pruning with (late) rewinding.

Frankle & Carbin (2019): train, prune the smallest-magnitude weights, reset the survivors to
their initial values, train again; the sparse "ticket" matches the dense network. For deep
networks and Transformers the reset must go to the weights of a step ``k`` a little way into
training instead of the initialisation ("late rewinding", Frankle et al. 2020; Yu et al. 2020
for Transformer translation). Each round of this callback:

    train ``round_steps`` steps (or ``round_epochs`` epochs)  ->  prune a fraction of the
    surviving weights (smallest |w|, over all selected layers or per layer)  ->  reset every
    parameter to its step-k value (pruned entries stay 0)  ->  a fresh optimiser, and the
    learning-rate schedule rewound to step k as well

Rewinding the schedule with the weights is Frankle et al.'s (2020) definition: the ticket
retrains from W_k *with the learning rate of step k onwards*, so with a warm-up longer than k
it finishes the warm-up instead of starting it again (``schedule="restart"`` starts each
round's schedule at step 0 instead; the two differ only by k steps of the schedule, see
docs/methods.md for the measured difference). Adam's moments start afresh each round, as in
Frankle et al.'s code (their optimiser state is not part of the rewind point).

``rounds`` prunings reach ``sparsity`` geometrically (the kept fraction after round r is
``(1 - sparsity) ** (r / rounds)``; ``rounds=1`` is one-shot pruning), then a last round trains
the final ticket, so a run takes ``(rounds + 1) * round_steps`` steps. ``reinitialize=True`` is
the control of the original paper: the survivors get fresh random values (same scale as their
step-k values) instead of being rewound; with ``masks_from`` (another run's checkpoint) it
trains a random network under that run's final masks.

Masks are model buffers (``callbacks._pruning.PruningMask``); the step-k snapshot, the round and
the random generator are this callback's state, so a run stopped anywhere resumes exactly.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
import torch

from callbacks._arguments import existing_file, flag, globs, integer, number, one_of, shown
from callbacks._optimization import restart_optimization
from callbacks._pruning import PrunedWeights, masks_in_checkpoint
from callbacks._transforms import refuse_optimizer_state_of_untransformed_weights
from compression_contract.checkpoints import read_checkpoint

__all__ = ["LotteryTicketPruning"]

OWNER = "LotteryTicketPruning"
SCOPES = ("global", "layer")
SCHEDULES = ("continue", "restart")


class LotteryTicketPruning(L.Callback):
    """Iterative magnitude pruning with rewinding (see the module docstring).

    Args:
        sparsity: fraction of the selected weights pruned at the end, in [0, 1).
        rounds: number of prunings (1: one-shot); or give ``prune_fraction`` instead.
        prune_fraction: fraction of the surviving weights pruned each round; ``rounds`` then
            follows from ``sparsity`` (the last round prunes exactly to it).
        round_steps / round_epochs: the training length of a round (exactly one of them).
        rewind_step: k, the step whose weights survivors are reset to (0: the initialisation).
        schedule: "continue" (each round's learning-rate schedule resumes at step k, with the
            weights: Frankle et al. 2020) or "restart" (each round's schedule starts at step 0).
        scope: "global" (one magnitude threshold over all selected weights) or "layer".
        include / exclude: globs over qualified module names (default: every nn.Linear).
        prune_embeddings: also prune nn.Embedding tables (with a tied output projection, both;
            without it a projection tied to an embedding stays dense).
        reinitialize: the random-reinitialisation control (survivors get fresh random values).
        masks_from: a checkpoint whose pruning masks are applied at the start (with rounds=0:
            train that ticket's structure; the control of Frankle & Carbin with reinitialize).
        seed: of the random values of ``reinitialize``.
    """

    def __init__(
        self,
        sparsity: float = 0.8,
        rounds: Optional[int] = 1,
        prune_fraction: Optional[float] = None,
        round_steps: Optional[int] = None,
        round_epochs: Optional[int] = None,
        rewind_step: int = 0,
        schedule: str = "continue",
        scope: str = "global",
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        prune_embeddings: bool = False,
        reinitialize: bool = False,
        masks_from: Optional[str] = None,
        seed: int = 0,
    ) -> None:
        self.sparsity = number(OWNER, "sparsity", sparsity, 0.0, 1.0, high_open=True)
        if prune_fraction is not None:
            prune_fraction = number(OWNER, "prune_fraction", prune_fraction, 0.0, 1.0, low_open=True, high_open=True)
            # The smallest number of rounds that reaches the target with this fraction per round.
            rounds = max(1, math.ceil(math.log(1.0 - sparsity) / math.log(1.0 - prune_fraction) - 1e-9)) \
                if sparsity > 0 else 0
        elif rounds is None:
            raise ValueError(f"{OWNER}: rounds must be given (1 = one-shot), or prune_fraction instead, got None")
        self.rounds = integer(OWNER, "rounds", rounds, minimum=0)
        self.prune_fraction = prune_fraction
        if (round_steps is None) == (round_epochs is None):
            raise ValueError(f"{OWNER}: round_steps or round_epochs must be given, exactly one of them; got "
                             f"round_steps={shown(round_steps)}, round_epochs={shown(round_epochs)}")
        self.round_steps = None if round_steps is None else integer(OWNER, "round_steps", round_steps, minimum=1)
        self.round_epochs = None if round_epochs is None else integer(OWNER, "round_epochs", round_epochs, minimum=1)
        self.rewind_step = integer(OWNER, "rewind_step", rewind_step, minimum=0)
        if self.round_steps is not None and self.rewind_step >= self.round_steps:
            raise ValueError(f"{OWNER}: rewind_step must come before the end of the first round (round_steps="
                             f"{round_steps}), got {rewind_step}")
        self.schedule = one_of(OWNER, "schedule", schedule, SCHEDULES)
        self.scope = one_of(OWNER, "scope", scope, SCOPES)
        self.include, self.exclude = globs(OWNER, "include", include, allow_empty=False), globs(OWNER, "exclude", exclude)
        self.prune_embeddings = flag(OWNER, "prune_embeddings", prune_embeddings)
        self.reinitialize = flag(OWNER, "reinitialize", reinitialize)
        self.masks_from = None if masks_from is None else existing_file(OWNER, "masks_from", masks_from)
        if self.rounds == 0 and masks_from is None:
            raise ValueError(f"{OWNER}: rounds=0 prunes nothing; rounds must be >= 1, or masks_from must name the "
                             f"masks to train, got rounds=0")
        self.seed = integer(OWNER, "seed", seed, 0, 2 ** 63 - 1)
        self.weights: Optional[PrunedWeights] = None
        # Callback state (checkpointed):
        self.round = 0  # prunings done
        self.snapshot: Optional[dict[str, torch.Tensor]] = None  # parameter name -> its step-k value
        self.generator = torch.Generator().manual_seed(self.seed)
        self.masks_applied = False
        self.current_sparsity = 0.0  # of the masks in the model (set at train start and at each pruning)

    # ------------------------------------------------------------------ schedule
    def kept_after(self, round_: int) -> float:
        """The fraction of the selected weights kept after ``round_`` prunings."""
        if self.rounds == 0:
            return 1.0
        if self.prune_fraction is not None:
            return max(1.0 - self.sparsity, (1.0 - self.prune_fraction) ** round_)
        return (1.0 - self.sparsity) ** (round_ / self.rounds)

    def _round_ended(self, trainer: L.Trainer, batch_idx: Optional[int]) -> bool:
        if self.round >= self.rounds:
            return False
        if self.round_steps is not None:
            at_boundary = batch_idx is not None and batch_idx % trainer.accumulate_grad_batches == 0
            return at_boundary and trainer.global_step >= (self.round + 1) * self.round_steps
        return batch_idx is None and trainer.current_epoch >= (self.round + 1) * self.round_epochs

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.weights is None:
            self.weights = PrunedWeights(pl_module, OWNER, self.include, self.exclude, self.prune_embeddings)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.max_steps is not None and trainer.max_steps >= 0 and self.round_steps is not None:
            needed = (self.rounds + 1) * self.round_steps
            if trainer.max_steps < needed:  # a warning: stopping early and resuming later is legitimate
                rank_zero_warn(f"{OWNER}: {self.rounds} rounds of {self.round_steps} steps and the last ticket's "
                               f"training need max_steps = {needed}; this fit stops at {trainer.max_steps}, "
                               f"in round {trainer.max_steps // self.round_steps}")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.masks_from is not None and not self.masks_applied:
            # Tensors and plain data only: unpickling runs no code.
            state = read_checkpoint(self.masks_from, f"{OWNER}: masks_from").get("state_dict", {})
            masks = masks_in_checkpoint(state)
            if not masks:
                raise ValueError(f"{OWNER}: masks_from {self.masks_from} holds no pruning masks")
            self.weights.set_masks(masks, self.masks_from)
            self.masks_applied = True
            if self.reinitialize:
                self._reinitialize()
        # Masks change only here and at prunings: the per-step log reads this, not the masks
        # (reading them costs a device sync per weight).
        self.current_sparsity = self.weights.sparsity()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.snapshot is None and trainer.global_step >= self.rewind_step:
            self._take_snapshot(pl_module)
        if self._round_ended(trainer, batch_idx):
            self._prune_and_rewind(trainer, pl_module)
        pl_module.log("pruning/sparsity", self.current_sparsity, on_step=True, on_epoch=False, batch_size=1)
        pl_module.log("pruning/round", float(self.round), on_step=True, on_epoch=False, batch_size=1)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._round_ended(trainer, None):
            self._prune_and_rewind(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.weights.record(checkpoint, pl_module)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        refuse_optimizer_state_of_untransformed_weights(checkpoint, pl_module, OWNER)

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "snapshot": self.snapshot, "generator": self.generator.get_state(),
                "masks_applied": self.masks_applied, "schedule": [self.rounds, self.sparsity, self.scope]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state.get("schedule", [])) != [self.rounds, self.sparsity, self.scope]:
            raise ValueError(f"{OWNER}: the checkpoint was pruned with (rounds, sparsity, scope) = {state.get('schedule')}, "
                             f"this run asks for {[self.rounds, self.sparsity, self.scope]}")
        self.round, self.snapshot = int(state["round"]), state["snapshot"]
        self.generator.set_state(state["generator"])
        self.masks_applied = bool(state.get("masks_applied", False))

    # ------------------------------------------------------------------ the work
    @torch.no_grad()
    def _take_snapshot(self, pl_module: L.LightningModule) -> None:
        self.snapshot = {name: p.detach().to("cpu", copy=True) for name, p in pl_module.named_parameters()}

    @torch.no_grad()
    def _prune_and_rewind(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.round += 1
        self.weights.prune_to(self.kept_after(self.round), self.scope)
        parameters = dict(pl_module.named_parameters())
        for name, value in self.snapshot.items():
            parameters[name].copy_(value.to(parameters[name].device))
        if self.reinitialize:
            self._reinitialize()
        else:
            self.weights.zero_pruned()
        self.current_sparsity = self.weights.sparsity()
        restart_optimization(trainer, schedule_step=self.rewind_step if self.schedule == "continue" else 0)
        self._log_layers(trainer)

    @torch.no_grad()
    def _reinitialize(self) -> None:
        """Fresh uniform values of each pruned weight's own scale (std of its current values)."""
        for _, weight, _ in self.weights.masks():
            bound = math.sqrt(3.0) * weight.detach().float().std().item()
            fresh = (torch.rand(weight.shape, generator=self.generator) * 2 - 1) * bound
            weight.copy_(fresh.to(weight.device, weight.dtype))
        self.weights.zero_pruned()

    def _log_layers(self, trainer: L.Trainer) -> None:
        metrics = {f"pruning/sparsity/{name}": value for name, value in self.weights.layer_sparsity().items()}
        metrics["pruning/sparsity"] = self.current_sparsity
        metrics["pruning/round"] = float(self.round)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
