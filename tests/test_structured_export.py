"""The export of a structurally pruned model: the pruned heads' and neurons' rows and columns
leave the file, the loaded model has the smaller matrices and computes what the masked model
computed in training; composed with QAT the int8 grid is the one trained."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from callbacks import QuantizationAwareTraining, StructuredPruning
from nmt_lightning.export import export_module, load_module
from nmt_lightning.translation_file import export_checkpoint, load_exported
from tests.callbacks.helpers import trainer
from tests.callbacks.test_structured_pruning import (HEAD_DIM, HEADS, NEURONS, WIDTH, AttentionBlock, Regression,
                                                     block_data)
from tests.conftest import tiny_module, tiny_trainer


def pruning() -> StructuredPruning:
    return StructuredPruning(prune_heads=0.5, prune_neurons=0.6, start_step=2, end_step=6, frequency=2)


def train(tmp_path: Path, callbacks: list, make: type = AttentionBlock, steps: int = 8) -> tuple[Regression, Path]:
    """``make()`` trained ``steps`` steps with ``callbacks``, in eval mode, and its checkpoint."""
    L.seed_everything(0)
    model = make()
    fit = trainer(tmp_path / "fit", callbacks, max_steps=steps)
    fit.fit(model, block_data(sentences=32))
    fit.save_checkpoint(tmp_path / "trained.ckpt")
    return model.eval(), tmp_path / "trained.ckpt"


def exported_and_loaded(tmp_path: Path, callbacks: list, make: type, steps: int) -> tuple[Regression, Regression]:
    """(the trained model, a fresh ``make()`` loaded from its export), after checking both compute alike
    (the same sums without the zero terms: float32 rounding apart)."""
    trained, checkpoint = train(tmp_path, callbacks, make, steps)
    export_module(checkpoint, make(), tmp_path / "pruned.safetensors")
    loaded = load_module(make(), tmp_path / "pruned.safetensors")
    x = torch.randn(3, 5, WIDTH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x), rtol=1e-5, atol=1e-5)
    return trained, loaded


def test_the_file_holds_the_smaller_matrices_and_computes_what_training_did(tmp_path: Path) -> None:
    trained, loaded = exported_and_loaded(tmp_path, [pruning()], AttentionBlock, steps=8)
    report = export_module(tmp_path / "trained.ckpt", AttentionBlock(), tmp_path / "again.safetensors")
    heads, neurons = HEADS // 2, round(NEURONS * 0.4)
    assert loaded.attention.heads == heads
    assert tuple(loaded.attention.q_proj.weight.shape) == (heads * HEAD_DIM, WIDTH)
    assert tuple(loaded.attention.out_proj.weight.shape) == (WIDTH, heads * HEAD_DIM)
    assert tuple(loaded.feed_forward.fc1.weight.shape) == (neurons, WIDTH)
    assert tuple(loaded.feed_forward.fc2.weight.shape) == (WIDTH, neurons)
    dense = (3 * WIDTH * WIDTH + 3 * WIDTH + WIDTH * WIDTH + WIDTH + 2 * WIDTH * NEURONS + NEURONS + WIDTH) * 4
    kept = (4 * WIDTH * heads * HEAD_DIM + 3 * heads * HEAD_DIM + WIDTH + 2 * WIDTH * neurons + neurons + WIDTH) * 4
    assert report.weight_bytes_fp32 < dense and sum(p.numel() for p in loaded.parameters()) * 4 == kept


def test_composed_with_qat_the_cut_weights_are_the_trained_grid(tmp_path: Path) -> None:
    """QAT's weight scale comes from max|W| of the masked weight, which is max|W| of the cut one:
    the decoded values of every kept row and column are the fake-quantized ones of training."""
    trained, checkpoint = train(tmp_path, [pruning(), QuantizationAwareTraining(include=["*"])])
    export_module(checkpoint, AttentionBlock(), tmp_path / "pruned_int8.safetensors")
    plain = load_module(AttentionBlock(), tmp_path / "pruned_int8.safetensors", runtime_layers=False)
    groups = {group.name: group.keep.bool() for group in trained.trainer.callbacks[0].groups}
    heads = groups["attention"].repeat_interleave(HEAD_DIM)
    neurons = groups["feed_forward"]
    for name, rows, columns in (("attention.q_proj", heads, None), ("attention.out_proj", None, heads),
                                ("feed_forward.fc1", neurons, None), ("feed_forward.fc2", None, neurons)):
        expected = trained.get_submodule(name).weight.detach()
        expected = expected[rows] if rows is not None else expected[:, columns]
        torch.testing.assert_close(plain.get_submodule(name).weight, expected, rtol=2.4e-7, atol=0)


def test_a_translation_model_exports_cut_and_loads_into_its_own_class(prepared_dir: Path, tmp_path: Path) -> None:
    L.seed_everything(0)
    module, datamodule = tiny_module(prepared_dir, heads=4)
    fit = tiny_trainer(tmp_path, callbacks=[pruning()], max_steps=8)
    fit.fit(module, datamodule=datamodule)
    fit.save_checkpoint(tmp_path / "model.ckpt")
    export_checkpoint(tmp_path / "model.ckpt", tmp_path / "model.safetensors")
    assert export_checkpoint(tmp_path / "model.ckpt", tmp_path / "model_int8.safetensors", "int8").quantization == "int8"
    loaded = load_exported(tmp_path / "model.safetensors")
    neurons = 64 - round(0.6 * 64)
    for layer in (*loaded.model.encoder_layers, *loaded.model.decoder_layers):
        assert layer.self_attn.heads == 2 and tuple(layer.self_attn.q_proj.weight.shape) == (16, 32)
        assert tuple(layer.ffn.fc1.weight.shape) == (neurons, 32) and tuple(layer.ffn.fc2.weight.shape) == (32, neurons)
    source = torch.randint(4, 60, (3, 7), generator=torch.Generator().manual_seed(2))
    target = torch.randint(4, 60, (3, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(source, target), module.eval().model(source, target), rtol=1e-5, atol=1e-5)
    with open(tmp_path / "model.safetensors", "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    structure = json.loads(header["__metadata__"]["structure"])
    assert structure["encoder_layers.0.self_attn"]["units"] == 2 and structure["decoder_layers.0.ffn"]["units"] == neurons


class TorchEncoder(Regression):
    """A model of torch's own layers: nn.TransformerEncoderLayer (nn.MultiheadAttention, and a
    feed-forward block named linear1 / linear2)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(WIDTH, 2, dim_feedforward=NEURONS, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def test_torch_transformer_layers_lose_neurons_named_explicitly(tmp_path: Path) -> None:
    """feed_forward_layers naming torch's own children finds what the defaults find; the heads of
    its nn.MultiheadAttention: tests/callbacks/test_structured_pruning_torch_layers.py."""
    pruning = StructuredPruning(prune_heads=0.0, prune_neurons=0.5, start_step=2, end_step=4, frequency=2,
                                feed_forward_layers=["linear1", "linear2"])
    _, loaded = exported_and_loaded(tmp_path, [pruning], TorchEncoder, steps=6)
    assert tuple(loaded.layer.linear1.weight.shape) == (NEURONS // 2, WIDTH)


class SequentialFeedForward(Regression):
    """A feed-forward block as nn.Sequential(Linear, ReLU, Linear): its layers are children "0" and "2"."""

    def __init__(self) -> None:
        super().__init__()
        self.ffn = torch.nn.Sequential(torch.nn.Linear(WIDTH, NEURONS), torch.nn.ReLU(), torch.nn.Linear(NEURONS, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


def test_a_sequential_feed_forward_block_is_cut_by_index(tmp_path: Path) -> None:
    pruning = StructuredPruning(prune_heads=0.0, prune_neurons=0.5, importance="magnitude", start_step=0, end_step=0,
                                feed_forward_layers=["0", "2"])
    _, loaded = exported_and_loaded(tmp_path, [pruning], SequentialFeedForward, steps=3)
    assert tuple(loaded.ffn[0].weight.shape) == (NEURONS // 2, WIDTH)
    assert tuple(loaded.ffn[2].weight.shape) == (WIDTH, NEURONS // 2)


def test_composed_with_magnitude_pruning_the_sparse_export_is_cut_too(tmp_path: Path) -> None:
    """The sparse codec's mask is cut with its weight: the bitmask and survivors of the smaller
    matrix, the same outputs."""
    from callbacks import MagnitudePruning

    callbacks = [pruning(), MagnitudePruning(sparsity=0.5, start_step=1, end_step=4, frequency=1, include=["*"])]
    _, loaded = exported_and_loaded(tmp_path, callbacks, AttentionBlock, steps=8)
    assert tuple(loaded.feed_forward.fc1.weight.shape) == (round(NEURONS * 0.4), WIDTH)
    assert 0.3 < float((loaded.feed_forward.fc1.weight == 0).float().mean()) < 0.7
