"""Test callbacks built on the shared seams: a staged run (restart + freeze) and a teacher user."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch

from callbacks._optimization import ParameterFreezer, restart_optimization
from callbacks._teacher import FrozenTeacher
from tests.callbacks.classifier import BagOfWordsClassifier


class WarmupClassifier(BagOfWordsClassifier):
    """The classifier with Adam and a 4-step linear warm-up (a schedule a restart must begin again)."""

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class StagedTraining(L.Callback):
    """At global step ``restart_at``: freeze the parameters matching ``freeze`` and restart the
    optimiser and schedule (what rewinding, iPQ stages and layer-wise transfer do); the schedule
    starts again at ``schedule_step`` (0: its start)."""

    def __init__(self, restart_at: int, freeze: tuple[str, ...] = ("hidden.*",), schedule_step: int = 0) -> None:
        self.restart_at, self.patterns, self.schedule_step = restart_at, freeze, schedule_step
        self.freezer = ParameterFreezer()
        self.stage = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.stage == 0 and trainer.global_step >= self.restart_at:
            self.freezer.freeze(pl_module, self.patterns)
            restart_optimization(trainer, self.schedule_step)
            self.stage = 1

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self.freezer.drop_gradients(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, **self.freezer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = state["stage"]
        self.freezer.load_state_dict(state)


class TeacherOutputs(L.Callback):
    """Runs a frozen teacher on every training batch and keeps what it saw."""

    def __init__(self, checkpoint: str, loader: Optional[str] = None) -> None:
        self.teacher = FrozenTeacher(checkpoint, loader)
        self.outputs: list[torch.Tensor] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.teacher.load(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.teacher.attach(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.outputs.append(self.teacher(batch[0]))
