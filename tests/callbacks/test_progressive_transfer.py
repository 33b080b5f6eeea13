"""callbacks.ProgressiveKnowledgeTransfer: layer-wise feature-map and attention transfer (MobileBERT)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks import ProgressiveKnowledgeTransfer, QuantizationAwareTraining
from nmt_lightning.bpe import PAD_ID
from nmt_lightning.checkpoints import load_translation_module
from nmt_lightning.data import TranslationDataModule
from nmt_lightning.export import export_checkpoint, load_exported
from nmt_lightning.int8 import Int8Linear
from nmt_lightning.model import TransformerFeatures
from nmt_lightning.module import LossContext, TranslationModule
from nmt_lightning.translate import translate_lines
from tests.callbacks.helpers import assert_same_state, resumed_and_uninterrupted
from tests.conftest import run_script, tiny_module, tiny_trainer, train_tiny_checkpoint

# The teacher: TINY_MODEL (d_model 32, 2 heads) with 2+2 layers. The deep, thin student: the
# teacher's depth and inter-block width, 16-wide blocks, 8-wide embeddings.
STUDENT = {"encoder_layers": 2, "decoder_layers": 2, "bottleneck_dim": 16, "stacked_ffn": 2, "ffn_dim": 32,
           "embedding_dim": 8}


@pytest.fixture(scope="module")
def teacher(prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_checkpoint(prepared_dir, tmp_path_factory.mktemp("transfer_teacher"), seed=5, max_steps=20,
                                 encoder_layers=2, decoder_layers=2)


def student(prepared_dir: Path, **overrides) -> tuple[TranslationModule, TranslationDataModule]:
    return tiny_module(prepared_dir, **{**STUDENT, **overrides})


class Snapshots(L.Callback):
    """The student's parameters at the start of every optimiser step, and at the end."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def _take(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.at[trainer.global_step] = {n: p.detach().clone() for n, p in module.named_parameters()}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._take(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self._take(trainer, module)


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_progressive_stages_train_one_layer_each_with_the_rest_frozen(teacher: Path, prepared_dir: Path,
                                                                     tmp_path: Path) -> None:
    L.seed_everything(0)
    module, datamodule = student(prepared_dir)
    transfer = ProgressiveKnowledgeTransfer(str(teacher), stage_steps=2)
    snapshots = Snapshots()
    fit = tiny_trainer(tmp_path, max_steps=10, callbacks=[transfer, snapshots], log_every_n_steps=1)
    fit.fit(module, datamodule=datamodule)
    assert [transfer.stage_at(step) for step in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    stages = [changed(snapshots.at[step], snapshots.at[step + 2]) for step in range(0, 10, 2)]
    prefixes = [("model.encoder_layers.0.", "model.src_embed.", "model.encoder_embed_projection."),
                ("model.encoder_layers.1.",),
                ("model.decoder_layers.0.", "model.decoder_embed_projection."),  # the table is shared with the source
                ("model.decoder_layers.1.",)]
    for stage, (updated, allowed) in enumerate(zip(stages, prefixes)):
        assert updated and all(name.startswith(allowed) for name in updated), (stage, sorted(updated))
    assert "model.output_down_projection.weight" in stages[4]  # the distillation stage trains everything
    # The optimiser restarted with the last stage: two Adam steps in its state, not ten.
    state = fit.optimizers[0].state[module.model.output_down_projection.weight]
    assert int(state["step"]) == 2
    assert module.loss_terms == {} and module.loss_weights["cross_entropy"] == 1.0  # restored after the fit
    assert fit.logged_metrics["transfer/stage"] == 4
    assert "train/transfer_soft" in fit.logged_metrics


def test_transfer_losses_are_zero_when_the_student_is_the_teacher(teacher: Path, prepared_dir: Path) -> None:
    """Same weights, no dropout: the normalised states and the attention maps are the same
    numbers, so each squared error and each p * (log p - log p) is exactly 0."""
    module = load_translation_module(teacher)
    transfer = ProgressiveKnowledgeTransfer(str(teacher), mode="joint")
    transfer.setup(None, module, "fit")
    transfer.teacher.attach(module)
    transfer.stage = 0  # the joint transfer stage: every layer, both losses
    datamodule = TranslationDataModule(str(prepared_dir), max_tokens=256)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    recorder = TransformerFeatures.requesting(["hidden_states", "attention"])
    logits = module(batch["source"], batch["decoder_input"], recorder)
    mask = batch["target"] != PAD_ID
    context = LossContext(module, batch, logits, batch["target"], mask, mask.sum(), recorder, batch["source"] != PAD_ID)
    assert transfer._feature_loss(context).item() == 0.0
    assert transfer._attention_loss(context).item() == 0.0
    assert transfer._soft_loss(context).item() == 0.0


def test_resume_in_the_middle_of_a_stage_equals_an_uninterrupted_run(teacher: Path, prepared_dir: Path,
                                                                      tmp_path: Path) -> None:
    """Stopped at step 3 (inside the second layer's stage), resumed to step 10 (distillation stage)."""
    straight, resumed = resumed_and_uninterrupted(
        tmp_path, lambda: student(prepared_dir)[0],
        lambda: [ProgressiveKnowledgeTransfer(str(teacher), stage_steps=2)],
        lambda: TranslationDataModule(str(prepared_dir), max_tokens=256), stop=3, total=10,
        deterministic=False)
    assert_same_state(straight, resumed, tolerance=1e-6)
    other = ProgressiveKnowledgeTransfer(str(teacher), stage_steps=3)
    saved = torch.load(tmp_path / "ckpt" / "mid.ckpt", weights_only=True)["callbacks"]
    with pytest.raises(ValueError, match="the checkpoint trained with .*'stage_steps': 2.* but this callback has"):
        other.load_state_dict(next(v for k, v in saved.items() if k.startswith("ProgressiveKnowledgeTransfer")))


@pytest.mark.parametrize("mode, terms_first, terms_last", [
    ("joint", {"transfer_features", "transfer_attention"}, {"transfer_soft"}),
    ("auxiliary", {"transfer_features", "transfer_attention", "transfer_soft"},
     {"transfer_features", "transfer_attention", "transfer_soft"}),
])
def test_joint_and_auxiliary_modes(mode: str, terms_first: set, terms_last: set, teacher: Path, prepared_dir: Path,
                                   tmp_path: Path) -> None:
    class Terms(L.Callback):
        """The loss terms registered at the end of every training batch."""

        def __init__(self) -> None:
            self.seen: list[set] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.seen.append(set(module.loss_terms))

    L.seed_everything(0)
    module, datamodule = student(prepared_dir)
    transfer = ProgressiveKnowledgeTransfer(str(teacher), mode=mode, stage_steps=1)
    terms = Terms()
    tiny_trainer(tmp_path, max_steps=6, callbacks=[transfer, terms]).fit(module, datamodule=datamodule)
    assert terms.seen[0] == terms_first and terms.seen[-1] == terms_last
    assert transfer.transfer_steps == (4 if mode == "joint" else 0)
    assert not transfer.freezer.frozen


def test_a_teacher_of_another_depth_is_refused_and_too_few_steps_warned(teacher: Path, prepared_dir: Path,
                                                                  tmp_path: Path) -> None:
    module, datamodule = student(prepared_dir, encoder_layers=1)
    with pytest.raises(ValueError, match="the student's encoder has 1 layers and the teacher .* 2; layer-wise"):
        tiny_trainer(tmp_path, max_steps=2, callbacks=[ProgressiveKnowledgeTransfer(str(teacher))]).fit(
            module, datamodule=datamodule)
    module, datamodule = student(prepared_dir)
    with pytest.warns(UserWarning, match="transfer stages take 8 steps .* max_steps=1: this fit ends before"):
        tiny_trainer(tmp_path, max_steps=1, callbacks=[ProgressiveKnowledgeTransfer(str(teacher), stage_steps=2)]).fit(
            module, datamodule=datamodule)


def test_a_shallower_student_learns_from_chosen_teacher_layers(teacher: Path, prepared_dir: Path,
                                                                tmp_path: Path) -> None:
    """teacher_layers maps the 1+1 student's layer to the 2+2 teacher's layer 2 (the Model
    Garden's transfer_teacher_layers); a list of the wrong length or range is refused."""
    module, datamodule = student(prepared_dir, encoder_layers=1, decoder_layers=1)
    transfer = ProgressiveKnowledgeTransfer(str(teacher), stage_steps=1, teacher_layers={"encoder": [2], "decoder": [2]})
    tiny_trainer(tmp_path, max_steps=3, callbacks=[transfer]).fit(module, datamodule=datamodule)
    assert transfer.mapping == {"encoder": [2], "decoder": [2]} and transfer.stage == 2
    for wrong in ({"encoder": [1, 2], "decoder": [2]}, {"encoder": [3], "decoder": [2]}):
        module, datamodule = student(prepared_dir, encoder_layers=1, decoder_layers=1)
        with pytest.raises(ValueError, match="must name one teacher layer \\(1..2\\) for each of the student's 1"):
            tiny_trainer(tmp_path, max_steps=1, callbacks=[ProgressiveKnowledgeTransfer(
                str(teacher), teacher_layers=wrong)]).fit(module, datamodule=datamodule)


def test_the_teachers_embeddings_are_copied_where_the_shapes_agree(teacher: Path, prepared_dir: Path,
                                                                   tmp_path: Path) -> None:
    module, _ = student(prepared_dir, embedding_dim=None)  # embeddings of the teacher's width
    ProgressiveKnowledgeTransfer(str(teacher)).setup(None, module, "fit")
    reference = load_translation_module(teacher)
    torch.testing.assert_close(module.model.src_embed.weight, reference.model.src_embed.weight, rtol=0, atol=0)


def test_two_process_ddp_through_every_stage(teacher: Path, prepared_dir: Path, tmp_path: Path) -> None:
    run_script("progressive_transfer_ddp.py", prepared_dir, teacher, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["stage"] == ranks[1]["stage"] == 4  # the distillation stage was reached
    assert ranks[0]["weights"] == ranks[1]["weights"]  # the same model on both ranks


def test_yaml_instantiation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jsonargparse import ArgumentParser

    monkeypatch.chdir(tmp_path)  # the teacher must exist where the callback is made
    Path("runs/teacher").mkdir(parents=True)
    torch.save({"state_dict": {}}, "runs/teacher/last.ckpt")
    parser = ArgumentParser()
    parser.add_argument("--transfer", type=ProgressiveKnowledgeTransfer)
    config = parser.parse_string("""
transfer:
  class_path: callbacks.ProgressiveKnowledgeTransfer
  init_args:
    teacher: runs/teacher/last.ckpt
    mode: auxiliary
    stage_steps: 300
    attention_weight: 0.5
    sides: [decoder]
""")
    transfer = parser.instantiate_classes(config).transfer
    assert (transfer.mode, transfer.stage_steps, transfer.attention_weight, transfer.sides) == (
        "auxiliary", 300, 0.5, ["decoder"])


def test_the_bottleneck_student_trains_with_qat_and_exports_to_int8(teacher: Path, prepared_dir: Path,
                                                                    tmp_path: Path) -> None:
    L.seed_everything(0)
    module, datamodule = student(prepared_dir)
    callbacks = [ProgressiveKnowledgeTransfer(str(teacher), stage_steps=1), QuantizationAwareTraining()]
    fit = tiny_trainer(tmp_path, max_steps=6, callbacks=callbacks)
    fit.fit(module, datamodule=datamodule)
    fit.save_checkpoint(tmp_path / "student.ckpt")
    fp32 = export_checkpoint(tmp_path / "student.ckpt", tmp_path / "student.fp32.safetensors", "fp32")
    int8 = export_checkpoint(tmp_path / "student.ckpt", tmp_path / "student.int8.safetensors", "int8")
    # The file also holds the sentencepiece models; of the weights, int8 saves most (biases,
    # LayerNorms and per-channel scales stay fp32, a large share in layers this small).
    assert fp32.bytes_on_disk - int8.bytes_on_disk > 0.4 * fp32.weight_bytes_fp32
    deployed = load_exported(tmp_path / "student.int8.safetensors")
    linear = {name: type(m) for name, m in deployed.model.named_modules() if "bottleneck" in name}
    assert linear and set(linear.values()) == {Int8Linear}, linear
    lines = (prepared_dir / "test.en").read_text(encoding="utf-8").splitlines()[:2]
    assert len(translate_lines(deployed, lines, beam=1, progress=False)) == 2
