"""callbacks.KnowledgeDistillation: word-level soft targets and the hidden-state cosine loss."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import KnowledgeDistillation, QuantizationAwareTraining
from callbacks._transforms import weight_transforms
from callbacks.knowledge_distillation import PROJECTION_KEY, PROJECTION_NAME
from nmt_lightning.bpe import PAD_ID
from nmt_lightning.loading import load_translation_module
from nmt_lightning.data import TranslationDataModule
from nmt_lightning.model import TransformerFeatures
from nmt_lightning.module import LossContext, TranslationModule
from tests.callbacks.classifier import DistillableClassifier, classification_data
from tests.callbacks.helpers import (TeacherWithLogits, assert_same_state, context_without_a_recorder,
                                     resumed_and_uninterrupted, tiny_loss_context, trainer)
from tests.callbacks.test_transforms import MaskCallback
from tests.conftest import run_script, tiny_module, tiny_trainer, train_tiny_checkpoint


@pytest.fixture
def classifier_teacher(tmp_path: Path) -> Path:
    L.seed_everything(3)
    fit = trainer(tmp_path / "teacher", [], max_steps=12)
    fit.fit(DistillableClassifier(), classification_data())
    fit.save_checkpoint(tmp_path / "teacher.ckpt")
    return tmp_path / "teacher.ckpt"


@pytest.fixture(scope="module")
def wide_teacher(prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A translation teacher twice as deep and wider (d_model 48) than TINY_MODEL, 20 steps."""
    return train_tiny_checkpoint(prepared_dir, tmp_path_factory.mktemp("wide_teacher"), seed=5, max_steps=20,
                                 d_model=48, encoder_layers=2, decoder_layers=2)


def translation_student(prepared_dir: Path, **overrides) -> tuple[TranslationModule, TranslationDataModule]:
    return tiny_module(prepared_dir, **overrides)


