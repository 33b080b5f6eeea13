import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from callbacks import QuantizationAwareTraining
from callbacks._transforms import (
    find_weight_transform,
    trainable_weight,
    weight_transforms,
)
from callbacks.quantization_aware_training import (
    FakeQuantizedWeight,
    InputQuantizer,
    fake_quantize,
    weight_absmax,
)
from tests.callbacks.classifier import BagOfWordsClassifier, classification_data
from tests.callbacks.fixed import TwoLinears, batches
from tests.callbacks.helpers import (
    assert_same_state,
    resumed_and_uninterrupted,
    trainer,
)
from tests.conftest import run_script


@pytest.mark.parametrize("bits", [8, 4, 2])
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


def test_bf16_inputs_are_rounded_in_fp32() -> None:
    """Under bf16-mixed the codes must be the fp32 export's: rounding x * S in bf16 (8 significant
    bits) would move many values to a neighbouring code."""
    x = (torch.randn(4000) * 2).bfloat16()
    absmax = torch.tensor(3.0)
    out = fake_quantize(x, absmax, 8)
    assert out.dtype == torch.bfloat16
    codes_fp32 = torch.clamp(torch.round(x.float() * (127 / 3.0)), -127, 127)
    # out is codes / S rounded to bf16; its code is the nearest integer to out * S.
    torch.testing.assert_close(torch.round(out.float() * (127 / 3.0)), codes_fp32, rtol=0, atol=0)
    codes_bf16 = torch.clamp(torch.round(x * torch.tensor(127 / 3.0, dtype=torch.bfloat16)), -127, 127).float()
    assert (codes_bf16 != codes_fp32).any()  # what the fp32 rounding avoids


def test_per_channel_scales() -> None:
    weight = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    torch.testing.assert_close(weight_absmax(weight, per_channel=True), torch.tensor([[2.0], [0.5]]))
    assert weight_absmax(weight, per_channel=False) == 2.0


def test_empty_selection_is_an_error(tmp_path: Path) -> None:
    callback = QuantizationAwareTraining(include=["encoder.*"])
    with pytest.raises(ValueError, match=r"^QuantizationAwareTraining selected no nn.Linear/nn.Embedding module with "
                                         r"include=\['encoder.\*'\]"):
        trainer(tmp_path, [callback]).fit(BagOfWordsClassifier(), classification_data())


def test_two_bits_is_a_ternary_weight() -> None:
    """The fewest bits accepted, 2: M = 1, so each weight becomes -max|W|, 0 or +max|W| (the
    nearest of the three; |w| below half of max|W| rounds to 0)."""
    model = BagOfWordsClassifier()
    QuantizationAwareTraining(bits=2, per_channel=False).quantize_modules(model)
    raw = trainable_weight(model.hidden).detach()
    top = raw.abs().max()
    expected = torch.where(raw.abs() * 2 > top, raw.sign() * top, torch.zeros_like(raw))
    torch.testing.assert_close(model.hidden.weight.detach(), expected, rtol=0, atol=1e-6)


def test_a_model_that_is_not_ours_trains_quantized(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = BagOfWordsClassifier()
    callback = QuantizationAwareTraining(exclude=["out"])
    trainer(tmp_path, [callback], max_steps=40).fit(model, classification_data())
    # The modules keep their classes; the quantization sits in their weight's transform chain.
    assert isinstance(model.embed, nn.Embedding) and isinstance(model.hidden, nn.Linear)
    assert isinstance(find_weight_transform(model.embed, FakeQuantizedWeight), FakeQuantizedWeight)
    assert isinstance(model.hidden.input_quantizer, InputQuantizer) and model.hidden.input_quantizer.absmax > 0
    assert weight_transforms(model.out) == [] and not hasattr(model.out, "input_quantizer")
    # The forward pass really uses int8 weights: on the grid, within half a step of the fp32 ones.
    raw = model.hidden.parametrizations.weight.original
    step = weight_absmax(raw, False) / 127
    used = model.hidden.weight
    torch.testing.assert_close(used / step, (used / step).round(), rtol=0, atol=1e-3)
    assert (used - raw).abs().max() <= step / 2 + 1e-6
    assert callback.quantized_names == ["embed", "hidden"]


def test_the_trained_parameter_is_never_overwritten(tmp_path: Path) -> None:
    """fairseq's quant_noise writes its rounded weight into .data; here the parameter keeps
    full precision and only the forward pass sees the grid."""
    model = BagOfWordsClassifier()
    QuantizationAwareTraining().quantize_modules(model)
    raw = model.hidden.parametrizations.weight.original
    before = raw.detach().clone()
    model(torch.randint(0, 30, (4, 6))).sum().backward()
    torch.testing.assert_close(raw.detach(), before, rtol=0, atol=0)
    assert not torch.equal(model.hidden.weight, raw)


def test_tied_weights_stay_tied() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.project = nn.Linear(4, 10, bias=False)
            self.project.weight = self.embed.weight

    model = Tied()
    QuantizationAwareTraining().quantize_modules(model)
    assert model.project.parametrizations.weight.original is model.embed.parametrizations.weight.original
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
    assert model.tgt_embed is model.src_embed and len(weight_transforms(model.src_embed)) == 1
    assert QuantizationAwareTraining().quantize_modules(model) == names  # idempotent
    assert len(weight_transforms(model.src_embed)) == 1


def test_selecting_a_shared_module_under_one_name_only_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"shared as \['src_embed', 'tgt_embed'\].*as \['src_embed'\] only"):
        QuantizationAwareTraining(exclude=["tgt_embed"]).quantize_modules(SharedEmbedding())


