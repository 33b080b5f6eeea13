"""The benchmarks' run cache (recipes/benchmarks/side_by_side.py) refuses a run trained with other settings
and does not take a run that stopped before its steps as trained."""

import json
from pathlib import Path

import pytest

from tests.conftest import SMALL_FIT_OPTIONS, import_benchmark


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



@pytest.mark.parametrize("given, checked_as_default", [
    ([], True),
    # the main job passes the path of the model it trained, which its time cap may have stopped
    # before the recipe's steps: given explicitly, the step count is not checked
    (["--fp32-checkpoint", "runs/libreoffice_en_cs_tiny/checkpoints/last.ckpt"], False),
])
def test_the_int8_benchmark_checks_the_steps_of_its_default_checkpoint_only(
        given: list, checked_as_default: bool, trained_checkpoint: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    benchmark = import_benchmark("int8_quantization")
    seen = {}

    def check(path: Path, argument: str, expected: dict, default: bool) -> dict:
        seen.update(path=path, default=default)
        raise SystemExit("checked")

    monkeypatch.setattr(benchmark, "check_given_model", check)
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "runs" / "libreoffice_en_cs_tiny" / "checkpoints" / "last.ckpt"
    target.parent.mkdir(parents=True)
    target.write_bytes(trained_checkpoint.read_bytes())  # present: nothing is trained
    with pytest.raises(SystemExit, match="checked"):
        benchmark.main(["--out", str(tmp_path / "out"), *given])
    assert seen == {"path": target.resolve(), "default": checked_as_default}

def test_a_fit_that_stops_early_without_an_error_is_not_taken_as_trained(prepared_dir: Path, tmp_path: Path) -> None:
    """Lightning ends a fit cleanly (exit status 0) on SIGTERM, or here at its epoch limit: the run
    stopped before its steps, so its checkpoint is not the run's result and a run that would start
    from it must not start."""
    side_by_side = import_benchmark("side_by_side")
    root = Path(__file__).resolve().parents[1]
    small = [*SMALL_FIT_OPTIONS, "--trainer.limit_val_batches=1", "--model.val_bleu_sentences=4"]
    with pytest.raises(RuntimeError, match=r"early: the fit ended at step \d+ of 100000 without an error"):
        side_by_side.run_fit(tmp_path, "early", [root / "recipes/libreoffice_en_cs/tiny.yaml"], [],
                             [f"--data.data_dir={prepared_dir}", "--trainer.max_epochs=1", *small],
                             Path("runs/libreoffice_en_cs_tiny/checkpoints/last.ckpt"), 100_000)
