"""int4 export: two weights a byte, post-training (--quantize int4) and after Quant-Noise int4 training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from callbacks import QuantNoise
from nmt_lightning.loading import load_translation_module
from nmt_lightning.cli import main
from nmt_lightning.translation_file import export_checkpoint, load_exported
from nmt_lightning.export.codecs.int4 import pack_nibbles, unpack_nibbles
from nmt_lightning.export.codecs.int8_kernels import Int8Linear, quantize_weight
from nmt_lightning.translate import translate_lines
from tests.conftest import train_tiny_checkpoint


@pytest.mark.parametrize("columns", [8, 7])
def test_nibbles_round_trip(columns: int) -> None:
    values = torch.randint(-7, 8, (5, columns), dtype=torch.int8)
    packed = pack_nibbles(values)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (columns + 1) // 2)
    assert torch.equal(unpack_nibbles(packed, columns), values)


def test_post_training_int4_export(trained_checkpoint: Path, prepared_dir: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    assert main(["export", "--checkpoint", str(trained_checkpoint), "--quantize", "int4",
                 "--output", str(tmp_path / "int4.safetensors")]) == 0
    assert "int4, dynamic activation ranges" in capsys.readouterr().err
    export_checkpoint(trained_checkpoint, tmp_path / "int8.safetensors", "int8")
    export_checkpoint(trained_checkpoint, tmp_path / "fp32.safetensors", "fp32")
    sizes = {name: (tmp_path / f"{name}.safetensors").stat().st_size for name in ("int4", "int8", "fp32")}
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"]
    module = load_exported(tmp_path / "int4.safetensors")
    dense = load_translation_module(trained_checkpoint)
    fc1 = module.model.decoder_layers[0].ffn.fc1
    assert isinstance(fc1, Int8Linear) and fc1.bits == 4
    values, scale = fc1.weight_values()
    expected_values, expected_scale = quantize_weight(dense.model.decoder_layers[0].ffn.fc1.weight, 4, True)
    assert torch.equal(values, expected_values) and values.abs().max() <= 7
    torch.testing.assert_close(scale, expected_scale)
    lines = (prepared_dir / "test.en").read_text(encoding="utf-8").splitlines()[:8]
    assert len(translate_lines(module, lines, beam=2, progress=False)) == 8


def test_a_quant_noise_int4_checkpoint_exports_int4(prepared_dir: Path, tmp_path: Path) -> None:
    checkpoint = train_tiny_checkpoint(prepared_dir, tmp_path,
                                       callbacks=(QuantNoise(p=0.2, scheme="int4", block_size=8),))
    report = export_checkpoint(checkpoint, tmp_path / "model.safetensors")
    assert report.quantization == "int4"
    grid = load_translation_module(checkpoint, runtime_layers=False)  # decoded codes, as nn.Linear
    trained = load_translation_module(checkpoint, quantize="fp32")
    weight = trained.model.encoder_layers[0].self_attn.q_proj.weight
    values, scale = quantize_weight(weight, 4, True)
    torch.testing.assert_close(grid.model.encoder_layers[0].self_attn.q_proj.weight, values.float() * scale)
    # translate deploys it directly from the checkpoint, as export would write it
    lines = (prepared_dir / "test.en").read_text(encoding="utf-8").splitlines()[:8]
    from_checkpoint = translate_lines(load_translation_module(checkpoint), lines, beam=1, progress=False)
    from_file = translate_lines(load_exported(tmp_path / "model.safetensors"), lines, beam=1, progress=False)
    assert from_checkpoint == from_file


def test_qat_at_four_bits_exports_packed_with_its_activation_ranges(prepared_dir: Path, tmp_path: Path) -> None:
    from callbacks import QuantizationAwareTraining

    checkpoint = train_tiny_checkpoint(prepared_dir, tmp_path, callbacks=(
        QuantizationAwareTraining(bits=4, per_channel=True, include=["model.*"]),))
    report = export_checkpoint(checkpoint, tmp_path / "model.safetensors")
    assert report.quantization == "int4" and report.activations == "static"
    fc2 = load_exported(tmp_path / "model.safetensors").model.encoder_layers[0].ffn.fc2
    assert isinstance(fc2, Int8Linear) and fc2.static and fc2.bits == 4 and fc2.activation_bits == 4
    assert fc2.weight_values()[0].abs().max() <= 7