def test_delayed_start_collects_ranges_first(tmp_path: Path) -> None:
    model = BagOfWordsClassifier()
    states = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            states.append((find_weight_transform(pl_module.hidden, FakeQuantizedWeight).enabled,
                           float(pl_module.hidden.input_quantizer.absmax)))

    trainer(tmp_path, [QuantizationAwareTraining(start_step=5), Spy()], max_steps=8).fit(model, classification_data())
    assert [enabled for enabled, _ in states] == [False] * 5 + [True] * 3
    assert all(absmax > 0 for _, absmax in states)


@pytest.mark.parametrize("start_step, stop", [(0, 8), (10, 8), (0, 5), (4, 11)])
def test_resume_equals_uninterrupted(tmp_path: Path, start_step: int, stop: int) -> None:
    """Stop at an epoch boundary (8 batches an epoch) or in the middle of one, before or after
    quantization starts; resume from the checkpoint ModelCheckpoint wrote."""
    expected, actual = resumed_and_uninterrupted(
        tmp_path, BagOfWordsClassifier, lambda: [QuantizationAwareTraining(start_step=start_step, per_channel=True)],
        classification_data, stop=stop, total=20)
    assert "hidden.input_quantizer.absmax" in actual and "hidden.parametrizations.weight.original" in actual
    assert_same_state(expected, actual)


@pytest.mark.parametrize("change", [{"bits": 4}, {"per_channel": True}])
def test_resuming_with_another_grid_is_refused(tmp_path: Path, change: dict) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, filename="mid")
    trainer(tmp_path, [QuantizationAwareTraining(), saver], max_steps=4, enable_checkpointing=True).fit(
        BagOfWordsClassifier(), classification_data())
    (key, value), = change.items()
    with pytest.raises(ValueError, match=rf"trained with .*'{key}': {(8 if key == 'bits' else False)!r}.*this callback has "
                                         rf".*'{key}': {value!r}"):
        trainer(tmp_path, [QuantizationAwareTraining(**change)], max_steps=8).fit(
            BagOfWordsClassifier(), classification_data(), ckpt_path=tmp_path / "ckpt" / "mid.ckpt")


