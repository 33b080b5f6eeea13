"""``nmt-lightning export``: fp32 and int8 safetensors files, loading them back, translating with them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from callbacks import QuantizationAwareTraining
from callbacks.quantization_aware_training import fake_quantize
from nmt_lightning.checkpoint_reading import read_checkpoint
from nmt_lightning.loading import load_for_device, load_translation_module
from nmt_lightning.cli import main
from nmt_lightning.errors import ModelFileError
from nmt_lightning.translation_file import export_checkpoint, load_exported
from nmt_lightning.export.codecs.int8_kernels import Int8Linear
from nmt_lightning.module import TranslationModule
from nmt_lightning.translate import translate_lines
from tests.conftest import train_tiny_checkpoint

QAT_SETTINGS = dict(per_channel=True, include=["model.*"], exclude=["model.encoder_layers.*.ffn.*"])


@pytest.fixture(scope="module")
def qat_checkpoint(prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model trained 30 steps with per-channel 8-bit QAT of everything but the encoder's FFN."""
    return train_tiny_checkpoint(prepared_dir, tmp_path_factory.mktemp("qat"),
                                 callbacks=(QuantizationAwareTraining(**QAT_SETTINGS),))


def source_lines(prepared_dir: Path, count: int = 12) -> list[str]:
    return (prepared_dir / "test.en").read_text(encoding="utf-8").splitlines()[:count]