def test_the_teacher_is_frozen_and_stays_out_of_the_student(trained_checkpoint: Path, prepared_dir: Path,
                                                            tmp_path: Path) -> None:
    L.seed_everything(0)
    student, datamodule = translation_student(prepared_dir)
    distillation = KnowledgeDistillation(str(trained_checkpoint), soft_weight=0.5, hard_weight=0.5)
    fit = tiny_trainer(tmp_path, max_steps=4, callbacks=[distillation], log_every_n_steps=1,
                       logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"))
    fit.fit(student, datamodule=datamodule)
    teacher = distillation.teacher.module
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student_ids = {id(p) for p in student.parameters()}
    optimised = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert not any(id(p) in student_ids or id(p) in optimised for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    fit.save_checkpoint(tmp_path / "student.ckpt")
    saved = torch.load(tmp_path / "student.ckpt", weights_only=True)
    assert set(saved["state_dict"]) == set(student.state_dict())
    # The term was trained with and logged; after the fit the module is as it was.
    assert "train/distill_soft" in (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert student.loss_terms == {} and student.loss_weights["cross_entropy"] == 1.0
    # The teacher's weights are the checkpoint's, untouched by four steps of the student.
    reference = load_translation_module(trained_checkpoint)
    for (name, p), q in zip(teacher.model.named_parameters(), reference.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_the_kd_loss_is_zero_when_the_student_is_the_teacher(trained_checkpoint: Path, prepared_dir: Path) -> None:
    """T = 1, same weights, no dropout: the teacher's and the student's logits are the same
    numbers, so each KL term is p * (log p - log p) = 0 exactly; the cosine loss is 1 - 1."""
    student = load_translation_module(trained_checkpoint)
    distillation = KnowledgeDistillation(str(trained_checkpoint), temperature=1.0, hidden_weight=1.0)
    distillation.teacher.load(student)
    distillation.teacher.attach(student)
    datamodule = TranslationDataModule(str(prepared_dir), max_tokens=256)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    recorder = TransformerFeatures.requesting(["hidden_states"])
    logits = student(batch["source"], batch["decoder_input"], recorder)
    mask = batch["target"] != PAD_ID
    context = LossContext(student, batch, logits, batch["target"], mask, mask.sum(), recorder, batch["source"] != PAD_ID)
    assert distillation._soft_loss(context).item() == 0.0
    # 1 - cos of a vector with itself is within a few float32 roundings of 0 per position.
    assert abs(distillation._hidden_loss(context).item()) <= 1e-5 * mask.sum().item()


def test_the_hidden_loss_on_a_student_that_differs_from_its_teacher(trained_checkpoint: Path,
                                                                   prepared_dir: Path) -> None:
    """DistilBERT's cosine loss, computed here from the two models' recorded states in float64: per
    pair, the mean over real positions (source positions for an encoder state, target positions
    for a decoder state) of 1 - cos(student, teacher), averaged over the pairs, times the target
    tokens. The student is an untrained model, so every pair gives another value; the context is
    a plain namespace without .module (a module that is not ours has no projection to offer)."""
    from types import SimpleNamespace

    layer_map = {"decoder.1": "decoder.0", "encoder.1": "encoder.1", "decoder.0": "decoder.1"}  # 1+1 layers
    distillation = KnowledgeDistillation(str(trained_checkpoint), hidden_weight=1.0, layer_map=layer_map)
    torch.manual_seed(11)
    student, datamodule = translation_student(prepared_dir)
    student.eval()
    distillation.teacher.load(student)
    teacher = load_translation_module(trained_checkpoint).eval()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    mine, theirs = (TransformerFeatures.requesting(["hidden_states"]) for _ in range(2))
    with torch.no_grad():
        logits = student(batch["source"], batch["decoder_input"], mine)
        teacher(batch["source"], batch["decoder_input"], theirs)
    target_mask, source_mask = batch["target"] != PAD_ID, batch["source"] != PAD_ID
    num_tokens = target_mask.sum()
    context = SimpleNamespace(batch=batch, logits=logits, target=batch["target"], target_mask=target_mask,
                              num_tokens=num_tokens, features=mine, source_mask=source_mask)
    per_pair = []
    for student_key, teacher_key in layer_map.items():
        side, index = student_key.split(".")
        mask = target_mask if side == "decoder" else source_mask
        a = getattr(mine, f"{side}_states")[int(index)][mask].double()  # (N, D)
        b = getattr(theirs, f"{side}_states")[int(teacher_key.split(".")[1])][mask].double()
        cosines = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        per_pair.append((1 - cosines).mean())
    assert len({round(value.item(), 4) for value in per_pair}) == len(per_pair)  # the pairs differ
    expected = torch.stack(per_pair).mean() * num_tokens
    with torch.no_grad():
        found = distillation._hidden_loss(context)
    # float32 cosines of width-32 vectors: about 1e-6 each, averaged
    torch.testing.assert_close(found.double(), expected, rtol=1e-5, atol=1e-5)


def test_the_teacher_runs_once_per_batch_and_answers_for_that_batch(trained_checkpoint: Path,
                                                                    prepared_dir: Path) -> None:
    """Two batches, each read by the soft and the hidden term: the teacher runs once per batch (the
    terms share its outputs) and each batch's soft loss is T^2 times the sum over its target
    positions of KL(teacher || student), computed here in float64 from a separately loaded teacher
    on that batch, so outputs kept from the previous batch give another number. The teacher here
    returns an object with .logits, which the callback reads as it reads plain logits."""

    temperature = 2.0
    distillation = KnowledgeDistillation(str(trained_checkpoint), temperature=temperature, hidden_weight=1.0)
    torch.manual_seed(11)
    student, datamodule = translation_student(prepared_dir)
    student.eval()
    distillation.teacher.load(student)
    distillation.teacher.module = counting = TeacherWithLogits(distillation.teacher.module)
    reference = load_translation_module(trained_checkpoint).eval()
    datamodule.setup("fit")
    batches = iter(datamodule.train_dataloader())
    for seen, batch in enumerate([next(batches), next(batches)], start=1):
        mine = TransformerFeatures.requesting(["hidden_states"])
        with torch.no_grad():
            logits = student(batch["source"], batch["decoder_input"], mine)
            theirs = reference(batch["source"], batch["decoder_input"]).double()
        mask = batch["target"] != PAD_ID
        context = LossContext(student, batch, logits, batch["target"], mask, mask.sum(), mine,
                              batch["source"] != PAD_ID)
        with torch.no_grad():
            soft = distillation._soft_loss(context)
            distillation._hidden_loss(context)
        assert counting.calls == seen
        log_p = torch.log_softmax(theirs / temperature, dim=-1)[mask]  # (N, V)
        log_q = torch.log_softmax(logits.double() / temperature, dim=-1)[mask]
        expected = temperature ** 2 * (log_p.exp() * (log_p - log_q)).sum()
        torch.testing.assert_close(soft.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("features", [None, "a namespace"])
def test_the_hidden_loss_needs_a_recorder_in_the_loss_context(features, trained_checkpoint: Path) -> None:
    """hidden_weight > 0 reads per-layer states, recorded by an object whose class offers
    requesting(): a context without one (None, or features of another kind) is refused in one line
    before the teacher runs."""
    distillation = KnowledgeDistillation(str(trained_checkpoint), hidden_weight=1.0)
    context = context_without_a_recorder(features)
    with pytest.raises(TypeError, match=r"^KnowledgeDistillation: hidden_weight > 0 needs the module's loss context "
                                        r"to carry per-layer features \(context.features with a requesting\(\)"):
        distillation._teacher_pass(context)


def test_a_teacher_with_another_tokenization_is_refused(trained_checkpoint: Path, prepared_dir: Path,
                                                        tmp_path: Path) -> None:
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    checkpoint["nmt_lightning_tokenization"]["moses_normalize"] = True
    torch.save(checkpoint, tmp_path / "other.ckpt")
    student, datamodule = translation_student(prepared_dir)
    with pytest.raises(ValueError, match=r"other tokenization.*teacher: en->cs.*moses_normalize=True.*"
                                         r"student: en->cs.*moses_normalize=False"):
        tiny_trainer(tmp_path, max_steps=1, callbacks=[KnowledgeDistillation(str(tmp_path / "other.ckpt"))]).fit(
            student, datamodule=datamodule)


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path: Path) -> None:
    fit = trainer(tmp_path / "t", [], max_steps=1)
    fit.fit(DistillableClassifier(classes=4), classification_data())
    fit.save_checkpoint(tmp_path / "four.ckpt")
    with pytest.raises(ValueError, match=r"four.ckpt gives logits of shape \(8, 4\) where the student's are \(8, 3\).*"
                                         r"\(4 vs 3 entries\)"):
        trainer(tmp_path / "s", [KnowledgeDistillation(str(tmp_path / "four.ckpt"), teacher_inputs=[0])],
                max_steps=1).fit(DistillableClassifier(), classification_data())


def test_a_module_without_the_extension_point_is_refused(classifier_teacher: Path, tmp_path: Path) -> None:
    from tests.callbacks.classifier import BagOfWordsClassifier

    with pytest.raises(TypeError, match="needs the LightningModule to offer register_loss_term, remove_loss_term, "
                                        "set_loss_weight .*BagOfWordsClassifier lacks it"):
        trainer(tmp_path, [KnowledgeDistillation(str(classifier_teacher), teacher_inputs=[0],
                                                 teacher_loader="tests.callbacks.test_knowledge_distillation.classifier")],
                max_steps=1).fit(BagOfWordsClassifier(), classification_data())


def classifier(path: str) -> DistillableClassifier:
    return DistillableClassifier.load_from_checkpoint(path, weights_only=True)


def test_a_classifier_that_is_not_ours_learns_from_its_teacher(classifier_teacher: Path, tmp_path: Path) -> None:
    """Soft targets alone (hard_weight 0): the student moves towards the teacher's predictions."""
    teacher = classifier(str(classifier_teacher)).eval()
    data = classification_data()
    tokens = torch.cat([batch[0] for batch in data])

    def disagreement(student: DistillableClassifier) -> float:
        with torch.no_grad():
            return torch.nn.functional.kl_div(student(tokens).log_softmax(-1), teacher(tokens).log_softmax(-1),
                                              log_target=True, reduction="batchmean").item()

    L.seed_everything(0)
    student = DistillableClassifier()
    before = disagreement(student)
    distillation = KnowledgeDistillation(str(classifier_teacher), teacher_inputs=[0], soft_weight=1.0, hard_weight=0.0)
    trainer(tmp_path, [distillation], max_steps=40).fit(student, classification_data())
    assert disagreement(student) < before / 4
    assert student.task_weight == 1.0  # restored after the fit


def test_resume_equals_an_uninterrupted_run(classifier_teacher: Path, tmp_path: Path) -> None:
    straight, resumed = resumed_and_uninterrupted(
        tmp_path, DistillableClassifier,
        lambda: [KnowledgeDistillation(str(classifier_teacher), teacher_inputs=[0], temperature=3.0)],
        classification_data, stop=5, total=12)
    assert_same_state(straight, resumed, tolerance=0)


def test_hidden_states_of_another_width_train_a_projection_that_resumes_and_is_not_exported(
        wide_teacher: Path, prepared_dir: Path, tmp_path: Path) -> None:
    """Student d_model 32, teacher 48: a learned 32 -> 48 map per pair, trained with the student,
    in its checkpoint (so a resume continues it), not in the translation model."""
    layer_map = {"encoder.1": "encoder.2", "decoder.1": "decoder.2", "decoder_output": "decoder_output"}

    def run(root: Path, steps: int, ckpt_path=None, saver=None) -> TranslationModule:
        L.seed_everything(0)
        student, datamodule = translation_student(prepared_dir)
        callbacks = [KnowledgeDistillation(str(wide_teacher), hidden_weight=1.0, layer_map=layer_map)]
        fit = tiny_trainer(root, max_steps=steps, callbacks=callbacks + ([saver] if saver else []),
                           enable_checkpointing=saver is not None)
        fit.fit(student, datamodule=datamodule, ckpt_path=ckpt_path)
        return student

    straight = run(tmp_path / "a", 8)
    projection = getattr(straight, PROJECTION_NAME)
    assert tuple(projection.weight.shape) == (3, 48, 32)
    assert all(weight_transforms(m) == [] for m in projection.modules())
    run(tmp_path / "b", 4, saver=ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, filename="mid"))
    resumed = run(tmp_path / "c", 8, ckpt_path=tmp_path / "ckpt" / "mid.ckpt")
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # The student's checkpoint holds the projection beside its weights, not among them: it loads
    # into its own class (so it can be a teacher in turn), and translating leaves it out.
    saved = torch.load(tmp_path / "ckpt" / "mid.ckpt", weights_only=True)
    assert f"{PROJECTION_NAME}.weight" not in saved["state_dict"]
    assert saved[PROJECTION_KEY][f"{PROJECTION_NAME}.weight"].shape == (3, 48, 32)
    reloaded = TranslationModule.load_from_checkpoint(tmp_path / "ckpt" / "mid.ckpt", weights_only=True)
    assert not hasattr(reloaded, PROJECTION_NAME)
    deployed = load_translation_module(tmp_path / "ckpt" / "mid.ckpt")
    assert not hasattr(deployed, PROJECTION_NAME)
    # A checkpoint with no projection (the student trained alone before distillation) leaves the
    # module's projection as it is.
    before = projection.weight.detach().clone()
    KnowledgeDistillation(str(wide_teacher), hidden_weight=1.0, layer_map=layer_map).on_load_checkpoint(
        None, straight, {"state_dict": saved["state_dict"]})
    assert torch.equal(projection.weight, before)


def test_the_projection_is_added_where_the_widths_differ_and_only_once(wide_teacher: Path,
                                                                       trained_checkpoint: Path,
                                                                       prepared_dir: Path) -> None:
    """A hidden loss between a 32-wide student and a 48-wide teacher needs the learned map; none is
    added without the hidden loss, outside a fit, or between models of one width. A second setup
    keeps the map it finds (its trained weights), and refuses one of another shape."""
    layer_map = {"encoder.1": "encoder.2", "decoder.1": "decoder.2", "decoder_output": "decoder_output"}
    for checkpoint, weight, stage in ((wide_teacher, 0.0, "fit"), (wide_teacher, 1.0, "validate"),
                                      (trained_checkpoint, 1.0, "fit")):
        student, _ = translation_student(prepared_dir)
        KnowledgeDistillation(str(checkpoint), hidden_weight=weight, layer_map=layer_map).setup(None, student, stage)
        assert not hasattr(student, PROJECTION_NAME), (checkpoint.name, weight, stage)
    student, _ = translation_student(prepared_dir)
    KnowledgeDistillation(str(wide_teacher), hidden_weight=1.0, layer_map=layer_map).setup(None, student, "fit")
    projection = getattr(student, PROJECTION_NAME)
    assert tuple(projection.weight.shape) == (3, 48, 32)
    KnowledgeDistillation(str(wide_teacher), hidden_weight=1.0, layer_map=layer_map).setup(None, student, "fit")
    assert getattr(student, PROJECTION_NAME) is projection
    fewer = dict(list(layer_map.items())[:2])
    with pytest.raises(ValueError, match=r"^KnowledgeDistillation: the module already holds a .* of shape "
                                         r"\(3, 48, 32\), this layer_map needs \(2, 48, 32\)$"):
        KnowledgeDistillation(str(wide_teacher), hidden_weight=1.0, layer_map=fewer).setup(None, student, "fit")


def test_no_projection_where_a_module_states_no_width(classifier_teacher: Path) -> None:
    """A module that is not ours may have no hidden_size: with a student that states its width and a
    teacher that does not, the widths cannot be compared, so no projection is added (a width
    mismatch, if any, is then named by the hidden loss)."""
    student = DistillableClassifier()
    student.hidden_size = 16  # the teacher, loaded through the class, has none
    KnowledgeDistillation(str(classifier_teacher), teacher_inputs=[0], hidden_weight=1.0).setup(None, student, "fit")
    assert not hasattr(student, PROJECTION_NAME)


def test_together_with_qat_and_with_a_pruning_mask(classifier_teacher: Path, tmp_path: Path) -> None:
    """Composes with QAT and a pruning mask on the student; the teacher gets neither."""
    L.seed_everything(0)
    student = DistillableClassifier()
    distillation = KnowledgeDistillation(str(classifier_teacher), teacher_inputs=[0])
    trainer(tmp_path, [MaskCallback(), QuantizationAwareTraining(), distillation], max_steps=8).fit(
        student, classification_data())
    assert [type(t).__name__ for t in weight_transforms(student.hidden)] == ["KeepLargest", "FakeQuantizedWeight"]
    assert all(weight_transforms(m) == [] for m in distillation.teacher.module.modules())
    mask = weight_transforms(student.hidden)[0].mask
    student.eval()
    assert (student.hidden.weight[mask == 0] == 0).all()
    assert "distill_soft" in student.trainer.logged_metrics


def test_two_process_ddp(classifier_teacher: Path, tmp_path: Path) -> None:
    run_script("distillation_ddp.py", classifier_teacher, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # the same model on both ranks after 3 steps
    assert all(r["wrapped_parameters"] == r["student_parameters"] for r in ranks)
    assert all(r["distill_soft_logged"] for r in ranks)


def test_yaml_instantiation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jsonargparse import ArgumentParser

    monkeypatch.chdir(tmp_path)  # the teacher must exist where the callback is made
    Path("runs/teacher").mkdir(parents=True)
    torch.save({"state_dict": {}}, "runs/teacher/last.ckpt")
    parser = ArgumentParser()
    parser.add_argument("--distillation", type=KnowledgeDistillation)
    config = parser.parse_string("""
distillation:
  class_path: callbacks.KnowledgeDistillation
  init_args:
    teacher: runs/teacher/last.ckpt
    temperature: 2.0
    hidden_weight: 1.0
    layer_map: {decoder.3: decoder.6, encoder_output: encoder_output}
""")
    distillation = parser.instantiate_classes(config).distillation
    assert distillation.layer_map == {"decoder.3": "decoder.6", "encoder_output": "encoder_output"}
    assert (distillation.temperature, distillation.hidden_weight, distillation.teacher.checkpoint) == (
        2.0, 1.0, "runs/teacher/last.ckpt")


def test_an_int8_export_is_a_faster_teacher(trained_checkpoint: Path, prepared_dir: Path, tmp_path: Path) -> None:
    """teacher_loader names any path -> module function: here an int8 export, run on FBGEMM."""
    from nmt_lightning.translation_file import export_checkpoint
    from nmt_lightning.export.codecs.int8_kernels import Int8Linear

    export_checkpoint(trained_checkpoint, tmp_path / "teacher.int8.safetensors", "int8")
    L.seed_everything(0)
    student, datamodule = translation_student(prepared_dir)
    distillation = KnowledgeDistillation(str(tmp_path / "teacher.int8.safetensors"),
                                         teacher_loader="nmt_lightning.loading.load_translation_module")
    tiny_trainer(tmp_path, max_steps=3, callbacks=[distillation]).fit(student, datamodule=datamodule)
    assert any(isinstance(m, Int8Linear) for m in distillation.teacher.module.modules())
    assert torch.isfinite(student.trainer.logged_metrics["train/distill_soft"])


def test_the_task_weight_a_module_had_is_restored_after_the_fit(classifier_teacher: Path, tmp_path: Path) -> None:
    """A module whose own task weight was 0.8 ends the distillation fit at 0.8 (read through the
    protocol's loss_weight getter), not at 1.0."""

    class WeighedClassifier(DistillableClassifier):
        def loss_weight(self, name):
            return self.task_weight if name == "cross_entropy" else self.terms[name][1]

    student = WeighedClassifier()
    student.task_weight = 0.8
    distillation = KnowledgeDistillation(str(classifier_teacher), teacher_inputs=[0], hard_weight=0.3)
    trainer(tmp_path, [distillation], max_steps=2).fit(student, classification_data())
    assert student.task_weight == 0.8 and student.terms == {}


def test_a_missing_teacher_input_names_what_the_batch_holds(trained_checkpoint: Path) -> None:
    from types import SimpleNamespace
    from callbacks._distillation import teacher_inputs_of

    tokens = torch.zeros(2, 3, dtype=torch.long)
    distillation = KnowledgeDistillation(str(trained_checkpoint))  # the callback names itself
    with pytest.raises(KeyError, match=r"^\"KnowledgeDistillation: the batch has no field 'source' for the teacher "):
        distillation._teacher_pass(SimpleNamespace(batch={"src": tokens}))
    with pytest.raises(KeyError, match=r"KnowledgeDistillation: the batch has no field 'source' for the teacher "
                                       r"\(teacher_inputs=\['source'\]; the batch has \['src', 'tgt'\]\)"):
        teacher_inputs_of("KnowledgeDistillation", {"src": tokens, "tgt": tokens}, ["source"])
    with pytest.raises(KeyError, match=r"no field 2 .*the batch has 2 items"):
        teacher_inputs_of("KnowledgeDistillation", (tokens, tokens), [0, 2])
    assert teacher_inputs_of("KnowledgeDistillation", (tokens, tokens + 1), [1, 0])[0].sum() == 6


@pytest.mark.parametrize("layer_map, student_states, teacher_states, error", [
    # a module that is not ours may hand no source mask: an encoder pair cannot say which positions are real
    ({"encoder_output": "encoder_output"}, {"encoder_output": torch.ones(1, 3, 4)},
     {"encoder_output": torch.ones(1, 3, 4)},
     r"^KnowledgeDistillation: an encoder state in layer_map needs context.source_mask$"),
    # features without the state at all, on either side: which model's forward failed to record it
    ({"decoder_output": "decoder_output"}, {}, {"decoder_output": torch.ones(1, 2, 4)},
     r"^KnowledgeDistillation: the student's forward recorded no decoder_output$"),
    ({"decoder_output": "decoder_output"}, {"decoder_output": torch.ones(1, 2, 4)}, {},
     r"^KnowledgeDistillation: the teacher's forward recorded no decoder_output$"),
    ({"decoder.2": "decoder.1"}, {"decoder_states": [torch.ones(1, 2, 4)] * 2},
     {"decoder_states": [torch.ones(1, 2, 4)] * 3},
     r"^KnowledgeDistillation: layer_map names decoder.2 of the student, which has only 2 decoder states "),
    ({"decoder.1": "decoder.3"}, {"decoder_states": [torch.ones(1, 2, 4)] * 2},
     {"decoder_states": [torch.ones(1, 2, 4)] * 3},
     r"^KnowledgeDistillation: layer_map names decoder.3 of the teacher, which has only 3 decoder states "),
    ({"decoder.1": "decoder.1"}, {}, {"decoder_states": [torch.ones(1, 2, 4)] * 2},
     r"^KnowledgeDistillation: layer_map names decoder.1 of the student, which has only 0 decoder states "),
])
def test_a_state_the_hidden_loss_cannot_read_is_named_with_its_model(trained_checkpoint: Path, layer_map,
                                                                      student_states, teacher_states,
                                                                      error: str) -> None:
    """The hidden loss of a module that is not ours: its loss context is a plain namespace
    (1 sentence, 3 source and 2 target positions, states of width 4) and may lack what the pairs need. Each
    gap is one line naming the state and whose forward lacks it, not an AttributeError."""
    from types import SimpleNamespace
    from callbacks.knowledge_distillation import _TeacherPass

    distillation = KnowledgeDistillation(str(trained_checkpoint), hidden_weight=1.0, layer_map=layer_map)
    context = tiny_loss_context(target_mask=torch.ones(1, 2, dtype=torch.bool), num_tokens=torch.tensor(2),
                                features=SimpleNamespace(**student_states))
    # the teacher has run on this batch
    distillation._pass = _TeacherPass(context.batch, context.logits, SimpleNamespace(**teacher_states))
    with pytest.raises((TypeError, ValueError), match=error):
        distillation._hidden_loss(context)


def test_one_callback_distils_in_two_fits_in_a_row(classifier_teacher: Path, tmp_path: Path) -> None:
    """A run continued by a second fit with the same callback (as in a notebook): the second fit
    distils as the first did, its terms registered again and the task weight set and restored
    again; nothing the first fit left behind (its last teacher pass) is read."""

    class Terms(L.Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[str, ...]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.seen.append((*sorted(pl_module.terms), pl_module.task_weight))

    student = DistillableClassifier()
    distillation = KnowledgeDistillation(str(classifier_teacher), teacher_inputs=[0], hard_weight=0.3)
    for fit in range(2):
        terms = Terms()
        trainer(tmp_path / str(fit), [distillation, terms], max_steps=2).fit(student, classification_data())
        assert terms.seen == [("distill_soft", 0.3)] * 2
        assert student.task_weight == 1.0 and student.terms == {}


@pytest.mark.parametrize("soft, hard, hidden, terms, task_weight", [
    (0.5, 0.5, 0.0, [("distill_soft", 0.5, ())], 0.5),
    (0.0, 1.0, 0.7, [("distill_hidden", 0.7, ("hidden_states",))], None),  # hard 1: the module's loss untouched
    (0.25, 2.0, 0.5, [("distill_soft", 0.25, ()), ("distill_hidden", 0.5, ("hidden_states",))], 2.0),
])
def test_the_terms_a_fit_registers_are_those_weighed_above_0(classifier_teacher: Path, soft: float, hard: float,
                                                            hidden: float, terms: list, task_weight) -> None:
    """At the start of a fit the callback registers each term whose weight is > 0, with that weight
    and the features it reads, and sets the module's task weight to hard_weight unless it is 1;
    a module without set_loss_weight is then accepted (hard_weight 1 needs no weight set, at the
    start or at the end of the fit)."""

    class Recording(DistillableClassifier):
        def register_loss_term(self, name, fn, weight=1.0, features=()) -> None:
            self.registered.append((name, weight, tuple(features)))

    student = Recording()
    student.registered = []
    if task_weight is None:
        student.set_loss_weight = None  # not callable: the module lacks the setter
    distillation = KnowledgeDistillation(str(classifier_teacher), teacher_inputs=[0], soft_weight=soft,
                                         hard_weight=hard, hidden_weight=hidden)
    distillation.setup(None, student, "fit")
    distillation.on_fit_start(None, student)
    assert student.registered == terms
    assert student.task_weight == (1.0 if task_weight is None else task_weight)
    distillation.on_fit_end(None, student)
    assert student.task_weight == 1.0  # restored where it was set, and left alone where it was not
