"""callbacks.LotteryTicketPruning: iterative magnitude pruning with late rewinding."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LambdaCallback
import pytest
import torch

from callbacks import KnowledgeDistillation, LotteryTicketPruning, QuantizationAwareTraining, QuantNoise
from callbacks._pruning import PruningMask
from callbacks._transforms import find_weight_transform, trainable_weight, weight_transforms
from tests.callbacks.classifier import BagOfWordsClassifier, DistillableClassifier, classification_data
from tests.callbacks.fixed import A, B, TwoLinears, batches
from tests.callbacks.helpers import assert_same_state, resumed_and_uninterrupted, trainer
from tests.conftest import run_script, tiny_module, tiny_trainer

LAYERS = ["hidden", "out"]  # 16 x 16 + 3 x 16 = 304 weights


def ticket(**overrides) -> LotteryTicketPruning:
    options = dict(sparsity=0.875, rounds=3, round_steps=4, rewind_step=2, include=LAYERS)
    return LotteryTicketPruning(**{**options, **overrides})


class Probe(L.Callback):
    """Listed after the pruning callback: sees each step's weights after it acted."""

    def __init__(self, pruning: LotteryTicketPruning) -> None:
        self.pruning, self.remaining, self.weights = pruning, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.remaining[trainer.global_step] = self.pruning.weights.remaining()
        self.weights[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


class DecayingClassifier(BagOfWordsClassifier):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


def test_sparsity_follows_the_schedule_and_survivors_rewind_to_step_k(tmp_path: Path) -> None:
    pruning = ticket()
    probe = Probe(pruning)
    L.seed_everything(0)
    trainer(tmp_path, [pruning, probe], max_steps=16).fit(BagOfWordsClassifier(), classification_data())
    # Kept after round r: 0.125 ** (r / 3) of 304 = 152, 76, 38, pruned at steps 4, 8, 12.
    assert [probe.remaining[step] for step in (0, 3, 4, 7, 8, 11, 12, 15)] == [304, 304, 152, 152, 76, 76, 38, 38]
    for prune_step in (4, 8, 12):  # right after each pruning: survivors hold their step-k (step 2) values
        after = probe.weights[prune_step]
        for name, value in probe.weights[2].items():
            kept = after[name] != 0
            torch.testing.assert_close(after[name][kept], value[kept], rtol=0, atol=0, msg=name)
            if not name.endswith(".original"):  # biases, embeddings, norms: rewound whole
                torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)
    assert pruning.round == 3


def test_pruned_weights_stay_zero_with_adamw_weight_decay_and_bf16(tmp_path: Path) -> None:
    model = DecayingClassifier()
    trainer(tmp_path, [ticket()], max_steps=16, precision="bf16-mixed").fit(model, classification_data())
    for name in LAYERS:
        module = getattr(model, name)
        mask = find_weight_transform(module, PruningMask).mask
        assert (trainable_weight(module)[mask == 0] == 0).all(), name  # the parameter itself
        assert (module.weight[mask == 0] == 0).all(), name  # what the layer computes with


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_masked_weight_keeps_its_dtype(dtype: torch.dtype) -> None:
    """A bf16-true (or fp16, fp64) layer's masked weight stays in its dtype: the float32 mask is
    cast to the weight's, not the weight promoted to float32."""
    weight = torch.randn(4, 6, dtype=dtype)
    transform = PruningMask(weight)
    transform.mask[:, :3] = 0
    masked = transform(weight)
    assert masked.dtype == dtype
    assert torch.equal(masked[:, :3], torch.zeros(4, 3, dtype=dtype)) and torch.equal(masked[:, 3:], weight[:, 3:])