def stored(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata()


def as_trained(checkpoint_path: Path, **settings) -> TranslationModule:
    """The checkpoint's model with its fake quantization in place, as in training (eval mode)."""
    checkpoint = read_checkpoint(checkpoint_path)
    module = TranslationModule.from_hyperparameters(checkpoint["hyper_parameters"])
    QuantizationAwareTraining(**settings).quantize_modules(module)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def test_fp32_export_round_trip(trained_checkpoint: Path, prepared_dir: Path, tmp_path: Path) -> None:
    report = export_checkpoint(trained_checkpoint, tmp_path / "model.safetensors")
    assert report.quantization == "fp32" and report.bytes_on_disk == (tmp_path / "model.safetensors").stat().st_size
    original = load_translation_module(trained_checkpoint)
    exported = load_exported(tmp_path / "model.safetensors")
    for name, tensor in original.model.state_dict().items():
        torch.testing.assert_close(exported.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    # Tied weights are stored once and still tied after loading.
    assert exported.model.output_projection.weight is exported.model.tgt_embed.weight
    lines = source_lines(prepared_dir)
    assert translate_lines(exported, lines, beam=2) == translate_lines(original, lines, beam=2)


def test_ptq_int8_export(trained_checkpoint: Path, prepared_dir: Path, tmp_path: Path) -> None:
    fp32 = export_checkpoint(trained_checkpoint, tmp_path / "fp32.safetensors")
    int8 = export_checkpoint(trained_checkpoint, tmp_path / "int8.safetensors", quantize="int8")
    assert int8.quantization == "int8" and int8.activations == "dynamic"
    weights, metadata = stored(tmp_path / "int8.safetensors")
    assert metadata["quantization"] == "int8"
    names = list(weights)
    linear_weights = [n for n in names if n.endswith("proj.weight") or n.endswith((".fc1.weight", ".fc2.weight"))]
    assert linear_weights and all(weights[n].dtype == torch.int8 for n in linear_weights)
    assert all(weights[n].abs().max() <= 127 for n in linear_weights)
    # The shared embedding and the tied output projection: one int8 table.
    assert weights["src_embed.weight"].dtype == torch.int8 and "output_projection.weight" not in weights
    entries = json.loads(metadata["weights"])
    assert entries["output_projection.weight"]["stored"] == "src_embed.weight"
    assert all(weights[n].dtype == torch.float32 for n in names if "norm" in n or n.endswith(".bias"))
    # Weights only: int8 values plus scales against the same tensors in fp32.
    fp32_weights, _ = stored(tmp_path / "fp32.safetensors")
    model_bytes = lambda w: sum(t.numel() * t.element_size() for n, t in w.items() if not n.startswith("tokenization."))
    assert model_bytes(weights) <= 0.30 * model_bytes(fp32_weights)
    assert int8.bytes_on_disk < fp32.bytes_on_disk

    module = load_exported(tmp_path / "int8.safetensors")
    quantized = {name: m for name, m in module.model.named_modules() if isinstance(m, Int8Linear)}
    assert "encoder_layers.0.self_attn.q_proj" in quantized and "output_projection" in quantized
    assert not any(type(m) is nn.Linear for m in module.model.modules())
    # Post-training: no activation ranges, so every layer quantizes its input per batch.
    assert not any(layer.static for layer in quantized.values())
    # The runtime's int8 weight is exactly the stored grid.
    values, scale = quantized["encoder_layers.0.self_attn.q_proj"].weight_values()
    torch.testing.assert_close(values, weights["encoder_layers.0.self_attn.q_proj.weight"])
    assert float(scale) == pytest.approx(float(weights["encoder_layers.0.self_attn.q_proj.weight.scale"]))
    lines = source_lines(prepared_dir)
    translations = translate_lines(module, lines, beam=2)
    assert len(translations) == len(lines) and all(isinstance(t, str) for t in translations)
    # FBGEMM's int8 kernels exist on CPU only: on another device (a GPU; "meta" here) the model
    # computes with its decoded weights in plain nn.Linear layers.
    assert any(isinstance(m, Int8Linear) for m in load_for_device(tmp_path / "int8.safetensors", "cpu").modules())
    elsewhere = load_for_device(tmp_path / "int8.safetensors", "meta")
    assert not any(isinstance(m, Int8Linear) for m in elsewhere.modules())
    assert elsewhere.model.encoder_layers[0].self_attn.q_proj.weight.device.type == "meta"


def test_qat_checkpoint_exports_its_trained_grid(qat_checkpoint: Path, tmp_path: Path) -> None:
    report = export_checkpoint(qat_checkpoint, tmp_path / "qat.safetensors")
    assert report.quantization == "int8" and report.activations == "static"
    weights, _ = stored(tmp_path / "qat.safetensors")
    # Per-channel scales, as trained; the excluded encoder FFN stays fp32.
    assert weights["decoder_layers.0.ffn.fc1.weight.scale"].shape == (64, 1)
    assert weights["encoder_layers.0.ffn.fc1.weight"].dtype == torch.float32
    assert "encoder_layers.0.ffn.fc1.weight.scale" not in weights

    trained = as_trained(qat_checkpoint, **QAT_SETTINGS)
    for name, module in trained.model.named_modules():
        if f"{name}.weight.scale" in weights:
            # The exported codes are exactly those of the fake-quantized forward pass.
            scale = weights[f"{name}.weight.scale"]
            codes = torch.round(module.weight.detach() / scale)
            torch.testing.assert_close(weights[f"{name}.weight"].float(), codes, rtol=0, atol=0, msg=name)
            torch.testing.assert_close(weights[f"{name}.weight"].float() * scale, module.weight.detach(),
                                       rtol=1e-6, atol=0, msg=name)
            if isinstance(module, nn.Linear):  # and the activation range it trained with
                assert float(weights[f"{name}.weight.activation_range"]) == float(module.input_quantizer.absmax) > 0


def test_deployed_int8_layers_compute_the_trained_arithmetic(qat_checkpoint: Path, tmp_path: Path) -> None:
    """Layer by layer, on the inputs the trained model really sees, the int8 kernel's output is the
    fake-quantized layer's, within a bound that follows from the arithmetic alone.

    Both round the input onto the same grid (step ``r / M`` for the range r), but the kernel
    computes x / step in its own way (vector widths, fused multiply-adds: it differs between
    CPUs), so an input within a float rounding of a midpoint may land one code apart; inputs
    below -r may take code -128, which training clips to -127. Each input's code is off by at
    most 1, so an output is off by at most ``step * sum_j |W_ij|``, plus the fp32 rounding of a
    scaled int32 sum. On a CPU without VNNI the kernel runs 7-bit codes on the same range
    (nmt_lightning/export/codecs/int8_kernels.py): the reference is then the 7-bit fake quantization.
    """
    export_checkpoint(qat_checkpoint, tmp_path / "qat.safetensors")
    deployed = load_exported(tmp_path / "qat.safetensors")
    trained = as_trained(qat_checkpoint, **QAT_SETTINGS)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args[0].detach()))
             for name, module in trained.model.named_modules() if hasattr(module, "input_quantizer")]
    generator = torch.Generator().manual_seed(0)
    source, decoder_input = torch.randint(4, 60, (6, 9), generator=generator), torch.randint(4, 60, (6, 7), generator=generator)
    source[:, -1] = 3
    with torch.no_grad():
        trained(source, decoder_input)
    for hook in hooks:
        hook.remove()
    checked = 0
    for name, layer in deployed.model.named_modules():
        if not isinstance(layer, Int8Linear):
            continue
        assert layer.static, name
        trained_layer = trained.model.get_submodule(name)
        x = inputs[name]
        weight = trained_layer.weight.detach()  # the int8 grid, dequantized
        with torch.no_grad():
            reference = nn.functional.linear(fake_quantize(x, torch.tensor(layer.input_absmax), layer.activation_bits),
                                             weight, trained_layer.bias)
            if layer.activation_bits == 8:  # the training graph itself
                torch.testing.assert_close(reference, trained_layer(x), rtol=1e-6, atol=1e-6, msg=name)
            actual = layer(x)
        step = layer.input_absmax / (2 ** (layer.activation_bits - 1) - 1)
        bound = step * weight.abs().sum(1) + 1e-5 * reference.abs() + 1e-5
        assert ((actual - reference).abs() <= bound).all(), (name, float(((actual - reference).abs() - bound).max()))
        checked += 1
    assert checked >= 10


