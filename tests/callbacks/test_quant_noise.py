"""callbacks.QuantNoise: noise on a random fraction of blocks, never written into the weight."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from callbacks import QuantizationAwareTraining, QuantNoise
from callbacks._transforms import find_weight_transform, trainable_weight, weight_transforms
from callbacks.quant_noise import NoisyWeight
from callbacks.quantization_aware_training import FakeQuantizedWeight, fake_quantize, weight_absmax
from tests.callbacks.classifier import BagOfWordsClassifier, classification_data
from tests.callbacks.fixed import A, B, TwoLinears, batches
from tests.callbacks.helpers import assert_same_state, resumed_and_uninterrupted, trainer
from tests.callbacks.test_transforms import MaskCallback


def noised_model(**settings) -> tuple[BagOfWordsClassifier, QuantNoise]:
    model = BagOfWordsClassifier(dim=32)
    callback = QuantNoise(**settings)
    callback.add_noise_transforms(model)
    return model, callback


def test_the_stored_parameter_is_untouched_by_a_training_forward() -> None:
    model, callback = noised_model(p=0.5, scheme="pq", block_size=4)
    model.train()
    before = trainable_weight(model.hidden).detach().clone()
    callback.draw_masks()
    noisy = model.hidden.weight
    assert not torch.equal(noisy, before)  # noise is on
    model(torch.randint(0, 30, (4, 6))).sum().backward()
    assert torch.equal(trainable_weight(model.hidden), before)  # bit-identical after the forward and backward


def test_every_weight_draws_its_own_blocks_from_the_seeded_generator() -> None:
    """One draw of U(0, 1) per block from a generator seeded with ``seed``, the weights' blocks laid
    end to end in module order (embed 30 x 8, hidden 32 x 8, out 3 x 8 blocks of 4), a block noised
    where its number is below p: written out here, so that two weights reading overlapping parts
    of the draw (correlated noise), or another seed, give other masks. The second draw continues
    the generator."""
    model, callback = noised_model(p=0.3, scheme="int8", block_size=4, seed=7)
    generator = torch.Generator().manual_seed(7)
    for _ in range(2):
        callback.draw_masks()
        drawn = torch.rand(30 * 8 + 32 * 8 + 3 * 8, generator=generator) < 0.3
        expected = {"embed": drawn[:240].view(30, 8), "hidden": drawn[240:496].view(32, 8),
                    "out": drawn[496:].view(3, 8)}
        for name, mask in expected.items():
            assert torch.equal(weight_transforms(getattr(model, name))[0].mask, mask), name


def test_a_model_spread_over_devices_gets_each_mask_on_its_weights_device() -> None:
    """One draw on the first weight's device, each mask a slice of it moved to its own weight's
    device (the meta device stands in for a second GPU): the layers after the moved one still read
    their own part of the draw."""
    model, callback = BagOfWordsClassifier(dim=32), QuantNoise(p=0.3, scheme="int8", block_size=4, seed=7)
    model.hidden.to("meta")  # before the transforms, as a model is placed before its fit
    callback.add_noise_transforms(model)
    callback.draw_masks()
    drawn = torch.rand(30 * 8 + 32 * 8 + 3 * 8, generator=torch.Generator().manual_seed(7)) < 0.3
    masks = {name: weight_transforms(getattr(model, name))[0].mask for name in ("embed", "hidden", "out")}
    assert masks["hidden"].device.type == "meta" and masks["hidden"].shape == (32, 8)
    assert torch.equal(masks["embed"], drawn[:240].view(30, 8)) and torch.equal(masks["out"], drawn[496:].view(3, 8))


@pytest.mark.parametrize("gradient", ["straight_through", "dropout"])
def test_the_callback_puts_its_settings_on_every_selected_weight(gradient: str) -> None:
    """What QuantNoise hands each weight's transform: the scheme, p, block size and, for pq, the
    gradient; the embedding only with noise_embeddings. The dropout gradient reaches a dropped
    block as 0, the straight-through one as it is."""
    model, _ = noised_model(p=0.5, scheme="pq", block_size=4, pq_gradient=gradient, noise_embeddings=False)
    assert weight_transforms(model.embed) == []
    transform = weight_transforms(model.hidden)[0]
    assert repr(transform) == f"NoisyWeight(scheme=pq, p=0.5, block_size=4, per_channel=True, pq_gradient={gradient})"
    transform.mask = torch.zeros(32, 8, dtype=torch.bool)
    transform.mask[0, 0] = True  # the first block of the first row dropped
    model.train()
    model.hidden.weight.sum().backward()
    first_block = trainable_weight(model.hidden).grad[0, :4]
    assert torch.equal(first_block, torch.full((4,), 0.0 if gradient == "dropout" else 1.0))
    int8, _ = noised_model(p=0.3, scheme="int8", block_size=4)
    assert repr(weight_transforms(int8.embed)[0]) == "NoisyWeight(scheme=int8, p=0.3, block_size=4, per_channel=True)"


@pytest.mark.parametrize("scheme", ["int8", "int4", "pq"])
def test_the_fraction_of_noised_blocks_is_close_to_p(scheme: str) -> None:
    model, callback = noised_model(p=0.2, scheme=scheme, block_size=4, include=["hidden"])
    model.train()
    masks = []
    for _ in range(50):
        callback.draw_masks()
        masks.append(weight_transforms(model.hidden)[0].mask)
    fraction = torch.stack(masks).float().mean().item()
    # 50 draws of 32 * 8 blocks: 12,800 Bernoulli(0.2); standard deviation 0.0035, so 0.02 is over 5 of them.
    assert abs(fraction - 0.2) < 0.02
    # The noise lands exactly on the masked blocks: a block is either all exact or all noised.
    original = trainable_weight(model.hidden).detach()
    changed = (model.hidden.weight.detach() != original).view(32, 8, 4)
    mask = weight_transforms(model.hidden)[0].mask
    if scheme == "pq":  # kept blocks are rescaled by 1 / (1 - p), dropped ones are zero
        torch.testing.assert_close(model.hidden.weight.detach().view(32, 8, 4)[~mask],
                                   original.view(32, 8, 4)[~mask] / 0.8)
        assert (model.hidden.weight.detach().view(32, 8, 4)[mask] == 0).all()
    else:
        assert not changed[~mask].any()


def test_evaluation_sees_the_exact_weight() -> None:
    model, callback = noised_model(p=0.9, scheme="int4")
    callback.draw_masks()
    model.eval()
    assert torch.equal(model.hidden.weight, trainable_weight(model.hidden))
    assert torch.equal(model.embed.weight, trainable_weight(model.embed))


@pytest.mark.parametrize("per_channel", [False, True])
def test_p_one_with_int8_is_the_qat_quantizer(per_channel: bool) -> None:
    model, callback = noised_model(p=1.0, scheme="int8", per_channel=per_channel)
    model.train()
    callback.draw_masks()
    for module in (model.hidden, model.out, model.embed):
        weight = trainable_weight(module)
        expected = FakeQuantizedWeight(8, per_channel)(weight)
        assert torch.equal(module.weight, expected)
        assert torch.equal(expected, fake_quantize(weight, weight_absmax(weight, per_channel), 8))


def test_noised_blocks_pass_gradients_straight_through() -> None:
    model, callback = noised_model(p=0.5, scheme="int4", include=["hidden"], block_size=4)
    model.train()
    callback.draw_masks()
    (model.hidden.weight * torch.arange(32 * 32.0).view(32, 32)).sum().backward()
    torch.testing.assert_close(trainable_weight(model.hidden).grad, torch.arange(32 * 32.0).view(32, 32))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_compiled_noise_equals_the_eager_noise(scheme: str) -> None:
    """compile=True fuses the same arithmetic: the same noisy weights and the same straight-through
    gradient. The fused kernel may multiply by 1 / scale where eager divides: a few float32 ulps
    on values below 1 (a flip of the rounding at an exact .5 tie is some 1e-7 likely per weight)."""
    eager, eager_callback = noised_model(p=0.3, scheme=scheme, block_size=4)
    fused, fused_callback = noised_model(p=0.3, scheme=scheme, block_size=4, compile=True)
    fused.load_state_dict(eager.state_dict())
    for model, callback in ((eager, eager_callback), (fused, fused_callback)):
        model.train()
        callback.draw_masks()  # both generators seeded alike: the same masks
    for name in ("hidden", "out", "embed"):
        torch.testing.assert_close(getattr(fused, name).weight, getattr(eager, name).weight, rtol=0, atol=1e-6)
    (fused.hidden.weight * torch.arange(32 * 32.0).view(32, 32)).sum().backward()
    assert torch.equal(trainable_weight(fused.hidden).grad, torch.arange(32 * 32.0).view(32, 32))


def test_every_accepted_seed_draws() -> None:
    """The largest seed __init__ accepts (2**63 - 1) seeds the generator, and draws other masks
    than seed 0."""
    masks = []
    for seed in (0, 2 ** 63 - 1):
        model, callback = noised_model(p=0.5, seed=seed)
        callback.draw_masks()
        masks.append(find_weight_transform(model.hidden, NoisyWeight).mask.clone())
    assert not torch.equal(*masks)


def test_block_size_must_divide_the_width() -> None:
    with pytest.raises(ValueError, match=r"^QuantNoise: block size 5 does not divide the 32 columns of hidden.weight"):
        noised_model(block_size=5, include=["hidden"])
    model, _ = noised_model(block_size=5, block_sizes={"hidden": 4, "out": 8, "embed": 16})  # per-module sizes
    assert [t.block_size for t in weight_transforms(model.hidden)] == [4]
    model, _ = noised_model(block_size=1, block_sizes={"hidden": 1})  # blocks of one weight each: the smallest
    assert [t.block_size for t in weight_transforms(model.hidden)] == [1]


def test_globs_selecting_nothing_are_an_error() -> None:
    with pytest.raises(ValueError, match=r"QuantNoise selected no nn.Linear/nn.Embedding module with include=\['decoder\*'\]"):
        noised_model(include=["decoder*"])


def test_a_model_that_is_not_ours_trains_with_noise(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = BagOfWordsClassifier()
    trainer(tmp_path, [QuantNoise(p=0.1, scheme="int8", block_size=4)], max_steps=40).fit(model, classification_data())
    assert isinstance(model.hidden, nn.Linear) and weight_transforms(model.hidden)[0].mask is not None


@pytest.mark.parametrize("scheme", ["int4", "pq"])
def test_resume_draws_the_same_noise_as_an_uninterrupted_run(tmp_path: Path, scheme: str) -> None:
    straight, resumed = resumed_and_uninterrupted(
        tmp_path, lambda: BagOfWordsClassifier(), lambda: [QuantNoise(p=0.3, scheme=scheme, block_size=4)],
        classification_data, stop=5, total=12)
    assert_same_state(straight, resumed, tolerance=0)


def test_generator_state_round_trips_and_the_other_device_type_restarts_from_the_seed() -> None:
    """The generator lives on the weights' device; its state is saved with that device's type.
    A state saved before the first draw after loading is the loaded one; a CPU run given a
    state from a CUDA run (or a CUDA run given a CPU one) restarts from the seed with a warning."""
    model, callback = noised_model(p=0.3, block_size=4, seed=3)
    model.train()
    callback.draw_masks()
    saved = callback.state_dict()
    assert saved["generator_device"] == "cpu"
    callback.draw_masks()
    expected = model.hidden.weight.detach().clone()

    other_model, other = noised_model(p=0.3, block_size=4, seed=3)
    other_model.load_state_dict(model.state_dict())
    other_model.train()
    other.load_state_dict(saved)
    assert torch.equal(other.state_dict()["generator"], saved["generator"])  # nothing drawn yet: kept
    other.draw_masks()
    assert torch.equal(other_model.hidden.weight, expected)

    old_format = {key: value for key, value in saved.items() if key != "generator_device"}
    other.load_state_dict(old_format)  # written when the generator was always on the CPU
    other.draw_masks()
    assert torch.equal(other_model.hidden.weight, expected)

    other.load_state_dict({**saved, "generator_device": "cuda"})
    with pytest.warns(UserWarning, match="noise restarts from seed 3"):
        other.draw_masks()
    fresh_model, fresh = noised_model(p=0.3, block_size=4, seed=3)
    fresh_model.load_state_dict(model.state_dict())
    fresh_model.train()
    fresh.draw_masks()
    assert torch.equal(other_model.hidden.weight, fresh_model.hidden.weight)


def test_resuming_with_other_noise_is_refused(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="mid")
    trainer(tmp_path, [QuantNoise(p=0.1, block_size=4), saver], max_steps=3, enable_checkpointing=True).fit(
        BagOfWordsClassifier(), classification_data())
    with pytest.raises(ValueError, match="resuming would change the noise"):
        trainer(tmp_path, [QuantNoise(p=0.2, block_size=4)], max_steps=6).fit(
            BagOfWordsClassifier(), classification_data(), ckpt_path=tmp_path / "ckpt" / "mid.ckpt")


@pytest.mark.parametrize("order", ["noise first", "qat first"])
def test_with_qat_and_with_a_mask(tmp_path: Path, order: str) -> None:
    """Mask -> noise -> fake quantization, whatever the order of the callbacks list."""
    L.seed_everything(0)
    model = BagOfWordsClassifier()
    callbacks = [QuantNoise(p=0.2, scheme="int4", block_size=4), QuantizationAwareTraining(), MaskCallback()]
    trainer(tmp_path, callbacks if order == "noise first" else callbacks[::-1], max_steps=8).fit(
        model, classification_data())
    kinds = [type(t).__name__ for t in weight_transforms(model.hidden)]
    assert kinds == ["KeepLargest", "NoisyWeight", "FakeQuantizedWeight"]
    model.eval()
    mask = weight_transforms(model.hidden)[0].mask
    assert (model.hidden.weight[mask == 0] == 0).all()


def test_checkpoint_records_the_grid_for_export(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")
    trainer(tmp_path, [QuantNoise(p=0.1, scheme="int4", block_size=4, exclude=["out"]), saver], max_steps=2,
            enable_checkpointing=True).fit(BagOfWordsClassifier(), classification_data())
    manifest = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["compression"]
    assert manifest == {name: [{"codec": "int4", "order": 20, "bits": 4, "per_channel": True}]
                        for name in ("embed.weight", "hidden.weight")}


def test_yaml_instantiation() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--noise", type=QuantNoise)
    config = parser.parse_string("""
