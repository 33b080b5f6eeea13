"""``ModelCheckpoint`` whose ``last.ckpt`` is always the model at the end of training.

Lightning's (2.6) writes ``last.ckpt`` when it validates or ends an epoch, and at the end of
training only if it has written nothing before. A run that stops at ``max_steps`` in the
middle of an epoch without validating there therefore keeps the ``last.ckpt`` of the previous
epoch end: the distillation teacher's 2000-step run left a 1908-step one (and a resume from it
redoes the last 92 steps). This subclass also writes it when training ends after the last save.

Lightning also writes ``last.ckpt`` at an epoch end or a validation only when it saved a top-k
checkpoint there, so with ``save_top_k: 0`` (the recipes that keep only the last model) it
wrote none before the end of training and an interrupted run started again from step 0. Here
every save trigger writes it, once per step.

Lightning also keeps a ``last.ckpt`` it did not write itself (a rerun in the same directory, or
a run directory copied elsewhere and resumed there) and writes ``last-v1.ckpt`` beside it, so
whatever reads ``last.ckpt`` (the recipes, the benchmarks, ``export``) got the old model: a
copied 4,280-step student resumed to 6,400 steps left its 6,400-step model in ``last-v1.ckpt``.
Here ``last.ckpt`` is always replaced (so two of these callbacks with ``save_last`` need two
directories).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

__all__ = ["ModelCheckpoint"]


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ModelCheckpoint (same arguments); with ``save_last``, ``last.ckpt`` holds the final step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._last_written_at: int | None = None  # global step of the last write of last.ckpt

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        if self.save_top_k == 0:  # nothing saved above, so Lightning would skip last.ckpt
            self._save_last_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        if not self.save_last or self._last_written_at == trainer.global_step:
            return  # written at this step already (Lightning calls it after the top-k save too)
        # Lightning's version counter stops at the file it last wrote: name last.ckpt as that file
        # so an old one is overwritten instead of kept beside a last-v1.ckpt.
        self.last_model_path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_written_at = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        unsaved = self._last_global_step_saved != trainer.global_step
        if self.save_last and unsaved and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