def test_tied_weights_export_what_trained(prepared_dir: Path, tmp_path: Path) -> None:
    """The shared embedding and the tied output projection, when only one of them was quantized."""
    plain = QuantizationAwareTraining(quantize_embeddings=False)  # projection int8, embeddings fp32
    checkpoint = train_tiny_checkpoint(prepared_dir, tmp_path / "a", callbacks=(plain,))
    export_checkpoint(checkpoint, tmp_path / "a.safetensors")
    weights, _ = stored(tmp_path / "a.safetensors")
    assert weights["src_embed.weight"].dtype == torch.float32 and weights["output_projection.weight"].dtype == torch.int8
    module = load_exported(tmp_path / "a.safetensors")
    raw = read_checkpoint(checkpoint)["state_dict"]["model.src_embed.weight"]
    torch.testing.assert_close(module.model.src_embed.weight.detach(), raw, rtol=0, atol=0)
    assert isinstance(module.model.output_projection, Int8Linear)

    projection_excluded = QuantizationAwareTraining(exclude=["model.output_projection"])
    checkpoint = train_tiny_checkpoint(prepared_dir, tmp_path / "b", callbacks=(projection_excluded,))
    export_checkpoint(checkpoint, tmp_path / "b.safetensors")
    weights, _ = stored(tmp_path / "b.safetensors")
    assert weights["src_embed.weight"].dtype == torch.int8 and weights["output_projection.weight"].dtype == torch.float32
    module = load_exported(tmp_path / "b.safetensors")
    raw = read_checkpoint(checkpoint)["state_dict"]["model.output_projection.weight"]
    assert type(module.model.output_projection) is nn.Linear
    torch.testing.assert_close(module.model.output_projection.weight.detach(), raw, rtol=0, atol=0)
    assert not torch.equal(module.model.src_embed.weight, module.model.output_projection.weight)