def test_two_process_ddp_keeps_ranges_identical(tmp_path: Path) -> None:
    """DDP without buffer broadcasting: equal ranges on both ranks come from the callback's reduction."""
    run_script("qat_ddp.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and any(k.endswith("input_quantizer.absmax") for k in ranks[0])
    own = [rank.pop("own_first_step_max") for rank in ranks]
    first = [rank.pop("range_after_first_step") for rank in ranks]
    assert ranks[0] == ranks[1]
    # The shards differ, so each rank's own maxima differ: without the reduction the ranges would too.
    assert own[0] != own[1]
    # The first step's range is the max over both shards (not their mean, not one rank's).
    assert first == [max(own), max(own)]


def test_a_training_step_reads_nothing_back_from_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU, every bool()/item() of a tensor waits for the device; a QAT step has none."""
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    QuantizationAwareTraining().quantize_modules(model)
    reads: list[str] = []
    for name in ("__bool__", "item"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _o=original, _n=name: reads.append(_n) or _o(self))
    ids = torch.randint(0, 10, (4, 3))
    for _ in range(2):  # the first step initialises the range, the second averages into it
        model(ids).sum().backward()
        model[1].input_quantizer.update_range(model[1].input_quantizer.pending)
    monkeypatch.undo()
    assert reads == []
    assert model[1].input_quantizer.absmax > 0


def test_bf16_mixed_training_quantizes_on_the_fp32_grid(tmp_path: Path) -> None:
    """Under bf16-mixed each layer's input reaches the quantizer in bf16; its codes must be the
    ones fp32 arithmetic gives (those of the int8 export), not bf16's."""

    class NoNorm(BagOfWordsClassifier):  # out's input is hidden's bf16 output under autocast
        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.hidden(self.embed(tokens).mean(1))))

    model = NoNorm()
    QuantizationAwareTraining().quantize_modules(model)
    seen = []

    def record(quantizer, args, output):
        if quantizer.training and quantizer.enabled:
            seen.append((args[0].detach(), output.detach(), torch.where(quantizer.absmax > 0, quantizer.absmax,
                                                                        args[0].detach().abs().max().float())))

    model.out.input_quantizer.register_forward_hook(record)
    trainer(tmp_path, [QuantizationAwareTraining()], max_steps=6, precision="bf16-mixed").fit(model, classification_data())
    assert len(seen) == 6
    for x, out, absmax in seen:
        assert x.dtype == out.dtype == torch.bfloat16
        scale = 127 / absmax
        expected = torch.clamp(torch.round(x.float() * scale), -127, 127)
        # out holds codes / S rounded to bf16 (8 significant bits): its code is the nearest integer.
        torch.testing.assert_close(torch.round(out.float() * scale), expected, rtol=0, atol=0)


