"""callbacks.IterativeProductQuantization: k-means codebooks, stage by stage, exact resume, export."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors import safe_open

from callbacks import IterativeProductQuantization, QuantNoise
from compression_contract.product_quantization import kmeans
from callbacks._transforms import trainable_weight, weight_transforms
from callbacks.product_quantization import CentroidWeight
from tests.callbacks.classifier import BagOfWordsClassifier, classification_data
from tests.callbacks.helpers import assert_same_state, resumed_and_uninterrupted, trainer

CLASSIFIER_STAGES = [["hidden"], ["embed"], ["out"]]


def ipq(**settings) -> IterativeProductQuantization:
    options = dict(steps_per_stage=4, stages=CLASSIFIER_STAGES, centroids=8, block_size=4, block_sizes={})
    options.update(settings)
    return IterativeProductQuantization(**options)


def test_kmeans_assigns_each_block_its_nearest_centroid_and_is_deterministic() -> None:
    points = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    centroids, assignments = kmeans(points, 16, 10, torch.Generator().manual_seed(3))
    distances = torch.cdist(points, centroids)
    assert torch.equal(assignments, distances.argmin(1))
    again = kmeans(points, 16, 10, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], centroids) and torch.equal(again[1], assignments)


def test_kmeans_resolves_empty_clusters() -> None:
    """Eight groups of 50 identical points and k = 8: the start draws several codewords from one
    group, which coincide, and all but one of them end up empty. Splitting the most populated
    cluster gives every group its own codeword."""
    points = torch.stack([torch.arange(8.0).repeat_interleave(50) * 100, torch.zeros(400)], dim=1)
    generator = torch.Generator().manual_seed(0)
    start = points[torch.randperm(400, generator=torch.Generator().manual_seed(0))[:8], 0]
    assert len(set(start.tolist())) < 8  # the start does coincide
    centroids, assignments = kmeans(points, 8, 30, generator)
    assert torch.bincount(assignments, minlength=8).tolist() == [50] * 8
    assert sorted(torch.round(centroids[:, 0]).tolist()) == [100.0 * g for g in range(8)]


def test_a_centroids_gradient_is_the_mean_over_its_blocks() -> None:
    weight = torch.randn(6, 8)
    transform = CentroidWeight(weight.shape, block_size=2, k=4)
    transform.quantize(weight, iterations=5, generator=torch.Generator().manual_seed(0))
    upstream = torch.randn(6, 8)
    (transform(weight) * upstream).sum().backward()
    blocks = upstream.reshape(-1, 2)
    assignments = transform.assignments.flatten()
    for c in range(4):
        chosen = blocks[assignments == c]
        expected = chosen.mean(0) if len(chosen) else torch.zeros(2)
        torch.testing.assert_close(transform.centroids.grad[c], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_centroid_gets_the_mean_gradient_of_its_blocks_also_of_one_or_none(dtype: torch.dtype) -> None:
    """A 2 x 8 weight in blocks of 2, its 8 blocks assigned by hand: centroid 0 has one block, 1 none,
    2 three, 3 four. Each centroid's gradient is the mean of its blocks' (the single block's own,
    0 for the empty one), in the weight's dtype also in bfloat16 (a bf16-true run). Tolerance: the
    sum of n gradients rounds n times and the division once, each within the dtype's unit
    roundoff u of at most the sum of their magnitudes."""
    transform = CentroidWeight(torch.Size((2, 8)), block_size=2, k=4).to(dtype)
    assignments = torch.tensor([[0, 2, 2, 3], [2, 3, 3, 3]])
    transform.assignments.copy_(assignments)
    transform.counts.copy_(torch.bincount(assignments.flatten(), minlength=4).float())
    transform.quantized.fill_(True)
    transform.active = True
    weight = torch.zeros(2, 8, dtype=dtype)
    upstream = (torch.linspace(-2.0, 2.0, 16) + 0.3).reshape(2, 8).to(dtype)  # no entry near 0
    (transform(weight) * upstream).sum().backward()
    assert transform.centroids.grad.dtype == dtype
    blocks, owners = upstream.double().reshape(-1, 2), assignments.flatten()
    u = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -24
    for c in range(4):
        mine = blocks[owners == c]
        expected = mine.mean(0) if len(mine) else torch.zeros(2, dtype=torch.float64)
        tolerance = 2 * u * mine.abs().sum(0) if len(mine) else torch.zeros(2, dtype=torch.float64)
        assert ((transform.centroids.grad[c].double() - expected).abs() <= tolerance).all(), c


def test_a_codebook_says_its_size_block_and_state_when_printed() -> None:
    """A model's printout (e.g. Lightning's summary) shows each codebook as k centroids of
    block_size entries, and whether the weight is its codewords yet."""
    transform = CentroidWeight(torch.Size((6, 8)), block_size=2, k=4)
    assert repr(transform) == "CentroidWeight(k=4, block_size=2, quantized=False)"
    transform.quantize(torch.randn(6, 8), iterations=2, generator=torch.Generator().manual_seed(0))
    assert repr(transform) == "CentroidWeight(k=4, block_size=2, quantized=True)"


def test_stages_quantize_in_turn_and_restart_the_optimiser(tmp_path: Path) -> None:
    class Spy(L.Callback):
        def __init__(self) -> None:
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            active = [weight_transforms(m)[0].active for m in (pl_module.hidden, pl_module.embed, pl_module.out)]
            assert quantizer.quantized_stages == sum(active)
            # the optimiser itself, not its id(): a freed optimiser's id can be given to the next one
            self.seen.append((trainer.global_step, active, trainer.optimizers[0]))

    L.seed_everything(0)
    model, spy, quantizer = BagOfWordsClassifier(), Spy(), ipq(start_step=2)
    trainer(tmp_path, [quantizer, spy], max_steps=12).fit(model, classification_data())
    active = {step: flags for step, flags, _ in spy.seen}
    assert active[2] == [False, False, False]  # global_step after the step; stage 0 begins at step 2
    assert active[3] == [True, False, False] and active[7] == [True, True, False] and active[11] == [True, True, True]
    assert len({optimizer for _, _, optimizer in spy.seen}) == 4  # the first optimiser and one per stage
    # Quantized weights are exactly their codewords; the latent weight is kept, untouched since its stage.
    transform = weight_transforms(model.hidden)[0]
    torch.testing.assert_close(model.hidden.weight, transform.centroids[transform.assignments].reshape(16, 16))


def test_resume_in_the_middle_of_a_stage_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight, resumed = resumed_and_uninterrupted(tmp_path, BagOfWordsClassifier, lambda: [ipq()],
                                                  classification_data, stop=6, total=14)
    assert_same_state(straight, resumed, tolerance=0)


def test_a_stage_selecting_nothing_and_a_block_size_not_dividing_are_errors() -> None:
    with pytest.raises(ValueError, match=r"^IterativeProductQuantization: stage 1 \['decoder\*'\] selects no"):
        ipq(stages=[["hidden"], ["decoder*"]]).add_codebooks(BagOfWordsClassifier())
    with pytest.raises(ValueError, match=r"^IterativeProductQuantization: stage 1 \['hidden'\] selects no .*not taken "
                                         r"by an earlier stage"):
        ipq(stages=[["hidden"], ["hidden"]]).add_codebooks(BagOfWordsClassifier())
    with pytest.raises(ValueError, match=r"^IterativeProductQuantization: block size 5 does not divide the 16 columns of hidden.weight"):
        ipq(block_size=5).add_codebooks(BagOfWordsClassifier())


def test_every_accepted_seed_quantizes() -> None:
    """The largest seed __init__ accepts (2**63 - 1) learns codebooks, as seed 0 does: the
    per-layer seed derived from it stays a valid generator seed."""
    for seed in (0, 2 ** 63 - 1):
        model = BagOfWordsClassifier()
        ipq(stages=[["hidden"], ["out"]], seed=seed).quantize_post_training(model)
        assert all(weight_transforms(layer)[-1].active for layer in (model.hidden, model.out))


def test_a_layer_goes_to_the_first_stage_that_selects_it() -> None:
    """Stages [hidden], [*]: the second stage takes every other layer (embed and out), not hidden."""
    callback = ipq(stages=[["hidden"], ["*"]])
    callback.add_codebooks(BagOfWordsClassifier())
    assert [[names for _, _, names in targets] for targets in callback._stage_targets] == \
        [[["hidden"]], [["embed"], ["out"]]]


def test_codebooks_are_learnt_from_the_masked_weight_and_a_tied_weight_once() -> None:
    """A pruned layer's codebook is k-means of its masked weight, without the Quant-Noise of the
    step (here int4 noise on every block, in training mode): the same codebook as that of a copy
    whose weight holds the zeros itself (same stage, same place in it, so the same seed). Three
    layers, the middle one tied to the first: one codebook for the tied pair, and the third layer
    is quantized too, with as many centroids as it has blocks (2 of 4 columns) where that is fewer
    than asked."""
    import copy
    from callbacks._pruning import PruningMask
    from callbacks._transforms import add_weight_transform
    from callbacks.quant_noise import NoisyWeight

    torch.manual_seed(0)
    masked = BagOfWordsClassifier()
    zeroed = copy.deepcopy(masked)
    mask = torch.ones(16, 16)
    mask[:, :8] = 0  # the first two blocks of 4 of every row
    add_weight_transform(masked.hidden, PruningMask(masked.hidden.weight)).mask.copy_(mask)
    noise = add_weight_transform(masked.hidden, NoisyWeight("int4", p=0.5, block_size=4, per_channel=True)).train()
    noise.mask = torch.ones(16, 4, dtype=torch.bool)  # this step's noised blocks: all of them
    with torch.no_grad():
        zeroed.hidden.weight.mul_(mask)
    codebooks = []
    for model in (masked, zeroed):
        ipq(stages=[["hidden"]], kmeans_iterations=5).quantize_post_training(model)
        codebooks.append(weight_transforms(model.hidden)[-1])
    assert torch.equal(codebooks[0].centroids, codebooks[1].centroids)
    assert torch.equal(codebooks[0].assignments, codebooks[1].assignments)

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)
            self.b.weight = self.a.weight

    tied = Tied()
    IterativeProductQuantization(stages=[["*"]], centroids=4, block_size=4, block_sizes={}).quantize_post_training(tied)
    a, b, c = (weight_transforms(getattr(tied, name))[0] for name in "abc")
    assert a is b and a.active and c.active
    assert a.centroids.shape == (4, 4) and c.centroids.shape == (2, 4)


def test_with_quant_noise_the_paper_recipe(tmp_path: Path) -> None:
    """Quant-Noise on the layers still dense, codebooks on the quantized ones, in one run."""
    L.seed_everything(0)
    model = BagOfWordsClassifier()
    trainer(tmp_path, [ipq(), QuantNoise(p=0.2, scheme="pq", block_size=4)], max_steps=10).fit(
        model, classification_data())
    assert [type(t).__name__ for t in weight_transforms(model.hidden)] == ["NoisyWeight", "CentroidWeight"]
    model.train()
    weights = model.hidden.weight  # stage 0 is quantized: the codewords, whatever the noise
    assert torch.equal(weights, weight_transforms(model.hidden)[1](trainable_weight(model.hidden)))


def test_yaml_instantiation() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--ipq", type=IterativeProductQuantization)
    config = parser.parse_string("""