@pytest.mark.parametrize("prune_embeddings", [False, True])
def test_a_projection_tied_to_an_embedding_is_pruned_in_every_use_or_not_at_all(prepared_dir: Path, tmp_path: Path,
                                                                              prune_embeddings: bool) -> None:
    # Our Transformer ties the output projection to the target embedding. Masked as a projection
    # only, the table's pruned entries would get gradients through the embedding lookups.
    module, datamodule = tiny_module(prepared_dir)
    pruning = LotteryTicketPruning(sparsity=0.75, rounds=2, round_steps=3, rewind_step=1,
                                   prune_embeddings=prune_embeddings)
    tiny_trainer(tmp_path, callbacks=[pruning], max_steps=9).fit(module, datamodule=datamodule)
    tied = trainable_weight(module.model.output_projection)
    assert tied is trainable_weight(module.model.tgt_embed)
    pruned = {id(parameter) for _, parameter, _ in pruning.weights.masks()}
    assert (id(tied) in pruned) == prune_embeddings
    assert pruning.weights.left_dense == ([] if prune_embeddings else ["model.output_projection"])
    for name, parameter, mask in pruning.weights.masks():
        assert (parameter[mask == 0] == 0).all(), name  # after 3 optimiser steps in the last round
    assert pruning.weights.sparsity() == pytest.approx(0.75, abs=1e-3)


def test_resume_in_the_middle_of_round_two_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight, resumed = resumed_and_uninterrupted(tmp_path, BagOfWordsClassifier, lambda: [ticket()],
                                                  classification_data, stop=6, total=14)
    assert_same_state(straight, resumed, tolerance=0)  # weights and masks


def test_the_callback_state_carries_round_and_snapshot(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    pruning = ticket()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1, filename="mid")
    trainer(tmp_path, [pruning, saver], max_steps=6, enable_checkpointing=True).fit(
        BagOfWordsClassifier(), classification_data())
    saved = torch.load(tmp_path / "ckpt" / "mid.ckpt", weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("LotteryTicketPruning"))
    assert state["round"] == 1 and "hidden.parametrizations.weight.original" in state["snapshot"]
    # The manifest tells the exporter each pruned weight is sparse, naming its mask.
    assert saved["compression"]["hidden.weight"][0]["codec"] == "sparse"
    assert saved["compression"]["hidden.weight"][0]["mask"] in saved["state_dict"]


def test_one_shot_per_layer_and_by_epochs(tmp_path: Path) -> None:
    pruning = LotteryTicketPruning(sparsity=0.5, rounds=1, round_epochs=1, scope="layer", include=LAYERS)
    model = BagOfWordsClassifier()
    trainer(tmp_path, [pruning], max_steps=16, max_epochs=2).fit(model, classification_data())  # 8 batches an epoch
    assert pruning.round == 1
    assert pruning.weights.layer_sparsity() == {"hidden": 0.5, "out": 0.5}


def test_prune_fraction_sets_the_rounds(tmp_path: Path) -> None:
    """Pruning 20% of the survivors a round reaches 80% sparsity in 8 rounds, each keeping 0.8 of
    the last (not the 0.2 ** (r / 8) of eight equal geometric steps), the last one exactly 0.2;
    with no round of its own (masks_from) everything is kept."""
    pruning = LotteryTicketPruning(sparsity=0.8, prune_fraction=0.2, round_steps=5)
    assert pruning.rounds == 8  # 0.8 ** 7 = 0.21 > 0.2 >= 0.8 ** 8
    assert [pruning.kept_after(r) for r in (1, 7, 8)] == pytest.approx([0.8, 0.8 ** 7, 0.2])
    (tmp_path / "ticket.ckpt").touch()
    assert LotteryTicketPruning(rounds=0, round_steps=5, masks_from=str(tmp_path / "ticket.ckpt")).kept_after(0) == 1.0


@pytest.mark.parametrize("round_epochs", [1, 2])
def test_rounds_counted_in_epochs_prune_when_an_epoch_begins(tmp_path: Path, round_epochs: int) -> None:
    """Two rounds to 75%, each round_epochs long: nothing pruned in the first round, 1 - 0.25 ** (1/2)
    = 50% of the 304 weights in the second, 75% from the third on (seen at each epoch's start)."""
    pruning = LotteryTicketPruning(sparsity=0.75, rounds=2, round_epochs=round_epochs, include=LAYERS)
    seen: list[float] = []
    probe = LambdaCallback(on_train_epoch_start=lambda *_: seen.append(pruning.weights.sparsity()))
    trainer(tmp_path, [pruning, probe], max_steps=-1, max_epochs=4 * round_epochs).fit(BagOfWordsClassifier(),
                                                                                       classification_data())
    by_round = [0.0, 152 / 304, 228 / 304, 228 / 304]
    assert seen == pytest.approx([kept for kept in by_round for _ in range(round_epochs)], abs=1e-9)


