"""A frozen teacher model held by a callback, outside the student.

Distillation and layer-wise transfer run a second model on every training batch. It must
never become part of the student: not in its state_dict (checkpoints stay the student's
size), not in its optimiser, not in its DDP wrapper (no gradient all-reduce of a model that
does not learn), not visible to another callback's name globs (QAT must not quantize the
teacher). So the teacher is held by the callback, a plain Python attribute of an object that
is not an nn.Module, and moved to the student's device and dtype when the fit starts. It is in
eval mode (no dropout) with ``requires_grad=False`` everywhere, and is called under
``torch.no_grad()``.

Bad teachers are refused in one line naming the callback: a path that is no file (at
construction), a file ``torch.save`` did not write, one holding Python objects that unpickling
would run, a loader that fails (its error's first line), and, before the teacher's embedding
tables are read, a batch holding token ids beyond them (a teacher with a smaller vocabulary
would otherwise fail with an IndexError deep inside its forward).

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

from callbacks._arguments import existing_file, shown
from compression_contract.checkpoints import checkpoint_problem, describe_load_error

__all__ = ["FrozenTeacher", "resolve_callable"]


def resolve_callable(dotted: str, owner: str = "resolve_callable") -> Callable[..., Any]:
    """``package.module.attr[.attr]`` -> the object (the longest importable module prefix wins)."""
    if not isinstance(dotted, str) or not dotted:
        raise ValueError(f"{owner}: teacher_loader must be the dotted path of a callable, got {shown(dotted)}")
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
    raise ValueError(f"{owner}: teacher_loader '{dotted}' is not an importable callable (package.module.function)")


def _vocabulary_guard(owner: str, name: str, table: nn.Embedding) -> Callable[..., None]:
    """A forward pre-hook of the teacher's embedding ``name``: token ids beyond its table are refused."""
    def check(module: nn.Module, inputs: tuple) -> None:
        ids = inputs[0]
        if isinstance(ids, torch.Tensor) and ids.numel() and not ids.is_floating_point():
            largest = int(ids.max())
            if largest >= table.num_embeddings:
                raise ValueError(f"{owner}: the batch holds token id {largest} but the teacher's embedding {name} has "
                                 f"{table.num_embeddings} entries: teacher and student must share the vocabulary")
    return check


class FrozenTeacher:
    """Holds the teacher of one callback. Build it in ``__init__`` (checks the path and the
    loader), call ``load(student)`` from ``Callback.setup`` and ``attach(student)`` from
    ``on_fit_start``. ``owner`` names the callback in every error."""

    def __init__(self, checkpoint: str, loader: Optional[str] = None, owner: str = "FrozenTeacher") -> None:
        self.owner = owner
        self.checkpoint = existing_file(owner, "teacher", checkpoint)
        self.loader = loader
        if loader is not None:
            resolve_callable(loader, owner)  # fail at construction, not after hours of data loading
        else:  # the default loaders read what torch.save wrote; a loader of its own may read anything
            problem = checkpoint_problem(Path(self.checkpoint))
            if problem is not None:
                raise ValueError(f"{owner}: teacher {self.checkpoint} is not a checkpoint: {problem}")
        self.module: Optional[nn.Module] = None

    def load(self, student: L.LightningModule) -> nn.Module:
        """Load (once) and freeze the teacher; on CPU until ``attach``."""
        if self.module is not None:
            return self.module
        path = Path(self.checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"{self.owner}: teacher {path}: no such file (any more)")
        if self.loader is not None:
            how, load = f"the loader {self.loader}", lambda: resolve_callable(self.loader, self.owner)(str(path))
        elif hasattr(type(student), "from_checkpoint"):
            how, load = f"{type(student).__name__}.from_checkpoint", lambda: type(student).from_checkpoint(str(path))
        else:
            how = f"{type(student).__name__}.load_from_checkpoint"
            load = lambda: type(student).load_from_checkpoint(str(path), map_location="cpu", weights_only=True)  # noqa: E731
        try:
            module = load()
        except Exception as error:  # a foreign, truncated or unsafe file: one line, naming it
            raise ValueError(f"{self.owner}: teacher {path} could not be loaded by {how}: {describe_load_error(error)}") from None
        if not isinstance(module, nn.Module):
            raise TypeError(f"{self.owner}: {how} returned a {type(module).__name__} for the teacher, not an nn.Module")
        if module is student or any(p is q for p in module.parameters() for q in student.parameters()):
            raise ValueError(f"{self.owner}: the teacher shares parameters with the student; it must be a separate model")
        module.eval().requires_grad_(False)
        for name, table in module.named_modules():
            if isinstance(table, nn.Embedding):
                table.register_forward_pre_hook(_vocabulary_guard(self.owner, name, table))
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
            raise RuntimeError(f"{self.owner}: the teacher is not loaded yet (call load() from Callback.setup)")
        if self.module.training:  # someone called .train() on it: a teacher never runs dropout
            self.module.eval()
        return self.module(*args, **kwargs)