noise:
  class_path: callbacks.QuantNoise
  init_args: {p: 0.1, scheme: int4, block_size: 8, block_sizes: {"*attn*": 4}, exclude: ["*output_projection"]}
""")
    noise = parser.instantiate_classes(config).noise
    assert (noise.scheme, noise.block_sizes, noise.exclude) == ("int4", {"*attn*": 4}, ["*output_projection"])


def test_noise_is_a_weight_transform_of_its_own_stage() -> None:
    model, _ = noised_model()
    assert all(isinstance(t, NoisyWeight) for t in weight_transforms(model.out))


def test_two_process_ddp_draws_the_same_noise_on_both_ranks(tmp_path: Path) -> None:
    import json

    from tests.conftest import run_script

    run_script("quant_noise_ddp.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]["masks"]) == 5 and ranks[0]["masks"] == ranks[1]["masks"]
    assert len({str(mask) for mask in ranks[0]["masks"]}) == 5  # a new mask every step
    assert ranks[0]["weights"] == ranks[1]["weights"]  # and the replicas stay equal


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("compile", [False, True])
def test_on_a_gpu_the_masks_are_drawn_there_and_a_resume_draws_the_same_noise(tmp_path: Path, compile: bool) -> None:
    straight, resumed = resumed_and_uninterrupted(
        tmp_path, lambda: BagOfWordsClassifier(),
        lambda: [QuantNoise(p=0.3, scheme="int4", block_size=4, compile=compile)],
        classification_data, stop=5, total=12, accelerator="gpu")
    assert_same_state(straight, resumed, tolerance=0)
    model, callback = noised_model(p=0.3, block_size=4, compile=compile)
    model.cuda().train()
    callback.draw_masks()
    assert model.hidden.parametrizations.weight[0].mask.device.type == "cuda"
    assert callback.state_dict()["generator_device"] == "cuda"


@needs_cuda
def test_compiled_noise_equals_the_eager_noise_on_a_gpu() -> None:
    eager, eager_callback = noised_model(p=0.3, scheme="int8", block_size=4)
    fused, fused_callback = noised_model(p=0.3, scheme="int8", block_size=4, compile=True)
    fused.load_state_dict(eager.state_dict())
    for model, callback in ((eager, eager_callback), (fused, fused_callback)):
        model.cuda().train()
        callback.draw_masks()
    for name in ("hidden", "out", "embed"):
        torch.testing.assert_close(getattr(fused, name).weight, getattr(eager, name).weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme", ["int8", "int4", "pq"])
def test_the_stored_weight_is_never_written(tmp_path: Path, scheme: str) -> None:
    """With lr 0 the parameters must come out of training bit for bit as they went in, although
    every step's forward pass saw noisy weights (fairseq's quant_noise writes them into .data)."""
    model = TwoLinears()
    seen = []
    model.a.register_forward_hook(lambda module, args, output: seen.append(module.weight.detach().clone()))
    noise = QuantNoise(p=0.5, scheme=scheme, block_size=2, seed=0)
    trainer(tmp_path, [noise], max_steps=6).fit(model, batches([[1.0, 1.0, 1.0, 1.0]] * 6))
    assert torch.equal(trainable_weight(model.a), torch.tensor(A))
    assert torch.equal(trainable_weight(model.b), torch.tensor(B))
    assert sum(not torch.equal(weight, torch.tensor(A)) for weight in seen) >= 3  # the noise acted
    model.eval()
    assert torch.equal(model.a.weight, torch.tensor(A))  # and evaluation sees the exact weight


def test_the_noise_of_int_schemes_is_the_rounding_error_of_the_chosen_blocks() -> None:
    """int4, per row: row 0 of A has max|w| 9, scale 7 / 9; its blocks of 2 are (-9, 0.1) and
    (5, -4). Noising only the second block puts 5 and -4 on the grid, by hand: round(5 * 7 / 9)
    = 4 -> 4 * 9 / 7, round(-4 * 7 / 9) = -3 -> -3 * 9 / 7; everything else stays exact."""
    transform = NoisyWeight("int4", p=0.5, block_size=2, per_channel=True).train()
    transform.mask = torch.tensor([[False, True], [False, False]])
    noisy = transform(torch.tensor(A))
    expected = torch.tensor(A)
    expected[0, 2], expected[0, 3] = 4 * 9 / 7, -3 * 9 / 7
    torch.testing.assert_close(noisy, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("gradient", ["straight_through", "dropout"])
def test_the_pq_noise_and_its_gradient(gradient: str) -> None:
    """pq, p = 0.25, blocks of 2: the dropped blocks are 0 and the kept ones scaled by 1 / 0.75.
    The paper's gradient (straight through) reaches every block unscaled; the dropout gradient
    is 0 on dropped blocks and 1 / 0.75 of it on kept ones."""
    transform = NoisyWeight("pq", p=0.25, block_size=2, per_channel=True, pq_gradient=gradient).train()
    transform.mask = torch.tensor([[True, False], [False, True]])
    weight = torch.tensor(A, requires_grad=True)
    upstream = torch.arange(1.0, 9.0).view(2, 4)
    noisy = transform(weight)
    kept = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(noisy, torch.tensor(A) * kept / 0.75, rtol=0, atol=1e-6)
    (noisy * upstream).sum().backward()
    expected = upstream if gradient == "straight_through" else upstream * kept / 0.75
    torch.testing.assert_close(weight.grad, expected, rtol=0, atol=1e-6)


def test_with_qat_on_the_same_weight_the_export_follows_qats_grid(tmp_path: Path) -> None:
    """Quant-Noise int4 beside QAT int8 on the same layers: QAT's grid decides the encoding, so the
    checkpoint's manifest holds QAT's int8 step and no int4 step for those weights."""
    model = BagOfWordsClassifier()
    fit = trainer(tmp_path, [QuantNoise(p=0.2, scheme="int4", block_size=4, include=["hidden", "out"]),
                             QuantizationAwareTraining(include=["hidden"], quantize_embeddings=False)], max_steps=2)
    fit.fit(model, classification_data())
    checkpoint: dict = {}
    for callback in fit.callbacks:
        if isinstance(callback, (QuantNoise, QuantizationAwareTraining)):
            callback.on_save_checkpoint(fit, model, checkpoint)
    manifest = checkpoint["compression"]
    assert [step["codec"] for step in manifest["hidden.weight"]] == ["int8"]  # QAT's, not Quant-Noise's int4
    assert [step["codec"] for step in manifest["out.weight"]] == ["int4"]  # Quant-Noise alone there


def test_checkpoints_from_before_the_first_draw_and_before_pq_gradient_existed() -> None:
    """A state saved before any noise was drawn holds no generator and loads as such (its next draw
    starts from the seed); a pq state without ``pq_gradient`` was written by the version that
    trained with the dropout gradient: it resumes under pq_gradient="dropout" and is refused
    under the straight-through default."""
    untouched = QuantNoise(scheme="pq").state_dict()
    assert untouched["generator"] is None
    again = QuantNoise(scheme="pq")
    again.load_state_dict(untouched)
    assert again.state_dict() == untouched
    # Written out as such checkpoints hold it, so a key renamed on both sides is noticed too.
    older = {"p": 0.1, "scheme": "pq", "block_size": 8, "block_sizes": {}, "per_channel": True, "generator": None,
             "generator_device": None}
    QuantNoise(scheme="pq", pq_gradient="dropout").load_state_dict(older)
    with pytest.raises(ValueError, match="^QuantNoise: the checkpoint trained with .*'pq_gradient': 'dropout'"):
        QuantNoise(scheme="pq").load_state_dict(older)


def test_pq_noise_leaves_the_export_to_product_quantization() -> None:
    """int8/int4 Quant-Noise records its integer grid for the export; pq records nothing (the
    codebooks are IterativeProductQuantization's)."""
    from tests.callbacks.classifier import BagOfWordsClassifier

    for scheme, recorded in (("pq", False), ("int8", True)):
        model, checkpoint = BagOfWordsClassifier(), {}
        noise = QuantNoise(scheme=scheme, block_size=4)
        noise.setup(None, model, "fit")
        noise.on_save_checkpoint(None, model, checkpoint)
        assert bool(checkpoint) is recorded, scheme
