"""``PlateauStopping``: train until validation BLEU stops rising, as a converged reference.

The seed's papers compress converged models, so the study's base and teacher train until
their validation score is on a plateau. The rule, with ``window`` = 0.25 by default:

    at step t (>= ``min_steps``), gain = mean(scores validated in (0.75 t, t])
                                       - mean(scores validated in (0.5 t, 0.75 t])
    stop when gain < ``min_gain`` (0.3 BLEU), each window holding >= ``min_validations`` scores.

That is "less than 0.3 BLEU gained over the last quarter of the steps", measured between the
means of two windows rather than two single validations: greedy BLEU on a few hundred
sentences moves by half a point from one validation to the next, so one noisy high or low
score must not end (or prolong) a run. Lightning's ``EarlyStopping`` counts validations
without improvement instead, which stops an inverse-square-root schedule too early (its gains
are small per validation but add up) and does not say how much was still being gained.

The history of (step, score) is the callback's state, so a resumed run decides as an
uninterrupted one. With ``record``, the decision and the whole history are written as JSON
when training stops on the plateau (what a study reads to know the run is finished).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import fmean
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback

__all__ = ["PlateauStopping", "plateau_gain"]


def plateau_gain(history: list[tuple[int, float]], window: float = 0.25,
                 min_validations: int = 2) -> Optional[float]:
    """Mean score of the last ``window`` of the steps minus that of the window before it
    (``history``: (step, score) in step order); None while either window has fewer than
    ``min_validations`` scores."""
    if not history:
        return None
    last = history[-1][0]
    recent = [score for step, score in history if step > (1 - window) * last]
    before = [score for step, score in history if (1 - 2 * window) * last < step <= (1 - window) * last]
    if len(recent) < min_validations or len(before) < min_validations:
        return None
    return fmean(recent) - fmean(before)


class PlateauStopping(Callback):
    """Stop when ``monitor`` gained less than ``min_gain`` over the last ``window`` of the steps.

    Args:
        monitor: the logged validation metric (higher is better), ``val/bleu`` by default.
        min_gain: the smallest gain over the last window that keeps training (BLEU points).
        window: the fraction of the steps so far that makes up "the last window", in (0, 0.5].
        min_steps: never stop before this step (the warm-up and the steep start are not a plateau).
        min_validations: scores each window must hold before the gain is trusted.
        record: a JSON file written when training stops on the plateau (step, gain, history).
    """

    def __init__(self, monitor: str = "val/bleu", min_gain: float = 0.3, window: float = 0.25, min_steps: int = 2000,
                 min_validations: int = 2, record: Optional[str] = None) -> None:
        super().__init__()
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"PlateauStopping: monitor must be a metric name, got {monitor!r}")
        for name, value in (("min_gain", min_gain), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"PlateauStopping: {name} must be a finite number, got {value!r}")
        if not 0 < window <= 0.5:
            raise ValueError(f"PlateauStopping: window must be in (0, 0.5], got {window}")
        for name, value, least in (("min_steps", min_steps, 0), ("min_validations", min_validations, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"PlateauStopping: {name} must be an integer >= {least}, got {value!r}")
        self.monitor, self.min_gain, self.window = monitor, float(min_gain), float(window)
        self.min_steps, self.min_validations = min_steps, min_validations
        if record is not None and not isinstance(record, (str, Path)):
            raise ValueError(f"PlateauStopping: record must be the path of a JSON file to write, got {record!r}")
        self.record = Path(record) if record else None
        self.history: list[tuple[int, float]] = []
        self.stopped_at: Optional[int] = None

    @property
    def state_key(self) -> str:
        return f"PlateauStopping[{self.monitor}]"

    def gain(self) -> Optional[float]:
        return plateau_gain(self.history, self.window, self.min_validations)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        step = trainer.global_step
        if self.history and self.history[-1][0] == step:
            return  # validated twice at one step (an epoch end right after max_steps): one score per step
        self.history.append((step, float(trainer.callback_metrics[self.monitor])))
        gain = self.gain()
        if step >= self.min_steps and gain is not None and gain < self.min_gain:
            self.stopped_at = step
            trainer.should_stop = True
            if trainer.is_global_zero:
                print(f"PlateauStopping: {self.monitor} gained {gain:.2f} over the last {self.window:.0%} of "
                      f"{step} steps (< {self.min_gain}): stopping", flush=True)
                if self.record is not None:
                    self.record.parent.mkdir(parents=True, exist_ok=True)
                    self.record.write_text(json.dumps(self.summary(), indent=1) + "\n", encoding="utf-8")

    def summary(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "min_gain": self.min_gain, "window": self.window,
                "stopped_at": self.stopped_at, "gain": self.gain(), "history": [list(h) for h in self.history]}

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history], "stopped_at": self.stopped_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(step), float(score)) for step, score in state_dict.get("history", [])]
        self.stopped_at = state_dict.get("stopped_at")
