"""The benchmarks' run cache (recipes/benchmarks/side_by_side.py) refuses a run trained with other settings."""

import json
from pathlib import Path

import pytest

from tests.conftest import import_benchmark


def check_run_settings():
    return import_benchmark("side_by_side").check_run_settings


def test_run_settings_recorded_then_matched(tmp_path: Path) -> None:
    check = check_run_settings()
    run_dir = tmp_path / "runs" / "control"
    settings = {"configs": ["tiny.yaml"], "add_ons": [], "overrides": ["--model.lr=0.002"], "steps": 1000}
    check(run_dir, settings)
    assert json.loads((run_dir / "run.json").read_text(encoding="utf-8")) == settings
    check(run_dir, dict(settings))  # the same settings: the cached run is reused


def test_run_settings_that_differ_name_the_run_and_the_difference(tmp_path: Path) -> None:
    check = check_run_settings()
    run_dir = tmp_path / "runs" / "quant_noise_ipq"
    check(run_dir, {"add_ons": ["steps_per_stage: 1333"], "steps": 4000})
    with pytest.raises(SystemExit) as error:
        check(run_dir, {"add_ons": ["steps_per_stage: 2666"], "steps": 8000})
    message = str(error.value)
    assert str(run_dir) in message and "steps: 4000 then, 8000 now" in message and "add_ons" in message


def test_a_benchmark_refuses_a_checkpoint_that_is_not_the_model_it_assumes(trained_checkpoint: Path,
                                                                          tmp_path: Path) -> None:
    """The tests' checkpoint is a 1+1 model of width 32 that trained 30 steps: not the main job's
    3+3 model of 1,400 steps; a compressed one is refused even when given explicitly."""
    import torch

    side_by_side = import_benchmark("side_by_side")
    with pytest.raises(SystemExit, match=r"--fp32-checkpoint: .* is not the main job's model \(tiny.yaml\): it is a "
                                         r"1\+1 model of width 32, .* 3\+3 of width 256; it trained 30 steps, the "
                                         r"recipe 1,400"):
        side_by_side.check_given_model(trained_checkpoint, "--fp32-checkpoint", side_by_side.MAIN_JOB_MODEL, True)
    same_shape = {**side_by_side.MAIN_JOB_MODEL, "layers": (1, 1), "d_model": 32, "steps": 30}
    assert side_by_side.check_given_model(trained_checkpoint, "--x", same_shape, True)["step"] == 30
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    checkpoint["compression"] = {"model.a.weight": [{"codec": "int8", "order": 20}]}
    torch.save(checkpoint, tmp_path / "qat.ckpt")
    with pytest.raises(SystemExit, match="trained with compression callbacks"):
        side_by_side.check_given_model(tmp_path / "qat.ckpt", "--x", same_shape, False)
