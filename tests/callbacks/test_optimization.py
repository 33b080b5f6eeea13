"""callbacks._optimization: restarting the optimiser and schedule mid-fit, freezing parameters."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks import QuantizationAwareTraining
from callbacks._optimization import ParameterFreezer, matching_parameters, restart_optimization
from callbacks._transforms import trainable_weight
from tests.callbacks.classifier import classification_data
from tests.callbacks.helpers import (
    assert_same_state,
    resumed_and_uninterrupted,
    trainer,
)
from tests.callbacks.staged import StagedTraining, WarmupClassifier
from tests.conftest import run_script


class Recorder(L.Callback):
    """Per step: the lr, Adam's step count for out.weight, and hidden.weight."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, int, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        adam = optimizer.state[trainable_weight(pl_module.out)]  # the parameter, under any transform
        self.rows.append((optimizer.param_groups[0]["lr"], int(adam["step"]),
                          trainable_weight(pl_module.hidden).detach().clone()))


def test_restart_begins_a_new_optimiser_state_and_schedule_and_freezes(tmp_path: Path) -> None:
    L.seed_everything(0)
    model, recorder = WarmupClassifier(), Recorder()
    trainer(tmp_path, [StagedTraining(restart_at=6), recorder], max_steps=12).fit(model, classification_data())
    lrs = [row[0] for row in recorder.rows]
    adam_steps = [row[1] for row in recorder.rows]
    # The warm-up of 4 steps, then again from its first step after the restart at step 6.
    assert lrs[:6] == pytest.approx([2.5e-3 * (i + 2) if i < 3 else 1e-2 for i in range(6)])
    assert lrs[6:9] == pytest.approx([5e-3, 7.5e-3, 1e-2])
    assert adam_steps == [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6]
    # Frozen from the restart on; they had been learning before it.
    hidden = [row[2] for row in recorder.rows]
    assert not torch.equal(hidden[0], hidden[5])
    for later in hidden[6:]:
        assert torch.equal(later, hidden[5])


@pytest.mark.parametrize("schedule_step", [0, 1, 2])
def test_a_restart_continues_the_schedule_from_the_step_it_is_given(tmp_path: Path, schedule_step: int,
                                                                   recwarn: pytest.WarningsRecorder) -> None:
    """Late rewinding restarts the optimiser but continues the schedule from step k: after the
    restart the warm-up (lr 1e-2 * min(1, (s + 1) / 4) at schedule step s) goes on from s = k.
    Stepping a fresh schedule before its optimiser is the point, so torch's warning about it is
    not shown to the user."""
    L.seed_everything(0)
    model, recorder = WarmupClassifier(), Recorder()
    trainer(tmp_path, [StagedTraining(restart_at=6, schedule_step=schedule_step), recorder],
            max_steps=9).fit(model, classification_data())
    # The lr is recorded after the step's scheduler step: the 1st, 2nd, 3rd after the restart.
    expected = [1e-2 * min(1.0, (schedule_step + 1 + i + 1) / 4) for i in range(3)]
    assert [row[0] for row in recorder.rows[6:]] == pytest.approx(expected)
    assert [row[1] for row in recorder.rows[6:]] == [1, 2, 3]  # a fresh Adam state whatever the schedule
    assert not [str(w.message) for w in recwarn if "lr_scheduler.step()" in str(w.message)]


@pytest.mark.parametrize("schedule_step", [-1, 1.5, True, "1", None])
def test_a_restart_refuses_a_schedule_step_that_is_not_a_step(schedule_step) -> None:
    with pytest.raises(ValueError, match=r"^restart_optimization: schedule_step must be an integer >= 0, got "):
        restart_optimization(L.Trainer(logger=False, enable_checkpointing=False), schedule_step)


@pytest.mark.parametrize("stop", [3, 8])
def test_resume_before_or_within_a_stage_equals_uninterrupted(tmp_path: Path, stop: int) -> None:
    expected, actual = resumed_and_uninterrupted(tmp_path, WarmupClassifier, lambda: [StagedTraining(restart_at=6)],
                                                 classification_data, stop=stop, total=14)
    assert_same_state(expected, actual)


def test_with_quantization_and_bf16_mixed(tmp_path: Path) -> None:
    """The seam composes with a transform callback and mixed precision: frozen weights stay put."""
    L.seed_everything(0)
    model, recorder = WarmupClassifier(), Recorder()
    trainer(tmp_path, [QuantizationAwareTraining(), StagedTraining(restart_at=3, freeze=("hidden.*", "embed.*")),
                       recorder], max_steps=8, precision="bf16-mixed").fit(model, classification_data())
    assert [row[1] for row in recorder.rows] == [1, 2, 3, 1, 2, 3, 4, 5]
    for later in recorder.rows[3:]:
        assert torch.equal(later[2], recorder.rows[2][2])


def test_freezer_misuse() -> None:
    model = WarmupClassifier()
    assert matching_parameters(model, ["hidden.*"]) == ["hidden.weight", "hidden.bias"]
    QuantizationAwareTraining().quantize_modules(model)  # names under a transform chain match too
    assert matching_parameters(model, ["hidden.weight"]) == ["hidden.parametrizations.weight.original"]
    with pytest.raises(ValueError, match=r"no parameter matches \['encoder.\*'\]"):
        ParameterFreezer().freeze(model, ["encoder.*"])


def test_two_process_ddp_restarts_identically(tmp_path: Path) -> None:
    run_script("staged_ddp.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["hidden_unchanged_after_restart"] and ranks[0]["adam_step"] == 3