def test_each_pruning_logs_the_sparsity_of_the_model_and_of_each_layer(tmp_path: Path) -> None:
    """Three rounds of 4 steps to 87.5% (kept 1/2, 1/4, 1/8 of the 304 weights): at each pruning the
    loggers get, at that step, the round, the model's sparsity and each layer's."""
    from lightning.pytorch.loggers import Logger

    class Recording(Logger):
        name, version = "recording", 0

        def __init__(self) -> None:
            super().__init__()
            self.logged: list[tuple[int, dict]] = []  # (step, metrics) of each pruning's record

        def log_metrics(self, metrics, step=None) -> None:
            if "pruning/round" in metrics and any(key.startswith("pruning/sparsity/") for key in metrics):
                self.logged.append((step, dict(metrics)))

        def log_hyperparams(self, params, *args, **kwargs) -> None:
            pass

    pruning = ticket()
    logger = Recording()
    trainer(tmp_path, [pruning], max_steps=16, logger=logger).fit(BagOfWordsClassifier(), classification_data())
    assert [step for step, _ in logger.logged] == [4, 8, 12]
    for round_, (_, metrics) in enumerate(logger.logged, start=1):
        layers = {key: value for key, value in metrics.items() if key.startswith("pruning/sparsity/")}
        assert set(layers) == {"pruning/sparsity/hidden", "pruning/sparsity/out"}
        assert metrics["pruning/round"] == float(round_)
        assert metrics["pruning/sparsity"] == pytest.approx(1 - 0.5 ** round_, abs=1 / 304)


def test_lottery_errors_name_it(tmp_path: Path) -> None:
    """What a run cannot use is refused in one line naming the callback: include matching no layer,
    a checkpoint's callback state without the schedule it was pruned with, masks_from a file that
    is not a checkpoint, a checkpoint without masks, without the mask of one layer or with a mask
    of another shape. A state from before masks_applied was saved
    loads as not applied."""
    with pytest.raises(ValueError, match=r"^LotteryTicketPruning selected no nn.Linear module with "
                                         r"include=\['nothing'\]"):
        trainer(tmp_path, [ticket(include=["nothing"])], max_steps=1).fit(BagOfWordsClassifier(), classification_data())
    with pytest.raises(ValueError, match=r"^LotteryTicketPruning: the checkpoint was pruned with \(rounds, sparsity, "
                                         r"scope\) = None, this run asks for \[3, 0.875, 'global'\]$"):
        ticket().load_state_dict({})
    older = ticket()
    older.masks_applied = True
    older.load_state_dict({"round": 1, "snapshot": None, "generator": torch.Generator().get_state(),
                           "schedule": [3, 0.875, "global"]})
    assert older.round == 1 and older.masks_applied is False
    garbage, unmasked = tmp_path / "garbage.ckpt", tmp_path / "unmasked.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    torch.save({"epoch": 0}, unmasked)
    hidden_only, transposed = tmp_path / "hidden_only.ckpt", tmp_path / "transposed.ckpt"
    mask = "parametrizations.weight.0.mask"
    torch.save({"state_dict": {f"hidden.{mask}": torch.ones(16, 16)}}, hidden_only)
    torch.save({"state_dict": {f"hidden.{mask}": torch.ones(16, 16), f"out.{mask}": torch.ones(16, 3)}}, transposed)
    for path, error in ((garbage, "not a checkpoint"), (unmasked, "holds no pruning masks"),
                        (hidden_only, "has no mask for out$"),
                        (transposed, r": the mask for out has shape \(16, 3\), the weight \(3, 16\)$")):
        control = LotteryTicketPruning(rounds=0, round_steps=4, masks_from=str(path), include=LAYERS)
        with pytest.raises(ValueError, match=f"^LotteryTicketPruning: masks_from {path}.*{error}"):
            trainer(tmp_path / path.stem, [control], max_steps=1).fit(BagOfWordsClassifier(), classification_data())


