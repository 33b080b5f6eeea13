import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from callbacks import QuantizationAwareTraining
from callbacks.quantization_aware_training import QATEmbedding, QATLinear, fake_quantize, weight_absmax
from tests.callbacks.classifier import BagOfWordsClassifier, classification_data

SCRIPTS = Path(__file__).parents[1] / "scripts"


def trainer(root: Path, callbacks: list, **overrides) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, max_steps=16, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                   limit_val_batches=0, num_sanity_val_steps=0, deterministic=True)
    options.update(overrides)
    return L.Trainer(callbacks=callbacks, **options)


@pytest.mark.parametrize("bits", [8, 4])
def test_values_lie_on_the_integer_grid(bits: int) -> None:
    x = torch.randn(50, 20) * 3
    absmax = x.abs().max()
    limit = 2 ** (bits - 1) - 1
    scaled = fake_quantize(x, absmax, bits) * (limit / absmax)
    torch.testing.assert_close(scaled, scaled.round(), rtol=0, atol=1e-4)
    assert scaled.abs().max() <= limit + 1e-4
    assert len(torch.unique(scaled.round())) <= 2 * limit + 1
    # A smaller range clips: nothing beyond +-M.
    clipped = fake_quantize(x, absmax / 4, bits) * (limit / (absmax / 4))
    assert clipped.abs().max() <= limit + 1e-4


def test_straight_through_estimator_passes_gradients() -> None:
    x = torch.randn(10, requires_grad=True)
    (fake_quantize(x, x.detach().abs().max(), 8) * torch.arange(10.0)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(10.0))


def test_per_channel_scales() -> None:
    weight = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    torch.testing.assert_close(weight_absmax(weight, per_channel=True), torch.tensor([[2.0], [0.5]]))
    assert weight_absmax(weight, per_channel=False) == 2.0


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 0}, r"bits must be an integer in \[2, 8\], got 0"),
    ({"bits": 1}, r"bits must be an integer in \[2, 8\], got 1"),
    ({"bits": 9}, r"bits must be an integer in \[2, 8\], got 9"),
    ({"ema_decay": 1.0}, r"ema_decay must be in \(0, 1\)"),
    ({"start_step": -1}, "start_step must be >= 0"),
    ({"include": "*"}, "lists of globs"),
    ({"include": []}, "at least one glob"),
])
def test_misconfiguration(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**kwargs)


def test_empty_selection_is_an_error(tmp_path: Path) -> None:
    callback = QuantizationAwareTraining(include=["encoder.*"])
    with pytest.raises(ValueError, match=r"selected no nn.Linear/nn.Embedding module with include=\['encoder.\*'\]"):
        trainer(tmp_path, [callback]).fit(BagOfWordsClassifier(), classification_data())


def test_a_model_that_is_not_ours_trains_quantized(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = BagOfWordsClassifier()
    callback = QuantizationAwareTraining(exclude=["out"])
    trainer(tmp_path, [callback], max_steps=40).fit(model, classification_data())
    assert isinstance(model.embed, QATEmbedding) and isinstance(model.hidden, QATLinear)
    assert type(model.out) is nn.Linear and type(model.norm) is nn.LayerNorm
    assert bool(model.hidden.fake_quant_enabled) and model.hidden.input_absmax > 0
    # The forward pass really uses int8 weights: they differ from fp32 by at most half a step.
    step = weight_absmax(model.hidden.weight, False) / 127
    assert (model.hidden.quantized_weight() - model.hidden.weight).abs().max() <= step / 2 + 1e-6
    assert callback.quantized_names == ["embed", "hidden"]


def test_tied_weights_stay_tied() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.project = nn.Linear(4, 10, bias=False)
            self.project.weight = self.embed.weight

    model = Tied()
    QuantizationAwareTraining().quantize_modules(model)
    assert model.project.weight is model.embed.weight
    assert len(list(model.parameters())) == 1


class SharedEmbedding(nn.Module):
    """One nn.Embedding under two names, as the Transformer's source and target embeddings with
    share_embeddings='all'."""

    def __init__(self) -> None:
        super().__init__()
        self.src_embed = nn.Embedding(10, 4)
        self.tgt_embed = self.src_embed


def test_a_module_shared_under_two_names_is_quantized_under_both() -> None:
    model = SharedEmbedding()
    names = QuantizationAwareTraining().quantize_modules(model)
    assert names == ["src_embed", "tgt_embed"]
    assert isinstance(model.tgt_embed, QATEmbedding) and model.tgt_embed is model.src_embed
    assert QuantizationAwareTraining().quantize_modules(model) == names  # idempotent


def test_selecting_a_shared_module_under_one_name_only_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"shared as \['src_embed', 'tgt_embed'\].*as \['src_embed'\] only"):
        QuantizationAwareTraining(exclude=["tgt_embed"]).quantize_modules(SharedEmbedding())