def test_a_plain_checkpoint_loads_into_the_quantized_model(tmp_path: Path) -> None:
    """The weights of a run without the callback (plain keys, no ranges) load into the quantized
    model, ranges fresh (0: "no batch seen yet"); resuming its optimiser state is refused, since
    Adam's moments are stored by parameter position and the transform chain moves the weight."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, filename="plain")
    trainer(tmp_path / "a", [saver], max_steps=4, enable_checkpointing=True).fit(BagOfWordsClassifier(),
                                                                               classification_data())
    saved = torch.load(tmp_path / "ckpt" / "plain.ckpt", weights_only=True)["state_dict"]
    model = BagOfWordsClassifier()
    QuantizationAwareTraining().quantize_modules(model)
    model.load_state_dict(saved)
    torch.testing.assert_close(trainable_weight(model.hidden).detach(), saved["hidden.weight"], rtol=0, atol=0)
    assert float(model.hidden.input_quantizer.absmax) == 0.0
    with pytest.raises(ValueError, match="saved without weight transforms on embed.weight.*start from its weights"):
        trainer(tmp_path / "b", [QuantizationAwareTraining()], max_steps=6).fit(
            BagOfWordsClassifier(), classification_data(), ckpt_path=tmp_path / "ckpt" / "plain.ckpt")


def test_the_activation_range_is_the_ema_of_the_batch_maxima(tmp_path: Path) -> None:
    """Q8BERT's activation range, by hand for three batches whose max|x| is 2, 4 and 1 (decay
    0.9): 2 (the first batch's own), 0.9 * 2 + 0.1 * 4 = 2.2, 0.9 * 2.2 + 0.1 * 1 = 2.08. Each
    step quantizes on the range of the steps before it: at the second, x = -4 saturates at -2."""
    model = TwoLinears()
    seen = []
    model.a.register_forward_hook(lambda module, args, output: seen.append(args[0].detach().clone()))
    qat = QuantizationAwareTraining(include=["a"], ema_decay=0.9)
    trainer(tmp_path, [qat], max_steps=3).fit(model, batches([[2.0, -1.0, 0.5, 0.0], [-4.0, 1.0, 0.0, 0.0],
                                                              [1.0, 0.5, 0.0, 0.0]]))
    assert model.a.input_quantizer.absmax.item() == pytest.approx(2.08, rel=1e-6)
    assert seen[1][0, 0].item() == -2.0  # on the grid of range 2: clamp(round(-4 * 127 / 2), -127, 127) / (127 / 2)
    assert seen[1][0, 1].item() == pytest.approx(round(127 / 2) / (127 / 2), rel=1e-6)  # 1 on that grid: 64 / 63.5
    assert seen[0][0, 2].item() == pytest.approx(round(0.5 * 127 / 2) / (127 / 2), rel=1e-6)  # first batch: its own range


def test_a_layer_run_twice_in_a_batch_takes_the_max_over_both_calls(tmp_path: Path) -> None:
    """The range is folded into the EMA after every training batch; a layer that runs twice in one
    batch (here on x and on x / 2) contributes the larger of its two maxima, so the range is 2.08
    as in the test above, where a range fed by the last call alone would be 1.04."""
    class TwiceA(TwoLinears):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x) + self.a(x / 2))

    model = TwiceA()
    qat = QuantizationAwareTraining(include=["a"], ema_decay=0.9)
    trainer(tmp_path, [qat], max_steps=3).fit(model, batches([[2.0, -1.0, 0.5, 0.0], [-4.0, 1.0, 0.0, 0.0],
                                                              [1.0, 0.5, 0.0, 0.0]]))
    assert model.a.input_quantizer.absmax.item() == pytest.approx(2.08, rel=1e-6)


@pytest.mark.parametrize("bits, codec", [(8, "int8"), (5, "int8"), (4, "int4")])
@pytest.mark.parametrize("quantize_embeddings", [True, False])
def test_the_checkpoint_names_each_grid_for_the_exporter(bits: int, codec: str, quantize_embeddings: bool,
                                                          tmp_path: Path) -> None:
    """The checkpoint's manifest, written out: every quantized weight's grid (4 bits or fewer are
    stored two to a byte, so int4), the Linear layers' activation range by its state_dict key, the
    embedding only when it is quantized; and the callback's own entry, which a resume checks."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = BagOfWordsClassifier()
    qat = QuantizationAwareTraining(bits=bits, per_channel=True, start_step=1,
                                    quantize_embeddings=quantize_embeddings)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    trainer(tmp_path, [qat, saver], max_steps=2, enable_checkpointing=True).fit(model, classification_data())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    grid = {"codec": codec, "order": 20, "bits": bits, "per_channel": True}
    expected = {name: [dict(grid, activation_range=f"{name}.input_quantizer.absmax")] for name in ("hidden", "out")}
    expected = {f"{name}.weight": steps for name, steps in expected.items()}
    if quantize_embeddings:
        expected["embed.weight"] = [grid]
    assert saved["compression"] == expected
    assert (find_weight_transform(model.embed, FakeQuantizedWeight) is not None) == quantize_embeddings
    entry = next(value for key, value in saved["callbacks"].items() if key.startswith("QuantizationAwareTraining"))
    assert entry == {"bits": bits, "per_channel": True, "start_step": 1}


def test_validation_sees_the_model_as_deployed_once_quantization_has_started(tmp_path: Path) -> None:
    # start_step=5 and 5 steps: the last training batch (step 4) ran in floating point, but the
    # model validated after it is at step 5, where the deployed model is the quantized one.
    model = BagOfWordsClassifier()
    seen = []

    class Spy(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen.append((trainer.global_step, find_weight_transform(pl_module.hidden, FakeQuantizedWeight).enabled,
                         pl_module.hidden.input_quantizer.enabled))

    fit = trainer(tmp_path, [QuantizationAwareTraining(start_step=5), Spy()], max_steps=5, limit_val_batches=2)
    fit.fit(model, classification_data())
    fit.validate(model, classification_data(), verbose=False)
    assert seen and all(entry == (5, True, True) for entry in seen)
    seen.clear()
    early = trainer(tmp_path / "early", [QuantizationAwareTraining(start_step=5), Spy()], max_steps=3, limit_val_batches=2)
    early.fit(BagOfWordsClassifier(), classification_data())
    early.validate(early.lightning_module, classification_data(), verbose=False)
    assert seen and all(entry == (3, False, False) for entry in seen)


def test_the_activation_range_lives_on_its_layers_device() -> None:
    """A model already on its device (the meta device stands in for a GPU) gets its range buffers
    there, not on the CPU."""
    model = BagOfWordsClassifier().to("meta")
    QuantizationAwareTraining().quantize_modules(model)
    assert model.hidden.input_quantizer.absmax.device.type == "meta"
