"""recipes/benchmarks/shape_speed.py on tiny shapes (no timing is asserted): the shapes it builds,
the lengths it decodes, its cache and its refusals."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open

from nmt_lightning.evaluation import read_lines
from nmt_lightning.loading import load_translation_module
from tests.conftest import import_benchmark

pytest.importorskip("ctranslate2", reason="ctranslate2 is an optional extra")

TINY_WIDTH = ["--d-model", "32", "--ffn-dim", "64", "--heads", "4"]


@pytest.mark.parametrize("text, expected", [
    ("t=6+6", (6, 6, 0.0, 0.0)),
    ("s=6+2,prune=0.5", (6, 2, 0.5, 0.5)),
    ("s=6+2,prune=0.5:0.75", (6, 2, 0.5, 0.75)),
])
def test_a_shape_is_its_layers_and_fractions(text: str, expected: tuple) -> None:
    shape = import_benchmark("shape_speed").parse_shape(text)
    assert (shape.encoder_layers, shape.decoder_layers, shape.encoder_prune, shape.decoder_prune) == expected


@pytest.mark.parametrize("text, message", [
    ("6+2", "give NAME=ENCODER+DECODER"),
    ("s=6-2", "the layers are ENCODER+DECODER, e.g. 6+2, got '6-2'"),
    ("s=0+2", "at least one encoder and one decoder layer"),
    ("s=6+2,prune=1", "prune is F or FE:FD, each in [0, 1), got '1'"),
    ("s=6+2,prune=a", "prune takes fractions, got 'a'"),
    ("s=6+2,heads=2", "unknown option 'heads=2'"),
])
def test_a_bad_shape_is_refused_naming_the_part(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        import_benchmark("shape_speed").parse_shape(text)


def test_the_shapes_decode_their_references_lengths_and_export_their_widths(prepared_dir: Path, tmp_path: Path) -> None:
    """A 2+2 reference and a 2+1 model with half of the encoder's and three quarters of the decoder's
    heads and neurons removed: the exports hold those widths, every sentence decodes as many pieces
    as its reference translation (counted here with the model's own tokenizer), in our decoder and
    in CTranslate2, and a second run measures nothing again."""
    shape_speed = import_benchmark("shape_speed")
    out = tmp_path / "out"
    arguments = ["--out", str(out), "--data-dir", str(prepared_dir), "--shape", "reference=2+2",
                 "--shape", "pruned=2+1,prune=0.5:0.75", *TINY_WIDTH,
                 "--engines", "ours fp32 + shortlist", "CTranslate2 float32", "--beam", "2",
                 "--threads", "1", "--sentences", "5", "--latency-sentences", "3", "--rounds", "1"]
    shape_speed.main(arguments)
    with safe_open(out / "deployed" / "pruned.trained.safetensors", "pt") as handle:
        shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
    assert shapes["encoder_layers.1.ffn.fc1.weight"] == [32, 32]  # half of 64 neurons
    assert shapes["encoder_layers.1.self_attn.q_proj.weight"] == [16, 32]  # 2 of 4 heads of 8
    assert shapes["decoder_layers.0.ffn.fc1.weight"] == [16, 32]  # a quarter
    assert shapes["decoder_layers.0.cross_attn.q_proj.weight"] == [8, 32]  # 1 of 4 heads
    assert not any(name.startswith("decoder_layers.1.") for name in shapes)

    tokenization = load_translation_module(out / "checkpoints" / "reference.ckpt").tokenization
    pieces = [len(ids) for ids in tokenization.encode_target(read_lines(prepared_dir / "test.cs")[:3])]
    for row in shape_speed.deployed_rows(argparse.Namespace(out=out, data_dir=prepared_dir, shortlist_best=50,
                                                            shortlist_frequent=100,
                                                            engines=["ours fp32 + shortlist", "CTranslate2 float32"]),
                                         {"pruned": out / "checkpoints" / "pruned.ckpt"}):
        report = shape_speed.run_worker(argparse.Namespace(out=out, latency_sentences=3, beam=2), row, "latency", 1)
        # one sentence at a time, in the engines' order (by source length): each its reference's pieces and eos
        assert sorted(report["decoder_steps"]) == sorted(count + 1 for count in pieces), row.name

    table = (out / "shape_speed.md").read_text()
    assert "| reference | CTranslate2 float32 |" in table and "| 1.00x |" in table
    assert "| pruned | ours fp32 + shortlist |" in table
    rounds = (out / "speed_rounds.json").read_text()
    shape_speed.main(arguments)  # cached: nothing is measured again
    assert (out / "speed_rounds.json").read_text() == rounds


def test_another_shape_under_a_cached_name_is_refused(prepared_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """The exports, conversions and rounds under --out are cached by name: a name built as another
    shape is refused before anything is built."""
    shape_speed = import_benchmark("shape_speed")
    out = tmp_path / "out"
    out.mkdir()
    (out / "shapes.json").write_text(json.dumps({"s": {"name": "s", "encoder_layers": 2, "decoder_layers": 2}}))
    with pytest.raises(SystemExit):
        shape_speed.main(["--out", str(out), "--data-dir", str(prepared_dir), "--shape", "s=2+1", *TINY_WIDTH])
    error = capsys.readouterr().err
    assert "--shape s: " in error and "give it another name or another --out" in error
    assert not (out / "checkpoints").exists()
