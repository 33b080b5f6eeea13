"""``ModelCheckpoint`` whose ``last.ckpt`` is always the model at the end of training.

Lightning's (2.6) writes ``last.ckpt`` when it validates or ends an epoch, and at the end of
training only if it has written nothing before. A run that stops at ``max_steps`` in the
middle of an epoch without validating there therefore keeps the ``last.ckpt`` of the previous
epoch end: the distillation teacher's 2000-step run left a 1908-step one (and a resume from it
redoes the last 92 steps). This subclass also writes it when training ends after the last save.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

__all__ = ["ModelCheckpoint"]


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ModelCheckpoint (same arguments); with ``save_last``, ``last.ckpt`` holds the final step."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        unsaved = self._last_global_step_saved != trainer.global_step
        if self.save_last and unsaved and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
