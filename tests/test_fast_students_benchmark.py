"""recipes/benchmarks/fast_students.py end to end on the tests' tiny model (no timing is asserted):
the pruning and its control start from one checkpoint with one budget, the pruned export holds
half the heads and neurons, the paired test is written, and a second run trains nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.conftest import import_benchmark

pytest.importorskip("ctranslate2", reason="ctranslate2 is an optional extra")

SMALL = ["--model.d_model=32", "--model.ffn_dim=64", "--model.heads=2", "--model.encoder_layers=1",
         "--model.decoder_layers=1", "--model.pre_norm=false", "--trainer.limit_val_batches=1", "--model.val_bleu_sentences=4"]
EFFICIENCY = ["--engines", "ours fp32", "CTranslate2 float32", "--beam", "1", "--threads", "1", "--sentences", "4",
              "--latency-sentences", "2", "--rounds", "1"]


def test_pruning_and_control_share_start_and_budget_and_the_export_is_smaller(
        trained_checkpoint: Path, prepared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fast_students = import_benchmark("fast_students")
    monkeypatch.chdir(tmp_path)  # a relative --out: each run trains in its own directory
    out = tmp_path / "out"
    arguments = ["--out", "out", "--data-dir", str(prepared_dir), "--base", str(trained_checkpoint), "--steps", "4",
                 "--jobs", "1", *[f"--override={option}" for option in SMALL], "--", *EFFICIENCY]
    fast_students.main(arguments)
    control, structured = (json.loads((out / "runs" / run / "run.json").read_text()) for run in ("control", "structured"))
    assert control["steps"] == structured["steps"] == 4
    assert control["overrides"] == structured["overrides"]  # the same start, seed and data
    assert f"--model.init_from={trained_checkpoint.resolve()}" in control["overrides"]
    assert control["add_ons"] == [] and "callbacks.StructuredPruning" in structured["add_ons"][0]

    deployed = out / "efficiency" / "deployed"
    shapes = {}
    for run in ("unpruned__control", "half_heads_and_neurons_removed"):
        with safe_open(deployed / f"{run}.trained.safetensors", "pt") as handle:
            shapes[run] = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
    q_proj = next(name for name in shapes["unpruned__control"] if name.endswith("self_attn.q_proj.weight"))
    fc1 = next(name for name in shapes["unpruned__control"] if name.endswith("fc1.weight"))
    assert shapes["unpruned__control"][q_proj] == [32, 32] and shapes["half_heads_and_neurons_removed"][q_proj] == [16, 32]
    assert shapes["unpruned__control"][fc1] == [64, 32] and shapes["half_heads_and_neurons_removed"][fc1] == [32, 32]

    page = (out / "fast_students.md").read_text()
    assert "| half heads and neurons removed | unpruned (control) |" in page
    table = (out / "efficiency" / "efficiency.md").read_text()
    assert "| unpruned (control) | CTranslate2 float32 |" in table and "| half heads and neurons removed | ours fp32 |" in table

    trained = {run: (out / "runs" / run / "runs").stat().st_mtime_ns for run in ("control", "structured")}
    fast_students.main(arguments)  # cached: nothing trains again, the same page
    assert {run: (out / "runs" / run / "runs").stat().st_mtime_ns for run in trained} == trained
    assert (out / "fast_students.md").read_text() == page


def test_the_students_start_from_the_teachers_encoder_and_chosen_decoder_layers(
        prepared_dir: Path, tmp_path: Path) -> None:
    """With --teacher: the 6+2 and 6+1 students train (word-level KD) from the teacher's whole
    encoder and its decoder layers [2, 5] or [5]: after one step at a learning rate of 1e-9 (Adam
    moves a weight by about the learning rate) each student's layers are the chosen teacher layers."""
    import argparse

    import torch

    from tests.conftest import train_tiny_checkpoint

    fast_students = import_benchmark("fast_students")
    teacher = train_tiny_checkpoint(prepared_dir, tmp_path / "teacher", max_steps=2, encoder_layers=6, decoder_layers=6)
    args = argparse.Namespace(out=tmp_path / "out", data_dir=prepared_dir, base=teacher, teacher=teacher, steps=1,
                              student_steps=1, seed=1, jobs=1, distill=False,
                              override=[option for option in SMALL if "_layers=" not in option]
                              + ["--model.lr=1e-9", "--model.warmup_steps=1"])  # one step that barely moves
    planned = {name: run for name, run in fast_students.runs(args).items() if name.startswith("student")}
    assert sorted(planned) == ["student_6_1", "student_6_2"]
    assert all("callbacks.KnowledgeDistillation" in run["add_ons"][0] for run in planned.values())
    checkpoints = fast_students.train(args, planned)

    def weights(path: Path) -> dict[str, torch.Tensor]:
        return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]

    taught = weights(teacher)
    for name, picked in (("student_6_2", [2, 5]), ("student_6_1", [5])):
        student = weights(checkpoints[name])
        assert not any(f"decoder_layers.{len(picked)}." in key for key in student)  # 6 + len(picked) layers
        for layer in range(6):
            key = f"model.encoder_layers.{layer}.ffn.fc1.weight"
            assert torch.allclose(student[key], taught[key], atol=1e-6)
        for index, source in enumerate(picked):
            assert torch.allclose(student[f"model.decoder_layers.{index}.ffn.fc1.weight"],
                                  taught[f"model.decoder_layers.{source}.ffn.fc1.weight"], atol=1e-6)