ipq:
  class_path: callbacks.IterativeProductQuantization
  init_args: {steps_per_stage: 100, stages: [["*.ffn.*"], ["*attn.*"]], centroid_bits: 8}
""")
    callback = parser.instantiate_classes(config).ipq
    assert callback.stages == [["*.ffn.*"], ["*attn.*"]] and callback.centroid_bits == 8


def test_checkpoint_and_export_of_a_translation_model(prepared_dir: Path, tmp_path: Path) -> None:
    from nmt_lightning.loading import load_translation_module
    from nmt_lightning.translation_file import export_checkpoint, load_exported
    from nmt_lightning.translate import translate_lines
    from tests.conftest import train_tiny_checkpoint

    checkpoint = train_tiny_checkpoint(prepared_dir, tmp_path, callbacks=(
        IterativeProductQuantization(steps_per_stage=8, centroids=16),))
    manifest = torch.load(checkpoint, weights_only=True)["compression"]
    assert manifest["model.decoder_layers.0.ffn.fc1.weight"][0]["codec"] == "ipq"
    assert manifest["model.output_projection.weight"][0]["block_size"] == 8
    assert manifest["model.encoder_layers.0.self_attn.q_proj.weight"][0]["block_size"] == 4
    ipq_file = export_checkpoint(checkpoint, tmp_path / "ipq.safetensors")
    fp32_file = export_checkpoint(checkpoint, tmp_path / "fp32.safetensors", "fp32")
    assert ipq_file.quantization == "ipq" and ipq_file.bytes_on_disk < fp32_file.bytes_on_disk

    def weight_bytes(path: Path) -> int:  # without the sentencepiece models, which dominate a tiny file
        with safe_open(str(path), framework="pt") as handle:
            return sum(handle.get_tensor(k).nbytes for k in handle.keys() if not k.startswith("tokenization."))

    # uint8 per block of 8 (4 in attention) against 4 bytes a weight; biases and norms stay fp32
    assert weight_bytes(tmp_path / "ipq.safetensors") < 0.3 * weight_bytes(tmp_path / "fp32.safetensors")
    exported = load_exported(tmp_path / "ipq.safetensors")
    trained = load_translation_module(checkpoint)
    # fp16 codebooks: each codeword within fp16's relative rounding (2^-11) of the trained one
    fc1 = trained.model.decoder_layers[0].ffn.fc1.weight
    torch.testing.assert_close(exported.model.decoder_layers[0].ffn.fc1.weight, fc1, rtol=2 ** -11, atol=1e-7)
    lines = (prepared_dir / "test.en").read_text(encoding="utf-8").splitlines()[:8]
    translations = translate_lines(exported, lines, beam=2, progress=False)
    assert len(translations) == 8 and translations == translate_lines(trained, lines, beam=2, progress=False)


def test_ipq_codec_decodes_without_a_stored_shape_and_files_that_have_one() -> None:
    from nmt_lightning.export.codecs import decode_chain, encode_chain

    centroids, assignments = torch.randn(16, 4), torch.randint(0, 16, (6, 3))
    weight = centroids[assignments].reshape(6, 12)
    step = {"codec": "ipq", "block_size": 4, "centroids": "c", "assignments": "a"}
    parts = encode_chain(weight, [step], {"c": centroids, "a": assignments}.__getitem__)
    assert "shape" not in parts
    torch.testing.assert_close(decode_chain(parts, [step]), weight, rtol=2 ** -11, atol=0)
    older = {**parts, "shape": torch.tensor([6, 12])}  # as files written before the shape was dropped
    assert torch.equal(decode_chain(older, [step]), decode_chain(parts, [step]))


@pytest.mark.parametrize("codewords", [257, 1000, 4096, 65536])
def test_indices_of_codebooks_above_256_words_are_packed_to_their_bits(codewords: int) -> None:
    from nmt_lightning.export.codecs import decode_chain, encode_chain

    generator = torch.Generator().manual_seed(codewords)
    centroids = torch.randn(codewords, 2, generator=generator)
    assignments = torch.randint(0, codewords, (7, 5), generator=generator)
    assignments[0, 0], assignments[-1, -1] = 0, codewords - 1  # both ends of the range
    weight = centroids[assignments].reshape(7, 10)
    step = {"codec": "ipq", "block_size": 2, "centroids": "c", "assignments": "a"}
    parts = encode_chain(weight, [step], {"c": centroids, "a": assignments}.__getitem__)
    bits = (codewords - 1).bit_length()  # 9, 10, 12, 16
    assert parts[""].dtype == torch.uint8 and parts[""].numel() == -(-35 * bits // 8)
    assert parts["index_layout"].tolist() == [7, 5, bits]
    torch.testing.assert_close(decode_chain(parts, [step]), weight, rtol=2 ** -11, atol=0)


def test_int16_indices_of_older_files_read_as_unsigned() -> None:
    from nmt_lightning.export.codecs import decode_chain

    centroids = torch.randn(40000, 1)
    assignments = torch.tensor([[3, 39999]])
    older = {"": assignments.to(torch.int16), "centroids": centroids.half()}  # 39999 wraps to -25537
    step = {"codec": "ipq", "block_size": 1, "centroids": "c", "assignments": "a"}
    assert torch.equal(decode_chain(older, [step]), centroids[assignments].reshape(1, 2).half().float())


def test_centroid_counts_give_chosen_layers_a_larger_codebook() -> None:
    model = BagOfWordsClassifier()
    callback = ipq(centroid_counts={"embed": 32})
    callback.add_codebooks(model)
    sizes = {name: weight_transforms(getattr(model, name))[0].centroids.shape[0] for name in ("hidden", "embed")}
    assert sizes == {"hidden": 8, "embed": 32}
    with pytest.raises(ValueError, match=r"centroid_counts\['embed'\] must be an integer in \[1, 65536\]"):
        ipq(centroid_counts={"embed": 0})
    with pytest.raises(ValueError, match="trained with .* but this callback has"):
        ipq().load_state_dict(callback.state_dict())  # another codebook layout does not resume


def test_int8_codebooks_export_nothing_in_fp32(prepared_dir: Path, tmp_path: Path) -> None:
    """centroid_bits=8, the paper's "iPQ & int8": int8 codebooks, and what stays dense (here the
    biases and LayerNorm parameters, and the layers a later stage would have quantized) in 8 bits:
    nothing is stored as fp32 but the scales and ranges beside 8-bit values."""
    import json

    from nmt_lightning.loading import load_translation_module
    from nmt_lightning.translation_file import export_checkpoint, load_exported
    from nmt_lightning.translate import translate_lines
    from tests.conftest import train_tiny_checkpoint

    checkpoint = train_tiny_checkpoint(prepared_dir, tmp_path, max_steps=12, callbacks=(
        IterativeProductQuantization(steps_per_stage=8, centroids=16, centroid_bits=8),))  # 2 of 3 stages
    report = export_checkpoint(checkpoint, tmp_path / "ipq_int8.safetensors")
    fp32 = export_checkpoint(checkpoint, tmp_path / "fp32.safetensors", "fp32")
    assert report.bytes_on_disk < fp32.bytes_on_disk
    with safe_open(str(tmp_path / "ipq_int8.safetensors"), framework="pt") as handle:
        wide = {key: handle.get_tensor(key) for key in handle.keys()
                if handle.get_tensor(key).dtype == torch.float32 and handle.get_tensor(key).numel() > 2}
        codecs = {name: [step["codec"] for step in entry["codecs"]]
                  for name, entry in json.loads(handle.metadata()["weights"]).items()}
    assert not wide, sorted(wide)
    assert {"ipq", "int8", "affine8"} == {c for steps in codecs.values() for c in steps}  # a stage not yet run: int8
    trained = load_translation_module(checkpoint).model
    exported = load_exported(tmp_path / "ipq_int8.safetensors").model
    for name, parameter in trained.named_parameters():
        if parameter.dim() == 1:  # affine8: within half a level, a 510th of the tensor's spread
            spread = float(parameter.detach().max() - parameter.detach().min())
            torch.testing.assert_close(exported.get_parameter(name), parameter.detach(), rtol=0,
                                       atol=spread / 510 * (1 + 1e-5) + 1e-7)
    lines = (prepared_dir / "test.en").read_text(encoding="utf-8").splitlines()[:4]
    assert len(translate_lines(load_exported(tmp_path / "ipq_int8.safetensors"), lines, beam=2, progress=False)) == 4


def test_ipq_under_qat_is_refused_at_export_naming_both(prepared_dir: Path, tmp_path: Path) -> None:
    from callbacks import QuantizationAwareTraining
    from nmt_lightning.errors import ModelFileError
    from nmt_lightning.translation_file import export_checkpoint
    from tests.conftest import train_tiny_checkpoint

    checkpoint = train_tiny_checkpoint(prepared_dir, tmp_path, callbacks=(
        IterativeProductQuantization(steps_per_stage=8, centroids=16), QuantizationAwareTraining()))
    with pytest.raises(ModelFileError, match="recorded as ipq then int8; two quantizing steps do not compose"):
        export_checkpoint(checkpoint, tmp_path / "model.safetensors")


def test_two_process_ddp_keeps_codebooks_identical(tmp_path: Path) -> None:
    import json

    from tests.conftest import run_script

    run_script("ipq_ddp.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert any(key.endswith("centroids") for key in ranks[0])
    assert all(ranks[0][key] for key in ranks[0] if key.endswith("quantized"))  # every stage ran
    assert ranks[0] == ranks[1]


def test_post_training_ipq_export_from_the_command_line(trained_checkpoint: Path, prepared_dir: Path,
                                                        tmp_path: Path) -> None:
    """``export --quantize ipq``: the callback's k-means on every stage of a plain checkpoint,
    no fine-tuning; a checkpoint that already trained with compression is refused."""
    from nmt_lightning.checkpoint_reading import read_checkpoint
    from nmt_lightning.cli import main
    from nmt_lightning.errors import ModelFileError
    from nmt_lightning.translation_file import export_checkpoint, load_exported
    from nmt_lightning.module import TranslationModule
    from nmt_lightning.translate import translate_lines
    from tests.conftest import train_tiny_checkpoint

    output = tmp_path / "ipq.safetensors"
    assert main(["export", "--checkpoint", str(trained_checkpoint), "--output", str(output), "--quantize", "ipq"]) == 0
    exported = load_exported(output)
    checkpoint = read_checkpoint(trained_checkpoint)
    reference = TranslationModule.from_hyperparameters(checkpoint["hyper_parameters"])
    reference.load_state_dict(checkpoint["state_dict"])
    IterativeProductQuantization().quantize_post_training(reference)
    for name in ("decoder_layers.0.ffn.fc1", "encoder_layers.0.self_attn.q_proj", "output_projection"):
        expected = reference.model.get_submodule(name).weight.detach()
        # fp16 codebooks: each codeword within fp16's relative rounding (2^-11) of k-means' one
        torch.testing.assert_close(exported.model.get_submodule(name).weight, expected, rtol=2 ** -11, atol=1e-7)
    lines = (prepared_dir / "test.en").read_text(encoding="utf-8").splitlines()[:4]
    assert len(translate_lines(exported, lines, beam=2, progress=False)) == 4
    compressed = train_tiny_checkpoint(prepared_dir, tmp_path / "qat", callbacks=(QuantNoise(),))
    with pytest.raises(ModelFileError, match="post-training iPQ quantizes an uncompressed model"):
        export_checkpoint(compressed, tmp_path / "twice.safetensors", "ipq")


def test_the_default_stages_are_fairseqs_order_on_a_translation_model(prepared_dir: Path, tmp_path: Path) -> None:
    """Stock et al. / fairseq quantize a Transformer's feed-forward layers first, then the
    embeddings (with the output projection tied to them), then attention; one stage a step here."""
    from tests.conftest import tiny_module, tiny_trainer

    module, datamodule = tiny_module(prepared_dir)
    quantization = IterativeProductQuantization(steps_per_stage=1, centroids=4, kmeans_iterations=1)
    stages: list[set[str]] = []

    def record(trainer, pl_module, *_):
        stages.append({name for name, m in pl_module.named_modules()
                       if any(isinstance(t, CentroidWeight) and t.active for t in weight_transforms(m))})

    probe = L.pytorch.callbacks.LambdaCallback(on_train_batch_start=record)
    tiny_trainer(tmp_path, max_steps=3, callbacks=[quantization, probe]).fit(module, datamodule=datamodule)
    feed_forward = {f"model.{side}_layers.0.ffn.{fc}" for side in ("encoder", "decoder") for fc in ("fc1", "fc2")}
    embeddings = {"model.src_embed", "model.output_projection"}  # shared embedding (tgt_embed is src_embed)
    attention = {f"model.{layer}.{projection}" for layer in ("encoder_layers.0.self_attn", "decoder_layers.0.self_attn",
                                                            "decoder_layers.0.cross_attn")
                 for projection in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert stages[0] == feed_forward
    assert stages[1] - {"model.tgt_embed"} == feed_forward | embeddings
    assert stages[2] - {"model.tgt_embed"} == feed_forward | embeddings | attention


def test_a_checkpoint_states_settings_under_their_names() -> None:
    """The callback's checkpoint entry, written out as checkpoints hold it: it resumes under the same
    settings, and one setting changed (the centroid counts per layer) is refused."""
    from callbacks import IterativeProductQuantization

    written = {"stages": [["*.ffn.*"], ["*embed*", "*output_projection"], ["*attn.*"]], "centroids": 256,
               "block_size": 8, "block_sizes": {"*attn.*": 4}, "steps_per_stage": 1000, "start_step": 0,
               "centroid_counts": None}
    callback = IterativeProductQuantization()
    assert callback.state_dict() == written
    callback.load_state_dict(written)
    with pytest.raises(ValueError, match="^IterativeProductQuantization: the checkpoint trained with"):
        IterativeProductQuantization(centroid_counts={"*.ffn.*": 64}).load_state_dict(written)
