"""Restarting optimisation in the middle of a fit, and freezing parameters for a stage.

Lottery-ticket rewinding, iPQ stages and layer-by-layer transfer each start a new stage of
training: a fresh optimiser state (Adam's moments of the previous stage mean nothing for the
rewound or newly quantized weights), the learning-rate schedule from its start (its warm-up
again), and some parameters held fixed.

``restart_optimization(trainer)`` builds new optimisers and schedulers from the module's own
``configure_optimizers`` through the trainer's strategy (``strategy.setup_optimizers``, as
Lightning does at the start of a fit), so DDP, the precision plugin's gradient scaler and
every optimiser-reading part of Lightning (checkpointing, LearningRateMonitor) see them.
Call it at an update boundary: from ``on_train_batch_start`` when no gradient is being
accumulated, or ``on_train_epoch_start``. The optimiser state saved in a checkpoint after a
restart is the new one, so a resumed run continues the stage exactly.

Freezing (``ParameterFreezer``): frozen parameters keep ``requires_grad`` and stay in the
optimiser; their gradients are dropped just before each optimiser step, so the optimiser
(Adam, SGD, ...) skips them entirely: no update, no weight decay, no moment. This works the
same under DDP (whose reducer expects a gradient for every parameter it was built with, so
switching ``requires_grad`` off mid-fit would break it), keeps the optimiser's parameter
groups unchanged (a checkpoint of a frozen stage loads into a fresh optimiser), and costs
only the backward computation of their gradients. Under DDP, a stage whose loss does not
reach some parameters at all (layer-wise transfer of a lower layer) needs
``strategy="ddp_find_unused_parameters_true"``.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable, Sequence
import warnings

import lightning as L
from torch import nn

from compression_contract.names import logical_name

__all__ = ["restart_optimization", "matching_parameters", "ParameterFreezer"]


def restart_optimization(trainer: L.Trainer, schedule_step: int = 0) -> None:
    """Replace the optimisers and learning-rate schedulers by fresh ones from the LightningModule's
    ``configure_optimizers`` (new state), through the trainer's strategy. The schedules start at
    ``schedule_step``: 0 is their start (the warm-up again); k continues them from step k, as a
    late-rewound lottery ticket does (Frankle et al. 2020 rewind the weights *and* the schedule
    to step k). Each new step-interval scheduler is stepped ``schedule_step`` times, which is
    exact for any scheduler, chained ones included; epoch-interval schedulers start afresh."""
    if isinstance(schedule_step, bool) or not isinstance(schedule_step, int) or schedule_step < 0:
        raise ValueError(f"restart_optimization: schedule_step must be an integer >= 0, got {schedule_step!r}")
    strategy = trainer.strategy
    for optimizer in strategy.optimizers:
        optimizer.zero_grad(set_to_none=True)
    strategy.setup_optimizers(trainer)
    if schedule_step == 0:
        return
    with warnings.catch_warnings():
        # torch warns that the scheduler steps before its optimiser: here that is the point.
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step\\(\\)", category=UserWarning)
        for config in trainer.lr_scheduler_configs:
            if config.interval == "step":
                for _ in range(schedule_step):
                    config.scheduler.step()


def matching_parameters(module: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names (as ``module.named_parameters()`` gives them) matching any of the globs, matched by
    the plain name (``hidden.weight``) also when a weight transform sits on the tensor."""
    return [name for name, _ in module.named_parameters()
            if any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(logical_name(name), p) for p in patterns)]


class ParameterFreezer:
    """The set of parameter names a callback holds fixed; its state goes in the callback's state_dict."""

    def __init__(self) -> None:
        self.frozen: list[str] = []

    def freeze(self, module: nn.Module, patterns: Iterable[str]) -> list[str]:
        """Hold the parameters matching ``patterns`` fixed from now on (replaces the previous set)."""
        patterns = list(patterns)
        names = matching_parameters(module, patterns)
        if patterns and not names:
            raise ValueError(f"no parameter matches {patterns}")
        self.frozen = names
        return names

    def release(self) -> None:
        self.frozen = []

    def drop_gradients(self, module: nn.Module) -> None:
        """Call from ``on_before_optimizer_step``: the frozen parameters get no update."""
        if not self.frozen:
            return
        parameters = dict(module.named_parameters())
        for name in self.frozen:
            parameters[name].grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": list(self.frozen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frozen = list(state.get("frozen", []))