def test_translating_a_qat_checkpoint_deploys_it_as_exported(qat_checkpoint: Path, prepared_dir: Path,
                                                             tmp_path: Path) -> None:
    direct = load_translation_module(qat_checkpoint)
    assert isinstance(direct.model.decoder_layers[0].ffn.fc1, Int8Linear)
    export_checkpoint(qat_checkpoint, tmp_path / "qat.safetensors")
    lines = source_lines(prepared_dir)
    assert translate_lines(direct, lines, beam=2) == translate_lines(load_exported(tmp_path / "qat.safetensors"), lines, beam=2)
    dense = load_translation_module(qat_checkpoint, quantize="fp32")
    assert not any(isinstance(m, Int8Linear) for m in dense.modules())


def test_files_of_the_first_format_still_load(trained_checkpoint: Path, prepared_dir: Path, tmp_path: Path) -> None:
    """0.1.0 wrote W and W.scale, a tied map and <layer>.input_absmax: such files still translate."""
    export_checkpoint(trained_checkpoint, tmp_path / "new.safetensors", quantize="int8")
    weights, metadata = stored(tmp_path / "new.safetensors")
    entries = json.loads(metadata.pop("weights"))
    tied = {name: entry["stored"] for name, entry in entries.items() if entry["stored"] != name}
    weights["encoder_layers.0.ffn.fc1.input_absmax"] = torch.tensor(4.0)
    save_file(weights, str(tmp_path / "old.safetensors"),
              metadata={**metadata, "format": "nmt-lightning-export/1", "bits": "8", "tied": json.dumps(tied)})
    old, new = load_exported(tmp_path / "old.safetensors"), load_exported(tmp_path / "new.safetensors")
    assert old.model.encoder_layers[0].ffn.fc1.static and not new.model.encoder_layers[0].ffn.fc1.static
    assert not old.model.encoder_layers[0].ffn.fc2.static and isinstance(old.model.output_projection, Int8Linear)
    lines = source_lines(prepared_dir)
    assert len(translate_lines(old, lines, beam=2)) == len(lines)


def test_sentencepiece_model_is_stored_compressed_and_raw_files_still_load(trained_checkpoint: Path, prepared_dir: Path,
                                                                           tmp_path: Path) -> None:
    """This format stores the sentencepiece model xz-compressed; format 2 stored it raw."""
    export_checkpoint(trained_checkpoint, tmp_path / "new.safetensors")
    weights, metadata = stored(tmp_path / "new.safetensors")
    spm_model = (prepared_dir / "spm.model").read_bytes()
    assert set(n for n in weights if n.startswith("tokenization.")) == {"tokenization.src_model.xz"}
    assert weights["tokenization.src_model.xz"].numel() < len(spm_model)
    assert load_exported(tmp_path / "new.safetensors").tokenization.src_model == spm_model
    del weights["tokenization.src_model.xz"]
    weights["tokenization.src_model"] = torch.frombuffer(bytearray(spm_model), dtype=torch.uint8)
    save_file(weights, str(tmp_path / "old.safetensors"), metadata={**metadata, "format": "nmt-lightning-export/2"})
    old = load_exported(tmp_path / "old.safetensors")
    assert old.tokenization.src_model == old.tokenization.tgt_model == spm_model
    lines = source_lines(prepared_dir)
    assert translate_lines(old, lines, beam=2) == translate_lines(load_exported(tmp_path / "new.safetensors"), lines, beam=2)
    # A damaged compressed model is an error that names the file and the tensor.
    del weights["tokenization.src_model"]
    weights["tokenization.src_model.xz"] = torch.zeros(64, dtype=torch.uint8)
    save_file(weights, str(tmp_path / "damaged.safetensors"), metadata=metadata)
    with pytest.raises(ModelFileError, match=r"damaged\.safetensors.*tokenization\.src_model\.xz"):
        load_exported(tmp_path / "damaged.safetensors")


