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
