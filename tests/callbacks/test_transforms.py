"""callbacks._transforms: several weight transforms on one nn.Linear, in one defined order."""

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from callbacks import (
    IterativeProductQuantization,
    LotteryTicketPruning,
    MagnitudePruning,
    QuantizationAwareTraining,
    QuantNoise,
    StructuredPruning,
)
from callbacks._transforms import (
    MASK,
    WeightTransform,
    add_weight_transform,
    find_weight_transform,
    trainable_weight,
    weight_transforms,
)
from callbacks.quantization_aware_training import (
    FakeQuantizedWeight,
    fake_quantize,
    weight_absmax,
)
from tests.callbacks.classifier import BagOfWordsClassifier, classification_data
from tests.callbacks.helpers import (
    assert_same_state,
    resumed_and_uninterrupted,
    state,
    trainer,
)


class KeepLargest(WeightTransform):
    """A pruning-like mask (a buffer of the model): zero the half of the weights smallest at set-up."""

    stage = MASK

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", (weight.detach().abs() >= weight.detach().abs().median()).float())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


class MaskCallback(L.Callback):
    """Masks ``hidden`` in setup, as a pruning callback would."""

    def setup(self, trainer, pl_module, stage):
        add_weight_transform(pl_module.hidden, KeepLargest(trainable_weight(pl_module.hidden)))


def test_mask_then_fake_quantization_whatever_the_callback_order(tmp_path: Path) -> None:
    states = []
    for order in ("mask first", "quantization first"):
        L.seed_everything(0)
        model = BagOfWordsClassifier()
        callbacks = [MaskCallback(), QuantizationAwareTraining()]
        trainer(tmp_path / order, callbacks if order == "mask first" else callbacks[::-1], max_steps=6).fit(
            model, classification_data())
        chain = weight_transforms(model.hidden)
        assert [type(t) for t in chain] == [KeepLargest, FakeQuantizedWeight], order
        # The weight the layer uses: the mask first, then rounding with max|masked W|.
        raw, mask = trainable_weight(model.hidden), chain[0].mask
        masked = raw * mask
        torch.testing.assert_close(model.hidden.weight, fake_quantize(masked, weight_absmax(masked, False), 8),
                                   rtol=0, atol=0)
        assert (model.hidden.weight[mask == 0] == 0).all()
        states.append(state(model))
    assert_same_state(states[0], states[1], tolerance=0)  # the same run in both list orders


def test_adding_the_same_kind_twice_keeps_one() -> None:
    linear = nn.Linear(4, 4)
    first = add_weight_transform(linear, KeepLargest(linear.weight))
    assert add_weight_transform(linear, KeepLargest(trainable_weight(linear))) is first
    assert len(weight_transforms(linear)) == 1
    with pytest.raises(TypeError, match="is not a WeightTransform"):
        add_weight_transform(linear, nn.Identity())


def test_resume_with_two_transforms_equals_uninterrupted(tmp_path: Path) -> None:
    expected, actual = resumed_and_uninterrupted(tmp_path, BagOfWordsClassifier,
                                                 lambda: [QuantizationAwareTraining(), MaskCallback()],
                                                 classification_data, stop=5, total=12)
    assert "hidden.parametrizations.weight.0.mask" in actual
    assert_same_state(expected, actual)


@pytest.mark.parametrize("make", [QuantizationAwareTraining, QuantNoise, IterativeProductQuantization, MagnitudePruning,
                                  lambda: LotteryTicketPruning(round_steps=4), StructuredPruning],
                         ids=["QuantizationAwareTraining", "QuantNoise", "IterativeProductQuantization",
                              "MagnitudePruning", "LotteryTicketPruning", "StructuredPruning"])
def test_every_transforming_callback_refuses_the_optimizer_state_of_a_plain_checkpoint(make) -> None:
    """Resuming a run saved before the weights had transforms: each callback refuses it under its
    own name (the optimiser's moments are stored by parameter position, which the transforms move)."""
    callback = make()
    model = BagOfWordsClassifier()
    QuantizationAwareTraining().quantize_modules(model)
    checkpoint = {"optimizer_states": [{}], "state_dict": BagOfWordsClassifier().state_dict()}
    with pytest.raises(ValueError, match=f"^{type(callback).__name__}: the checkpoint was saved without weight "
                                         f"transforms on embed.weight"):
        callback.on_load_checkpoint(None, model, checkpoint)


def test_the_chain_is_per_tensor_and_a_partial_plain_checkpoint_loads() -> None:
    """A transform on ``bias`` leaves ``weight`` plain and is found, read and loaded under
    ``bias``. With both tensors transformed, a checkpoint saved without transforms loads each
    into its own chain (the masks keep their fresh state), also when it holds one of the two
    tensors (non-strict loading, whichever tensor it is)."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    bias = layer.bias
    add_weight_transform(layer, KeepLargest(bias), "bias")
    assert trainable_weight(layer, "bias") is bias
    assert trainable_weight(layer) is layer.weight
    assert find_weight_transform(layer, KeepLargest) is None
    assert find_weight_transform(layer, KeepLargest, "bias") is weight_transforms(layer, "bias")[0]

    layer = nn.Linear(4, 3)  # now weight first, then bias: each gets a mask of its own
    for name in ("weight", "bias"):
        add_weight_transform(layer, KeepLargest(getattr(layer, name)), name)
    masks = {name: find_weight_transform(layer, KeepLargest, name).mask.clone() for name in ("weight", "bias")}
    assert [mask.shape for mask in masks.values()] == [(3, 4), (3,)]
    plain = nn.Linear(4, 3)
    layer.load_state_dict(plain.state_dict())  # (3, 4) and (3,) masks: each keeps its own
    for name in ("weight", "bias"):
        assert torch.equal(trainable_weight(layer, name), getattr(plain, name))
        assert torch.equal(find_weight_transform(layer, KeepLargest, name).mask, masks[name])
    for kept, other in (("weight", "bias"), ("bias", "weight")):
        fresh = nn.Linear(4, 3)
        unchanged = trainable_weight(layer, other).detach().clone()
        layer.load_state_dict({kept: getattr(fresh, kept).detach()}, strict=False)
        assert torch.equal(trainable_weight(layer, kept), getattr(fresh, kept))
        assert torch.equal(trainable_weight(layer, other), unchanged)