def test_too_few_steps_for_the_rounds_is_said(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="3 rounds of 4 steps and the last ticket's training need max_steps = 16; "
                                         "this fit stops at 10, in round 2"):
        trainer(tmp_path, [ticket()], max_steps=10).fit(BagOfWordsClassifier(), classification_data())
    import warnings

    with warnings.catch_warnings():  # exactly the steps needed: no warning
        warnings.filterwarnings("error", message=".*rounds of")
        trainer(tmp_path / "enough", [ticket()], max_steps=16).fit(BagOfWordsClassifier(), classification_data())


def test_random_reinit_control_on_another_runs_masks(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="ticket")
    L.seed_everything(0)
    trainer(tmp_path / "t", [ticket(), saver], max_steps=16, enable_checkpointing=True).fit(
        BagOfWordsClassifier(), classification_data())
    control = LotteryTicketPruning(sparsity=0.875, rounds=0, round_steps=4, reinitialize=True, include=LAYERS,
                                   masks_from=str(tmp_path / "ckpt" / "ticket.ckpt"), seed=7)
    model = BagOfWordsClassifier()
    trainer(tmp_path / "c", [control], max_steps=4).fit(model, classification_data())
    ticket_state = torch.load(tmp_path / "ckpt" / "ticket.ckpt", weights_only=True)["state_dict"]
    for name in LAYERS:
        mask = find_weight_transform(getattr(model, name), PruningMask).mask
        assert torch.equal(mask, ticket_state[f"{name}.parametrizations.weight.0.mask"])
        assert (getattr(model, name).weight[mask == 0] == 0).all()
    assert control.weights.sparsity() == pytest.approx(1 - 38 / 304)
    # Resumed mid-run, the control neither reinitialises again nor reapplies the masks: the same
    # weights as an uninterrupted run (a second reinitialisation would throw away its training).
    make_control = lambda: [LotteryTicketPruning(sparsity=0.875, rounds=0, round_steps=4, reinitialize=True,
                                                 include=LAYERS, masks_from=str(tmp_path / "ckpt" / "ticket.ckpt"),
                                                 seed=7)]
    assert_same_state(*resumed_and_uninterrupted(tmp_path / "resume", BagOfWordsClassifier, make_control,
                                                 classification_data, stop=2, total=4))


def test_with_distillation_and_qat(tmp_path: Path) -> None:
    L.seed_everything(3)
    fit = trainer(tmp_path / "teacher", [], max_steps=12)
    fit.fit(DistillableClassifier(), classification_data())
    fit.save_checkpoint(tmp_path / "teacher.ckpt")
    student = DistillableClassifier()
    callbacks = [QuantizationAwareTraining(), KnowledgeDistillation(str(tmp_path / "teacher.ckpt"), teacher_inputs=[0]),
                 ticket()]
    trainer(tmp_path / "s", callbacks, max_steps=16).fit(student, classification_data())
    assert [type(t).__name__ for t in weight_transforms(student.hidden)] == ["PruningMask", "FakeQuantizedWeight"]
    mask = find_weight_transform(student.hidden, PruningMask).mask
    student.eval()
    assert (student.hidden.weight[mask == 0] == 0).all()
    assert 1 - mask.mean().item() > 0.5