def test_export_and_translate_from_the_command_line(trained_checkpoint: Path, prepared_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "model.int8.safetensors"
    assert main(["export", "--checkpoint", str(trained_checkpoint), "--output", str(output), "--quantize", "int8"]) == 0
    assert "int8, dynamic activation ranges" in capsys.readouterr().err
    hypotheses = tmp_path / "hyp.cs"
    assert main(["translate", "--checkpoint", str(output), "--input", str(prepared_dir / "test.en"),
                 "--output", str(hypotheses), "--beam", "2", "--ref", str(prepared_dir / "test.cs")]) == 0
    assert "BLEU" in capsys.readouterr().err
    assert len(hypotheses.read_text(encoding="utf-8").splitlines()) == len(source_lines(prepared_dir, 10**6))


def test_export_errors(trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", "--checkpoint", str(tmp_path / "missing.ckpt"), "--output", str(tmp_path / "x")]) == 2
    assert "missing.ckpt: no such checkpoint" in capsys.readouterr().err
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    assert main(["export", "--checkpoint", str(foreign), "--output", str(tmp_path / "x")]) == 2
    assert "not a checkpoint of a translation model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    assert main(["translate", "--checkpoint", str(other), "--input", str(other)]) == 2
    assert "not one written by 'nmt-lightning export'" in capsys.readouterr().err
    unknown = dict(read_checkpoint(trained_checkpoint), compression={"model.src_embed.weight": [{"codec": "zip", "order": 1}]})
    torch.save(unknown, tmp_path / "unknown.ckpt")
    assert main(["export", "--checkpoint", str(tmp_path / "unknown.ckpt"), "--output", str(tmp_path / "x")]) == 2
    assert "codec 'zip' is not known" in capsys.readouterr().err


def test_init_from_starts_from_the_weights(trained_checkpoint: Path, qat_checkpoint: Path, tmp_path: Path) -> None:
    original = load_translation_module(trained_checkpoint)
    hyper_parameters = read_checkpoint(trained_checkpoint)["hyper_parameters"]
    module = TranslationModule(**{**hyper_parameters, "init_from": str(trained_checkpoint)})
    for name, tensor in original.model.state_dict().items():
        torch.testing.assert_close(module.model.state_dict()[name], tensor, rtol=0, atol=0)
    # The saved hyper-parameters do not send a later load back to that file.
    assert TranslationModule.from_hyperparameters(module.hparams).hparams.init_from is None
    # From a QAT checkpoint: its trainable weights, without the callback's ranges.
    from_qat = TranslationModule(**{**hyper_parameters, "init_from": str(qat_checkpoint)})
    raw = read_checkpoint(qat_checkpoint)["state_dict"]["model.decoder_layers.0.ffn.fc1.parametrizations.weight.original"]
    torch.testing.assert_close(from_qat.model.decoder_layers[0].ffn.fc1.weight.detach(), raw, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="init_from: .*nowhere.ckpt: no such checkpoint"):
        TranslationModule(**{**hyper_parameters, "init_from": str(tmp_path / "nowhere.ckpt")})
    with pytest.raises(ValueError, match="init_from: .*weights do not fit this model"):
        TranslationModule(**{**hyper_parameters, "d_model": 16, "init_from": str(trained_checkpoint)})


def test_a_compressed_checkpoint_without_its_callbacks_says_what_to_do(qat_checkpoint: Path, prepared_dir: Path,
                                                                      tmp_path: Path) -> None:
    from nmt_lightning.data import TranslationDataModule
    from tests.conftest import tiny_trainer

    module = TranslationModule.from_hyperparameters(read_checkpoint(qat_checkpoint)["hyper_parameters"])
    with pytest.raises(ValueError, match="trained with compression callbacks .*run with the same callbacks"):
        tiny_trainer(tmp_path).test(module, datamodule=TranslationDataModule(str(prepared_dir), max_tokens=256),
                                    ckpt_path=qat_checkpoint, verbose=False)
