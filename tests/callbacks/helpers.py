"""Trainers and comparisons shared by the callback tests."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn


def trainer(root: Path, callbacks: list, **overrides) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, max_steps=16, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                   limit_val_batches=0, num_sanity_val_steps=0, deterministic=True)
    options.update(overrides)
    return L.Trainer(callbacks=callbacks, **options)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def resumed_and_uninterrupted(root: Path, make_model: Callable[[], L.LightningModule], make_callbacks: Callable[[], list],
                              data: Callable, stop: int, total: int, **trainer_options) -> tuple[dict, dict]:
    """(state after ``total`` steps straight, state after ``stop`` steps + checkpoint + resume to ``total``).

    The checkpoint is the one the ordinary ModelCheckpoint writes; the resumed model starts
    from fresh weights, so everything must come from the checkpoint."""
    L.seed_everything(0)
    straight = make_model()
    trainer(root / "a", make_callbacks(), max_steps=total, **trainer_options).fit(straight, data())
    L.seed_everything(0)
    first = make_model()
    saver = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=stop, save_top_k=-1, filename="mid")
    trainer(root / "b", [*make_callbacks(), saver], max_steps=stop, enable_checkpointing=True,
            **trainer_options).fit(first, data())
    L.seed_everything(1)  # other random numbers: the checkpoint must restore what matters
    resumed = make_model()
    trainer(root / "c", make_callbacks(), max_steps=total, **trainer_options).fit(
        resumed, data(), ckpt_path=root / "ckpt" / "mid.ckpt")
    return state(straight), state(resumed)


def assert_same_state(expected: dict, actual: dict, tolerance: float = 1e-6) -> None:
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=tolerance, atol=tolerance, msg=name)


def tiny_loss_context(**fields: object) -> SimpleNamespace:
    """A translation loss context of a module that is not ours, as a plain namespace: a 1 x 3
    source, 2 target positions, 5 words (``batch``, ``logits``), plus ``fields``."""
    batch = {"source": torch.ones(1, 3, dtype=torch.long), "decoder_input": torch.ones(1, 2, dtype=torch.long)}
    return SimpleNamespace(batch=batch, logits=torch.zeros(1, 2, 5), **fields)


def context_without_a_recorder(features: object) -> SimpleNamespace:
    """A tiny loss context whose features cannot record per-layer states: none (``features``
    None) or features of another kind."""
    return tiny_loss_context(features=None if features is None else SimpleNamespace(encoder_states=[]))


class TeacherWithLogits(nn.Module):
    """A teacher answering ``output.logits`` (as Hugging Face models do) instead of plain logits,
    its forward calls counted."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, *inputs):
        self.calls += 1
        return SimpleNamespace(logits=self.inner(*inputs))


def replayed_head_importances(root: Path, make_model: Callable[[], L.LightningModule], data: Callable,
                              gate_gradients: Callable, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the Taylor head importances StructuredPruning gathered over two SGD steps (lr 0.05) of a
    ``make_model()``, the same from gates): a copy replays the steps, each batch's
    ``gate_gradients(copy, *batch)`` (B, heads) summed in absolute value over its sentences."""
    from callbacks import StructuredPruning

    torch.manual_seed(0)
    model, reference = make_model(), make_model()
    reference.load_state_dict(model.state_dict())
    callback = StructuredPruning(prune_heads=0.5, prune_neurons=0.0, start_step=10, end_step=20, frequency=5)
    trainer(root, [callback], max_steps=2).fit(model, data())
    expected = torch.zeros(heads, dtype=torch.float64)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    for batch in data():  # the same two steps, the same updates
        optimizer.zero_grad()
        expected += gate_gradients(reference, *batch).abs().sum(0).double()
        optimizer.step()
    (found,) = callback.unit_scores()
    return found, expected
