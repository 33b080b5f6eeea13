"""A frozen teacher model held by a callback, outside the student.

Distillation and layer-wise transfer run a second model on every training batch. It must
never become part of the student: not in its state_dict (checkpoints stay the student's
size), not in its optimiser, not in its DDP wrapper (no gradient all-reduce of a model that
does not learn), not visible to another callback's name globs (QAT must not quantize the
teacher). So the teacher is held by the callback, a plain Python attribute of an object that
is not an nn.Module, and moved to the student's device and dtype when the fit starts. It is in
eval mode (no dropout) with ``requires_grad=False`` everywhere, and is called under
``torch.no_grad()``.

Loading without importing the student's package: ``loader`` names a callable by its dotted
path (``package.module.function`` or ``package.module.Class.method``, as a YAML value) that
takes the checkpoint path and returns an nn.Module. Without one, the student's own class is
asked: its ``from_checkpoint(path)`` classmethod if it has one (nmt_lightning's
TranslationModule does: safe loading, dense fp32 weights), else Lightning's
``load_from_checkpoint(path, weights_only=True)``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from torch import nn

__all__ = ["FrozenTeacher", "resolve_callable"]


def resolve_callable(dotted: str) -> Callable[..., Any]:
    """``package.module.attr[.attr]`` -> the object (the longest importable module prefix wins)."""
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            target: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                target = getattr(target, attribute)
        except AttributeError:
            break
        if callable(target):
            return target
        break
    raise ValueError(f"teacher loader '{dotted}' is not an importable callable (package.module.function)")


class FrozenTeacher:
    """Holds the teacher of one callback. Build it in ``__init__`` (validates the path), call
    ``load(student)`` from ``Callback.setup`` and ``attach(student)`` from ``on_fit_start``."""

    def __init__(self, checkpoint: str, loader: Optional[str] = None) -> None:
        if not isinstance(checkpoint, str) or not checkpoint:
            raise ValueError(f"teacher checkpoint must be a path, got {checkpoint!r}")
        self.checkpoint, self.loader = checkpoint, loader
        if loader is not None:
            resolve_callable(loader)  # fail at construction, not after hours of data loading
        self.module: Optional[nn.Module] = None

    def load(self, student: L.LightningModule) -> nn.Module:
        """Load (once) and freeze the teacher; on CPU until ``attach``."""
        if self.module is not None:
            return self.module
        path = Path(self.checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"teacher checkpoint {path}: no such file")
        if self.loader is not None:
            module = resolve_callable(self.loader)(str(path))
        elif hasattr(type(student), "from_checkpoint"):
            module = type(student).from_checkpoint(str(path))
        else:
            module = type(student).load_from_checkpoint(str(path), map_location="cpu", weights_only=True)
        if not isinstance(module, nn.Module):
            raise TypeError(f"teacher loader returned a {type(module).__name__}, not an nn.Module")
        if module is student or any(p is q for p in module.parameters() for q in student.parameters()):
            raise ValueError("the teacher shares parameters with the student; it must be a separate model")
        module.eval().requires_grad_(False)
        self.module = module
        return module

    def attach(self, student: L.LightningModule) -> nn.Module:
        """Move the teacher to the student's device (and floating dtype, for 16-true / bf16-true)."""
        module = self.load(student)
        dtype = next((p.dtype for p in student.parameters() if p.is_floating_point()), torch.float32)
        return module.to(device=student.device, dtype=dtype).eval()

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.module is None:
            raise RuntimeError("the teacher is not loaded yet (call load() from Callback.setup)")
        if self.module.training:  # someone called .train() on it: a teacher never runs dropout
            self.module.eval()
        return self.module(*args, **kwargs)