def test_two_process_ddp_keeps_the_masks_identical(tmp_path: Path) -> None:
    run_script("pruning_ddp.py", "ticket", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["masks"] == ranks[1]["masks"] and ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["round"] == ranks[1]["round"] == 2


def test_yaml_instantiation() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--pruning", type=LotteryTicketPruning)
    config = parser.parse_string("""
pruning:
  class_path: callbacks.LotteryTicketPruning
  init_args: {sparsity: 0.8, rounds: 4, round_steps: 300, rewind_step: 20, scope: global, exclude: ["*output_projection"]}
""")
    pruning = parser.instantiate_classes(config).pruning
    assert (pruning.rounds, pruning.round_steps, pruning.rewind_step, pruning.exclude) == (4, 300, 20, ["*output_projection"])


def test_gradual_magnitude_pruning_follows_the_cubic_schedule_and_resumes(tmp_path: Path) -> None:
    from callbacks import MagnitudePruning

    def gradual() -> MagnitudePruning:
        return MagnitudePruning(sparsity=0.75, start_step=2, end_step=10, frequency=2, include=LAYERS)

    pruning = gradual()
    assert [round(pruning.target(step), 4) for step in (0, 2, 4, 6, 10, 12)] == [0.0, 0.0, 0.4336, 0.6562, 0.75, 0.75]
    model = BagOfWordsClassifier()
    trainer(tmp_path / "run", [pruning], max_steps=14).fit(model, classification_data())
    assert pruning.weights.sparsity() == pytest.approx(0.75, abs=1 / 304)
    for name in LAYERS:  # no rewinding: the survivors are trained weights, the pruned ones exactly 0
        mask = find_weight_transform(getattr(model, name), PruningMask).mask
        assert (getattr(model, name).weight[mask == 0] == 0).all()
    straight, resumed = resumed_and_uninterrupted(tmp_path, BagOfWordsClassifier, lambda: [gradual()],
                                                  classification_data, stop=5, total=12)
    assert_same_state(straight, resumed, tolerance=0)
    with pytest.raises(ValueError, match="end_step must be an integer >= 3, got 2"):
        MagnitudePruning(start_step=2, end_step=2)


# Which weights a magnitude round keeps, written by hand for tests/callbacks/fixed.py's weights,
# 50% kept (6 of 12): |A| = 9 .1 5 4 / .3 7 .4 6 and |B| = .5 .6 / .8 .05.
GLOBAL_KEEP = ([[1, 0, 1, 1], [0, 1, 0, 1]], [[0, 0], [1, 0]])  # the 6 largest |w| of both: 9 7 6 5 4 .8
LAYER_KEEP = ([[1, 0, 1, 0], [0, 1, 0, 1]], [[0, 1], [1, 0]])  # the larger half of each: 9 7 6 5 | .8 .6
# (Ranking by signed value would keep 6 5 .8 .5 .4 .3; a per-layer round run as "global" keeps LAYER_KEEP.)


@pytest.mark.parametrize(("scope", "expected"), [("global", GLOBAL_KEEP), ("layer", LAYER_KEEP)])
@pytest.mark.parametrize("method", ["ticket", "gradual"])
def test_a_round_keeps_the_largest_magnitudes_over_the_model_or_per_layer(tmp_path: Path, scope: str, expected: tuple,
                                                                         method: str) -> None:
    from callbacks import MagnitudePruning

    model = TwoLinears()  # lr 0: the weights pruned are the ones above
    if method == "ticket":  # one round of 2 steps, then the pruning at step 2
        pruning, steps = LotteryTicketPruning(sparsity=0.5, rounds=1, round_steps=2, scope=scope), 3
    else:  # the cubic schedule reaches 50% at step 1
        pruning, steps = MagnitudePruning(sparsity=0.5, start_step=0, end_step=1, frequency=1, scope=scope), 2
    trainer(tmp_path, [pruning], max_steps=steps).fit(model, batches([[1.0, 1.0, 1.0, 1.0]] * steps))
    for name, weights, kept in zip(("a", "b"), (A, B), expected):
        module = getattr(model, name)
        assert find_weight_transform(module, PruningMask).mask.tolist() == kept, (scope, name)
        # The survivors keep their values, the pruned ones are exactly zero.
        assert trainable_weight(module).tolist() == (torch.tensor(weights) * torch.tensor(kept)).tolist()


@pytest.mark.parametrize(("stop", "total"), [(7, 9), (5, 7)])
def test_resume_right_before_a_pruning_and_inside_a_round(tmp_path: Path, stop: int, total: int) -> None:
    """Prunings at steps 4, 8, 12. Stopped one step before the second pruning; and stopped after
    the first one and resumed to a step before the next, where nothing rewinds: a mask not
    restored from the checkpoint would let the pruned weights train again."""
    straight, resumed = resumed_and_uninterrupted(tmp_path, BagOfWordsClassifier, lambda: [ticket()],
                                                  classification_data, stop=stop, total=total)
    assert "hidden.parametrizations.weight.0.mask" in resumed
    assert_same_state(straight, resumed, tolerance=0)
    if total == 7:
        for name in LAYERS:  # 152 of 304 pruned at step 4 (over both layers); still exactly 0 three steps on
            mask = resumed[f"{name}.parametrizations.weight.0.mask"]
            assert (resumed[f"{name}.parametrizations.weight.original"][mask == 0] == 0).all()
        assert sum(int(resumed[f"{name}.parametrizations.weight.0.mask"].sum()) for name in LAYERS) == 152


class RampClassifier(BagOfWordsClassifier):
    """Adam with lr = 0.01 * (step + 1): every step of the schedule has its own rate."""

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        ramp = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step + 1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": ramp, "interval": "step"}}


def test_late_rewinding_continues_the_schedule_from_step_k(tmp_path: Path) -> None:
    """Frankle et al. rewind the learning rate with the weights: after each pruning (steps 3 and
    6) the rate is the one of step k = 2 and goes on from there; ``schedule="restart"`` starts
    it again at step 0. Adam's moments start afresh either way."""
    expected = {"continue": [0.01, 0.02, 0.03, 0.03, 0.04, 0.05, 0.03],
                "restart": [0.01, 0.02, 0.03, 0.01, 0.02, 0.03, 0.01]}
    for schedule, rates in expected.items():
        seen = []
        probe = LambdaCallback(on_train_batch_start=lambda t, *_: seen.append(
            round(t.optimizers[0].param_groups[0]["lr"], 9)))
        pruning = LotteryTicketPruning(sparsity=0.75, rounds=2, round_steps=3, rewind_step=2, schedule=schedule,
                                       include=LAYERS)
        trainer(tmp_path / schedule, [pruning, probe], max_steps=7).fit(RampClassifier(), classification_data())
        assert seen == rates, schedule


def test_two_process_ddp_gradual_pruning_keeps_the_masks_identical(tmp_path: Path) -> None:
    run_script("pruning_ddp.py", "gradual", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["masks"] == ranks[1]["masks"] and ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["sparsity"] == pytest.approx(0.75, abs=1 / 304)


def test_two_process_ddp_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """Stopped at step 5 (inside the second round) and resumed to 8 under DDP: masks, weights and
    the activation ranges equal an uninterrupted 8-step run on both ranks."""
    for mode in ("straight", "first", "resumed"):
        run_script("resume_ddp.py", tmp_path, mode)
    states = {(mode, rank): json.loads((tmp_path / f"{mode}.rank{rank}.json").read_text())
              for mode in ("straight", "resumed") for rank in range(2)}
    assert "hidden.parametrizations.weight.0.mask" in states["straight", 0]
    assert "hidden.input_quantizer.absmax" in states["straight", 0]
    assert states["straight", 0] == states["straight", 1] == states["resumed", 0] == states["resumed", 1]


def test_three_callbacks_on_one_layer_resume_mid_run_as_uninterrupted(tmp_path: Path) -> None:
    """A lottery ticket's mask, Quant-Noise and QAT on the same weights (mask -> noise -> grid),
    stopped inside the second round and resumed: the same weights, masks and ranges."""
    def callbacks() -> list:
        return [QuantizationAwareTraining(include=LAYERS, quantize_embeddings=False),
                QuantNoise(p=0.25, scheme="int8", block_size=4, include=LAYERS, seed=3), ticket()]

    straight, resumed = resumed_and_uninterrupted(tmp_path, BagOfWordsClassifier, callbacks, classification_data,
                                                  stop=6, total=11)
    assert {"hidden.parametrizations.weight.0.mask", "hidden.input_quantizer.absmax"} <= set(resumed)
    assert_same_state(straight, resumed, tolerance=0)


def test_gradual_pruning_prunes_on_the_schedule_and_only_there(tmp_path: Path) -> None:
    """Zhu & Gupta's cubic schedule, start 2, end 10, every 3 steps: prunings at steps 2 (target 0),
    5, 8 and at end_step 10, none in between. Kept of 304 weights, by hand: s(5) = 0.75 (1 - (5/8)^3),
    keep round(304 (1 - s(5))) = 132; s(8) = 0.75 (1 - (2/8)^3), keep 80; s(10) = 0.75, keep 76."""
    from callbacks import MagnitudePruning

    pruning = MagnitudePruning(sparsity=0.75, start_step=2, end_step=10, frequency=3, include=LAYERS)
    probe = Probe(pruning)
    trainer(tmp_path, [pruning, probe], max_steps=13).fit(BagOfWordsClassifier(), classification_data())
    kept = [probe.remaining[step] for step in range(13)]
    assert kept == [304, 304, 304, 304, 304, 132, 132, 132, 80, 80, 76, 76, 76]


def test_gradual_pruning_errors_name_it(tmp_path: Path) -> None:
    from callbacks import MagnitudePruning

    with pytest.raises(ValueError, match="^MagnitudePruning selected no nn.Linear module with include=\\['nothing'\\]"):
        trainer(tmp_path, [MagnitudePruning(include=["nothing"])], max_steps=1).fit(
            BagOfWordsClassifier(), classification_data())
    with pytest.raises(ValueError, match=r"^MagnitudePruning: the checkpoint was pruned on the schedule None"):
        MagnitudePruning().load_state_dict({})
    plain = tmp_path / "plain.ckpt"
    fit = trainer(tmp_path / "plain", [], max_steps=2)
    fit.fit(BagOfWordsClassifier(), classification_data())
    fit.save_checkpoint(plain)
    with pytest.raises(ValueError, match="^MagnitudePruning: the checkpoint was saved without weight transforms"):
        trainer(tmp_path / "resume", [MagnitudePruning(include=LAYERS)], max_steps=4).fit(
            BagOfWordsClassifier(), classification_data(), ckpt_path=plain)


def test_masks_are_read_from_a_checkpoint_whose_weights_have_other_transforms_too() -> None:
    """masks_in_checkpoint: a weight's mask, not its codebook or QAT state beside it in the chain."""
    from callbacks._pruning import masks_in_checkpoint

    mask = torch.tensor([[1.0, 0.0]])
    state = {"fc.parametrizations.weight.original": torch.ones(1, 2), "fc.parametrizations.weight.0.mask": mask,
             "fc.parametrizations.weight.1.centroids": torch.zeros(4, 2), "fc.bias": torch.zeros(1),
             "block.fc.parametrizations.weight.2.mask": mask * 2}
    found = masks_in_checkpoint(state)
    assert set(found) == {"fc", "block.fc"} and torch.equal(found["fc"], mask) and torch.equal(found["block.fc"], mask * 2)


class SharedLayerClassifier(BagOfWordsClassifier):
    """``hidden`` applied twice, the second time under the name ``again`` (one module, two names,
    as in a model that shares a layer across depths)."""

    def __init__(self) -> None:
        super().__init__()
        self.again = self.hidden

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(torch.relu(self.again(torch.relu(self.hidden(self.embed(tokens).mean(1)))))))


def test_the_manifest_names_every_pruned_weight_under_each_of_its_names_and_nothing_else() -> None:
    # Written out by hand: the exporter reads one entry per state_dict key of a pruned weight,
    # so a module registered under two names needs both, and an unselected one (embed) none.
    from callbacks._pruning import PrunedWeights
    from compression_contract.manifest import SPARSE_ORDER

    model = SharedLayerClassifier()
    weights = PrunedWeights(model, "test", include=["hidden", "again", "out"], exclude=[], embeddings=False)
    checkpoint: dict = {}
    weights.record(checkpoint, model)
    expected = {f"{name}.weight": [{"codec": "sparse", "order": SPARSE_ORDER,
                                    "mask": f"{name}.parametrizations.weight.0.mask"}]
                for name in ("hidden", "again", "out")}
    assert checkpoint["compression"] == expected
    state = model.state_dict()
    for steps in checkpoint["compression"].values():
        assert steps[0]["mask"] in state
    # One mask for the shared module, whichever name reads it.
    assert find_weight_transform(model.hidden, PruningMask) is find_weight_transform(model.again, PruningMask)
    assert len(weights.masks()) == 2
