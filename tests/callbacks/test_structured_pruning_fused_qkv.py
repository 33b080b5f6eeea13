"""StructuredPruning on an attention whose q, k and v come from one nn.Linear (timm's ViT
attention: ``qkv`` and ``proj``; nanoGPT's: ``c_attn`` and ``c_proj``).

A head owns ``head_dim`` rows in each of the three blocks of the fused weight. The checks are
made against gates multiplying each head's output (written here, not taken from the callback):
the Taylor importance is the gates' gradient, a masked head computes as a gate of 0, and a wrong
layout (the head's rows taken as one run of 3 * head_dim rows) answers differently.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from callbacks import StructuredPruning
from callbacks.structured_pruning import find_unit_groups
from nmt_lightning.export import export_module, load_module
from tests.callbacks.classifier import ResumableLoader
from tests.callbacks.helpers import (assert_same_state, replayed_head_importances, resumed_and_uninterrupted,
                                     trainer)

WIDTH, HEADS, NEURONS = 12, 4, 10
HEAD_DIM = WIDTH // HEADS


class FusedAttention(nn.Module):
    """timm's layout: ``qkv`` (3 * heads * head_dim outputs: all q rows, then all k, then all v)
    reshaped by ``num_heads`` and ``head_dim``, so a cut model keeps working."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim = HEADS, HEAD_DIM
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        heads = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim)
        return self.proj(heads.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))


class FusedBlock(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.attention = FusedAttention()
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(WIDTH, NEURONS), nn.GELU(), nn.Linear(NEURONS, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(x)
        return h + self.mlp(h)

    def training_step(self, batch, batch_index):
        inputs, targets = batch
        return F.mse_loss(self(inputs), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data(sentences: int = 8, batch_size: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(3)
    inputs, targets = torch.randn(sentences, 5, WIDTH, generator=generator), torch.randn(sentences, 5, WIDTH,
                                                                                           generator=generator)
    return DataLoader(TensorDataset(inputs, targets), batch_size=batch_size)


def gated(model: FusedBlock, gates: torch.Tensor):
    """A forward pre-hook handle on ``proj`` multiplying each head's output by ``gates`` (B, heads)."""
    def gate(module, args):
        return ((args[0].unflatten(-1, (HEADS, HEAD_DIM)) * gates[:, None, :, None]).flatten(-2),)
    return model.attention.proj.register_forward_pre_hook(gate)


def gate_gradients(model: FusedBlock, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """dL/d gate of every (sentence, head), gates of ones on each head's output; the parameters'
    gradients are left in place."""
    gates = torch.ones(inputs.shape[0], HEADS, requires_grad=True)
    handle = gated(model, gates)
    F.mse_loss(model(inputs), targets).backward()
    handle.remove()
    return gates.grad


def test_taylor_importance_is_the_gate_gradient_per_sentence(tmp_path: Path) -> None:
    found, expected = replayed_head_importances(tmp_path, FusedBlock, data, gate_gradients, HEADS)
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-7)  # float32 sums in another order


def test_a_masked_head_computes_as_a_gate_of_zero_and_its_magnitude_spans_three_blocks() -> None:
    torch.manual_seed(0)
    model = FusedBlock()
    callback = StructuredPruning(prune_heads=0.5, prune_neurons=0.0, importance="magnitude", start_step=0, end_step=0)
    callback.setup(None, model, "fit")
    (group,) = callback.groups
    assert (group.rows, group.columns, group.row_blocks, group.count_attribute) == (("qkv",), ("proj",), 3, "num_heads")
    weight, bias = model.attention.qkv.weight.detach(), model.attention.qkv.bias.detach()
    out = model.attention.proj.weight.detach()
    expected = []
    for head in range(HEADS):
        rows = torch.cat([block * WIDTH + head * HEAD_DIM + torch.arange(HEAD_DIM) for block in range(3)])
        columns = head * HEAD_DIM + torch.arange(HEAD_DIM)
        expected.append(weight[rows].double().pow(2).sum() + bias[rows].double().pow(2).sum()
                        + out[:, columns].double().pow(2).sum())
    torch.testing.assert_close(group.magnitudes(), torch.stack(expected).sqrt())
    x = torch.randn(3, 5, WIDTH)
    keep = torch.tensor([0.0, 1.0, 1.0, 0.0])
    with torch.no_grad():
        handle = gated(model, keep.expand(3, HEADS))
        expected_output = model(x)
        handle.remove()
        group.set_keep(keep)
        torch.testing.assert_close(model(x), expected_output, rtol=1e-5, atol=1e-6)


def test_the_export_cuts_each_block_and_computes_what_training_did(tmp_path: Path) -> None:
    L.seed_everything(0)
    trained = FusedBlock()
    fit = trainer(tmp_path / "fit", [StructuredPruning(start_step=2, end_step=6, frequency=2)], max_steps=8)
    fit.fit(trained, data(sentences=32))
    fit.save_checkpoint(tmp_path / "trained.ckpt")
    export_module(tmp_path / "trained.ckpt", FusedBlock(), tmp_path / "pruned.safetensors")
    loaded = load_module(FusedBlock(), tmp_path / "pruned.safetensors")
    kept = HEADS // 2
    assert loaded.attention.num_heads == kept
    assert tuple(loaded.attention.qkv.weight.shape) == (3 * kept * HEAD_DIM, WIDTH)
    assert tuple(loaded.attention.proj.weight.shape) == (WIDTH, kept * HEAD_DIM)
    assert tuple(loaded.mlp.fc1.weight.shape) == (NEURONS // 2, WIDTH)
    x = torch.randn(3, 5, WIDTH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the same sums without the zero terms: float32 rounding apart
        torch.testing.assert_close(loaded(x), trained.eval()(x), rtol=1e-5, atol=1e-5)


def test_a_resume_between_two_prunings_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    def make() -> FusedBlock:
        torch.manual_seed(0)
        return FusedBlock()

    def resumable() -> DataLoader:
        return ResumableLoader(data(sentences=40, batch_size=4).dataset, batch_size=4)

    straight, resumed = resumed_and_uninterrupted(
        tmp_path, make, lambda: [StructuredPruning(start_step=2, end_step=6, frequency=2)], resumable, stop=3, total=8)
    assert_same_state(straight, resumed)
    assert straight["attention.qkv.parametrizations.weight.0.keep"].sum() == HEADS // 2


def test_nanogpt_names_are_found_and_a_grouped_fused_projection_is_refused() -> None:
    attention = nn.Module()
    attention.c_attn, attention.c_proj, attention.n_head = nn.Linear(8, 24), nn.Linear(8, 8), 2
    (group,) = find_unit_groups(nn.ModuleDict({"attn": attention}), ["*"], [], ["heads"])
    assert (group.name, group.rows, group.columns, group.width, group.row_blocks) == ("attn", ("c_attn",), ("c_proj",),
                                                                                      4, 3)
    grouped = nn.Module()
    grouped.qkv, grouped.proj, grouped.num_heads = nn.Linear(8, 16), nn.Linear(8, 8), 2  # keys/values of one head
    with pytest.raises(ValueError, match=r"^StructuredPruning: attn has a q/k/v projection of 16 outputs"):
        find_unit_groups(nn.ModuleDict({"attn": grouped}), ["*"], [], ["heads"])
