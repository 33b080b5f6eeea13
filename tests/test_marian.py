"""A Hugging Face MarianMTModel (recipes/huggingface/marian.py) as a client of the callbacks.

Random weights from a small MarianConfig, no download; skipped without the ``huggingface`` extra."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parents[1] / "recipes" / "huggingface"))

from marian import (EMBEDDINGS, LAYERS, POSITIONS, MarianTranslation, compression_callbacks,  # noqa: E402
                    reversal_data)

from callbacks import (IterativeProductQuantization, KnowledgeDistillation, LotteryTicketPruning,  # noqa: E402
                       ProgressiveKnowledgeTransfer, QuantizationAwareTraining, QuantNoise)
from callbacks._transforms import weight_transforms  # noqa: E402
from nmt_lightning.export import export_module, load_module  # noqa: E402
from tests.callbacks.helpers import trainer  # noqa: E402

SOURCE, TARGET = next(iter(reversal_data(samples=16, seed=3, batch_size=16)))


def fit(tmp_path: Path, callbacks: list, steps: int = 6, module: MarianTranslation | None = None) -> MarianTranslation:
    L.seed_everything(0)
    module = module or MarianTranslation()
    run = trainer(tmp_path, callbacks, max_steps=steps)
    run.fit(module, reversal_data(samples=64))
    run.save_checkpoint(tmp_path / "model.ckpt")
    return module


def outputs(module: MarianTranslation) -> torch.Tensor:
    decoder_input = torch.cat([torch.zeros_like(TARGET[:, :1]), TARGET[:, :-1]], dim=1)
    with torch.no_grad():
        return module.eval()(SOURCE, decoder_input)


@pytest.mark.parametrize("make", [
    lambda: [QuantizationAwareTraining(include=["model.model.*_attn.*", "model.model.*.fc?"], exclude=[POSITIONS],
                                       quantize_embeddings=False)],
    lambda: [QuantNoise(p=0.2, scheme="int4", block_size=4, include=["model.model.*"], exclude=[POSITIONS])],
    lambda: [IterativeProductQuantization(steps_per_stage=2, stages=[["model.model.*.fc?"], ["model.model.*_attn.*"]],
                                          centroids=8, block_size=4, block_sizes={})],
    lambda: [LotteryTicketPruning(sparsity=0.5, rounds=1, round_steps=3, rewind_step=1, include=["model.model.*"],
                                  exclude=[POSITIONS], prune_embeddings=True)],
    lambda: compression_callbacks(steps_per_stage=3),
], ids=["qat", "quant_noise_int4", "ipq", "lottery_ticket", "composed"])
def test_each_callback_and_all_at_once_export_and_reload(tmp_path: Path, make) -> None:
    """Trained, exported through the checkpoint's codecs, loaded into a fresh MarianTranslation:
    every compressed weight decodes to what the compressed model computed with in training (the
    same integer grids, one float32 rounding apart; iPQ's codewords in fp16, its default; the
    ticket's zeros; Quant-Noise's int4 grid, which training's evaluation does not apply), and
    each QAT layer, run as an int8 layer, stays within one activation level per input of the
    fake-quantized layer (the bound of tests/test_module_export.py)."""
    from callbacks.quantization_aware_training import InputQuantizer, round_to_grid, weight_absmax
    from nmt_lightning.export.codecs.int8_kernels import static_activation_bits

    callbacks = make()
    trained = fit(tmp_path, callbacks).eval()
    report = export_module(tmp_path / "model.ckpt", MarianTranslation(), tmp_path / "model.safetensors")
    assert report.bytes_on_disk < report.weight_bytes_fp32
    plain = load_module(MarianTranslation(), tmp_path / "model.safetensors", runtime_layers=False)
    noise = isinstance(callbacks[0], QuantNoise)
    for name, module in trained.named_modules():
        if not weight_transforms(module):
            continue
        weight = module.weight.detach()
        if noise:
            weight = round_to_grid(weight, weight_absmax(weight, True), 4)
        torch.testing.assert_close(plain.get_submodule(name).weight, weight, rtol=2 ** -10, atol=1e-7, msg=name)
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        def hook(module, args, output) -> None:  # returns None: the layer's output stays its own
            inputs.setdefault(name, args[0].detach())
        return hook

    hooks = [m.register_forward_hook(keep_input(n)) for n, m in trained.named_modules()
             if isinstance(getattr(m, "input_quantizer", None), InputQuantizer)]
    outputs(trained)
    for hook in hooks:
        hook.remove()
    loaded = load_module(MarianTranslation(), tmp_path / "model.safetensors")
    levels = 2 ** (static_activation_bits() - 1) - 1
    for name, x in inputs.items():
        layer = trained.get_submodule(name)
        bound = layer.weight.detach().abs().sum(1) * float(layer.input_quantizer.absmax) / levels
        with torch.no_grad():
            assert ((loaded.get_submodule(name)(x) - layer(x)).abs() <= bound + 1e-5).all(), name
    if not inputs and not noise:  # no input quantization: the whole model computes alike
        torch.testing.assert_close(outputs(loaded), outputs(trained), rtol=2e-3, atol=2e-3)


def test_distilled_from_a_larger_marian_teacher_through_the_protocol(tmp_path: Path) -> None:
    teacher = fit(tmp_path / "teacher", [], steps=4, module=MarianTranslation(d_model=48, layers=3, heads=4))
    distillation = KnowledgeDistillation(str(tmp_path / "teacher" / "model.ckpt"), hidden_weight=1.0,
                                         layer_map={"decoder.2": "decoder.3"}, hard_weight=0.5)
    student = fit(tmp_path / "student", [distillation], steps=4)
    assert isinstance(distillation.teacher.module, MarianTranslation) and distillation.teacher.module is not teacher
    assert student.terms == {} and student.weights["cross_entropy"] == 1.0  # removed and restored after the fit
    # The width projection (32 -> 48) trained, and the student reloads into its own class.
    MarianTranslation.load_from_checkpoint(tmp_path / "student" / "model.ckpt", weights_only=True)


def test_layer_wise_transfer_reads_marians_features(tmp_path: Path) -> None:
    """PKT through the feature protocol: one stage per layer (2 + 2), then distillation."""
    fit(tmp_path / "teacher", [], steps=4, module=MarianTranslation(ffn_dim=128))
    transfer = ProgressiveKnowledgeTransfer(str(tmp_path / "teacher" / "model.ckpt"), stage_steps=1,
                                            layer_modules=LAYERS, embedding_modules=EMBEDDINGS,
                                            teacher_inputs=["source", "decoder_input"])
    fit(tmp_path / "student", [transfer], steps=6)
    assert transfer.stage == 4 and transfer.depth == {"encoder": 2, "decoder": 2}


def test_structured_pruning_cuts_marians_heads_and_neurons(tmp_path: Path) -> None:
    """Marian's attention (q/k/v/out_proj, num_heads) and its layers' fc1/fc2 are found; the
    export holds the smaller matrices and the reloaded model computes what the masked one did."""
    from callbacks import StructuredPruning

    pruning = StructuredPruning(prune_heads=0.5, prune_neurons=0.5, start_step=2, end_step=4, frequency=2,
                                include=["model.model.*"])
    trained = fit(tmp_path, [pruning]).eval()
    assert {group.kind for group in pruning.groups} == {"heads", "neurons"}
    export_module(tmp_path / "model.ckpt", MarianTranslation(), tmp_path / "pruned.safetensors")
    loaded = load_module(MarianTranslation(), tmp_path / "pruned.safetensors")
    attention = loaded.model.model.encoder.layers[0].self_attn
    assert attention.num_heads == 1 and tuple(attention.q_proj.weight.shape) == (16, 32)
    assert tuple(loaded.model.model.decoder.layers[0].fc1.weight.shape) == (32, 32)
    torch.testing.assert_close(outputs(loaded), outputs(trained), rtol=1e-5, atol=1e-5)