def test_delayed_start_collects_ranges_first(tmp_path: Path) -> None:
    model = BagOfWordsClassifier()
    states = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            states.append((bool(pl_module.hidden.fake_quant_enabled), float(pl_module.hidden.input_absmax)))

    trainer(tmp_path, [QuantizationAwareTraining(start_step=5), Spy()], max_steps=8).fit(model, classification_data())
    assert [enabled for enabled, _ in states] == [False] * 5 + [True] * 3
    assert all(absmax > 0 for _, absmax in states)


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("start_step", [0, 10])
def test_resume_equals_uninterrupted(tmp_path: Path, start_step: int) -> None:
    def callback() -> QuantizationAwareTraining:
        return QuantizationAwareTraining(start_step=start_step, per_channel=True)

    L.seed_everything(0)
    straight = BagOfWordsClassifier()
    trainer(tmp_path / "a", [callback()], max_steps=24).fit(straight, classification_data())

    # Stop after 8 of 24 steps (an epoch boundary: Lightning replays a map-style epoch that was
    # cut in the middle), with the checkpoint the ordinary ModelCheckpoint writes.
    L.seed_everything(0)
    first = BagOfWordsClassifier()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1, filename="mid")
    trainer(tmp_path / "b", [callback(), saver], max_steps=8, enable_checkpointing=True).fit(first, classification_data())
    resumed = BagOfWordsClassifier()  # fresh weights: everything must come from the checkpoint
    trainer(tmp_path / "c", [callback()], max_steps=24).fit(resumed, classification_data(),
                                                             ckpt_path=tmp_path / "ckpt" / "mid.ckpt")

    expected, actual = _state(straight), _state(resumed)
    assert expected.keys() == actual.keys() and "hidden.input_absmax" in actual
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-6, msg=name)


def test_two_process_ddp_keeps_ranges_identical(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    result = subprocess.run([sys.executable, str(SCRIPTS / "qat_ddp.py"), str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and any(k.endswith("input_absmax") for k in ranks[0])
    assert ranks[0] == ranks[1]


def test_a_training_step_reads_nothing_back_from_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU, every bool()/item() of a tensor waits for the device; a QAT step has none."""
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    QuantizationAwareTraining().quantize_modules(model)
    for module in model:
        module.set_fake_quant(True)
    reads: list[str] = []
    for name in ("__bool__", "item"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _o=original, _n=name: reads.append(_n) or _o(self))
    ids = torch.randint(0, 10, (4, 3))
    for _ in range(2):  # the first step initialises the range, the second averages into it
        model(ids).sum().backward()
        model[1].update_input_range(model[1].pending_absmax)
    monkeypatch.undo()
    assert reads == []
    assert model[1].input_absmax > 0


def test_loading_a_state_dict_restores_the_switch() -> None:
    trained, fresh = (nn.ModuleDict({"layer": nn.Linear(4, 4)}) for _ in range(2))
    for model in (trained, fresh):
        QuantizationAwareTraining().quantize_modules(model)
    trained["layer"].set_fake_quant(True)
    fresh.load_state_dict(trained.state_dict())
    assert fresh["layer"].fake_quant_on and bool(fresh["layer"].fake_quant_enabled)
