"""``nmt-lightning export``: fp32 and int8 safetensors files, loading them back, translating with them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from callbacks import QuantizationAwareTraining
from callbacks.quantization_aware_training import QATLinear, weight_absmax
from nmt_lightning.checkpoints import load_translation_module
from nmt_lightning.cli import main
from nmt_lightning.errors import CorpusError
from nmt_lightning.export import export_checkpoint, load_exported
from nmt_lightning.int8 import Int8Linear
from nmt_lightning.module import TranslationModule
from nmt_lightning.translate import translate_lines
from tests.conftest import train_tiny_checkpoint



@pytest.fixture(scope="module")
def qat_checkpoint(prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model trained 30 steps with per-channel 8-bit QAT of everything but the encoder's FFN."""
    callback = QuantizationAwareTraining(per_channel=True, include=["model.*"], exclude=["model.encoder_layers.*.ffn.*"])
    return train_tiny_checkpoint(prepared_dir, tmp_path_factory.mktemp("qat"), callbacks=(callback,))


def source_lines(prepared_dir: Path, count: int = 12) -> list[str]:
    return (prepared_dir / "test.en").read_text(encoding="utf-8").splitlines()[:count]


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
    with safe_open(str(tmp_path / "int8.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
        weights = {name: handle.get_tensor(name) for name in names}
        assert handle.metadata()["quantization"] == "int8"
    linear_weights = [n for n in names if n.endswith("proj.weight") or n.endswith((".fc1.weight", ".fc2.weight"))]
    assert linear_weights and all(weights[n].dtype == torch.int8 for n in linear_weights)
    assert all(weights[n].abs().max() <= 127 for n in linear_weights)
    assert weights["src_embed.weight"].dtype == torch.int8 and "output_projection.weight" not in weights
    assert all(weights[n].dtype == torch.float32 for n in names if "norm" in n or n.endswith(".bias"))
    # Weights only: int8 values plus scales against the same tensors in fp32.
    model_bytes = lambda w: sum(t.numel() * t.element_size() for n, t in w.items() if not n.startswith("tokenization."))
    with safe_open(str(tmp_path / "fp32.safetensors"), framework="pt") as handle:
        fp32_weights = {name: handle.get_tensor(name) for name in handle.keys()}
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


def test_qat_checkpoint_exports_int8_by_default(qat_checkpoint: Path, prepared_dir: Path, tmp_path: Path) -> None:
    report = export_checkpoint(qat_checkpoint, tmp_path / "qat.safetensors")
    assert report.quantization == "int8" and report.activations == "static"
    checkpoint = torch.load(qat_checkpoint, map_location="cpu", weights_only=False)
    with safe_open(str(tmp_path / "qat.safetensors"), framework="pt") as handle:
        weights = {name: handle.get_tensor(name) for name in handle.keys()}
    # Per-channel scales, as trained; the excluded encoder FFN stays fp32.
    assert weights["decoder_layers.0.ffn.fc1.weight.scale"].shape == (64, 1)
    assert weights["encoder_layers.0.ffn.fc1.weight"].dtype == torch.float32
    assert "encoder_layers.0.ffn.fc1.weight.scale" not in weights

    # The exported grid is the one the fake-quantized forward pass used.
    trained = TranslationModule.from_hyperparameters(checkpoint["hyper_parameters"])
    QuantizationAwareTraining(per_channel=True, include=["model.*"],
                              exclude=["model.encoder_layers.*.ffn.*"]).quantize_modules(trained)
    trained.load_state_dict(checkpoint["state_dict"])
    fc1 = trained.model.decoder_layers[0].ffn.fc1
    assert isinstance(fc1, QATLinear) and bool(fc1.fake_quant_enabled)
    step = weight_absmax(fc1.weight, per_channel=True) / 127
    torch.testing.assert_close(weights["decoder_layers.0.ffn.fc1.weight"].float() * step, fc1.quantized_weight().detach())

    # Each quantized Linear's activation range is stored, and the loaded layer quantizes with it.
    assert float(weights["decoder_layers.0.ffn.fc1.input_absmax"]) == float(fc1.input_absmax) > 0
    module = load_exported(tmp_path / "qat.safetensors")
    deployed = module.model.decoder_layers[0].ffn.fc1
    assert isinstance(deployed, Int8Linear) and deployed.static and deployed.input_absmax == float(fc1.input_absmax)
    assert type(module.model.encoder_layers[0].ffn.fc1) is nn.Linear
    trained.eval()
    source = torch.tensor([[5, 6, 7, 8, 3]])
    decoder_input = torch.tensor([[2, 9, 10]])
    with torch.no_grad():
        expected = trained(source, decoder_input).log_softmax(-1)
        actual = module(source, decoder_input).log_softmax(-1)
    if deployed.activation_bits == 8:
        # The training graph's arithmetic, in int8. Not bit-exact: a float rounding upstream can
        # move an activation to the next integer code, and the kernel keeps code -128 for inputs
        # below the range (training clipped them to -127). Dynamic activations are off by ~0.14.
        assert (expected.argmax(-1) == actual.argmax(-1)).all()
        assert (expected - actual).abs().max() < 0.05 and (expected - actual).abs().mean() < 0.005
    else:  # a CPU without VNNI: 7-bit activations on the same ranges
        assert (expected.argmax(-1) == actual.argmax(-1)).float().mean() >= 0.6
        assert (expected - actual).abs().mean() < 0.2


def test_translating_a_qat_checkpoint_points_to_export(qat_checkpoint: Path) -> None:
    with pytest.raises(CorpusError, match="export it to the int8 model first"):
        load_translation_module(qat_checkpoint)


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


def test_init_from_starts_from_the_weights(trained_checkpoint: Path, prepared_dir: Path, tmp_path: Path) -> None:
    original = load_translation_module(trained_checkpoint)
    hyper_parameters = torch.load(trained_checkpoint, map_location="cpu", weights_only=False)["hyper_parameters"]
    module = TranslationModule(**{**hyper_parameters, "init_from": str(trained_checkpoint)})
    for name, tensor in original.model.state_dict().items():
        torch.testing.assert_close(module.model.state_dict()[name], tensor, rtol=0, atol=0)
    # The saved hyper-parameters do not send a later load back to that file.
    assert TranslationModule.from_hyperparameters(module.hparams).hparams.init_from is None
    with pytest.raises(FileNotFoundError, match="init_from: .*nowhere.ckpt: no such checkpoint"):
        TranslationModule(**{**hyper_parameters, "init_from": str(tmp_path / "nowhere.ckpt")})
    with pytest.raises(ValueError, match="init_from: .*weights do not fit this model"):
        TranslationModule(**{**hyper_parameters, "d_model": 16, "init_from": str(trained_checkpoint)})
