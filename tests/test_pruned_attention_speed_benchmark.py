"""recipes/benchmarks/pruned_attention_speed.py end to end at the smoke width (no timing is
asserted): both pruned files load, the cut one with PrunedMultiheadAttention in torch's
attentions' place and smaller matrices, the zeroed one with torch's attentions at full size, and
the table has a row per part."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import import_benchmark


def test_the_cut_and_the_zeroed_files_load_and_the_table_is_written(tmp_path: Path) -> None:
    from torch import nn

    from nmt_lightning.export import load_module
    from nmt_lightning.export.pruned_attention import PrunedMultiheadAttention

    speed = import_benchmark("pruned_attention_speed")
    speed.main(["--out", str(tmp_path), "--width", "smoke", "--layers", "1", "--batch", "3", "--length", "6",
                "--rounds", "1", "--repeats", "1", "--threads", "1"])
    cut = load_module(speed.build("smoke", 1), tmp_path / "smoke_cut.safetensors")
    zeros = load_module(speed.build("smoke", 1), tmp_path / "smoke_zeros.safetensors")
    attention = cut.transformer.encoder.layers[0].self_attn
    assert isinstance(attention, PrunedMultiheadAttention) and tuple(attention.in_proj_weight.shape) == (48, 32)
    torch_attention = zeros.transformer.encoder.layers[0].self_attn
    assert isinstance(torch_attention, nn.MultiheadAttention) and tuple(torch_attention.in_proj_weight.shape) == (96, 32)
    assert tuple(zeros.transformer.encoder.layers[0].linear1.weight.shape) == (32, 32)  # cut in both
    table = (tmp_path / "pruned_attention_speed.md").read_text()
    assert "| smoke | 1 | encoder |" in table and "| smoke | 1 | encoder + decoder |" in table
    assert "Reproduce: python recipes/benchmarks/pruned_attention_speed.py --out" in table
