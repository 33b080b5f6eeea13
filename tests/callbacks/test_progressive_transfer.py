"""callbacks.ProgressiveKnowledgeTransfer: layer-wise feature-map and attention transfer (MobileBERT)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from callbacks import ProgressiveKnowledgeTransfer, QuantizationAwareTraining
from nmt_lightning.bpe import PAD_ID
from nmt_lightning.loading import load_translation_module
from nmt_lightning.data import TranslationDataModule
from nmt_lightning.translation_file import export_checkpoint, load_exported
from nmt_lightning.export.codecs.int8_kernels import Int8Linear
from nmt_lightning.model import TransformerFeatures
from nmt_lightning.module import CROSS_ENTROPY, LossContext, TranslationModule
from nmt_lightning.translate import translate_lines
from tests.callbacks.helpers import (TeacherWithLogits, assert_same_state, context_without_a_recorder,
                                     resumed_and_uninterrupted)
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
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    monkeypatch.setattr("callbacks.progressive_transfer.rank_zero_info", said.append)
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
        assert any(name.startswith(allowed[0]) for name in updated), (stage, sorted(updated))  # its layer learns
    # The embeddings learn with their side's first layer.
    assert {"model.src_embed.weight", "model.encoder_embed_projection.weight"} <= stages[0]
    assert "model.decoder_embed_projection.weight" in stages[2]
    assert "model.output_down_projection.weight" in stages[4]  # the distillation stage trains everything
    # The optimiser restarted with the last stage: two Adam steps in its state, not ten, and not
    # four for the first layer, which also learned in the first stage.
    optimizer = fit.optimizers[0]
    assert int(optimizer.state[module.model.output_down_projection.weight]["step"]) == 2
    assert {int(optimizer.state[p]["step"]) for p in module.model.encoder_layers[0].parameters()} == {2}
    assert module.loss_terms == {} and module.loss_weights["cross_entropy"] == 1.0  # restored after the fit
    assert fit.logged_metrics["transfer/stage"] == 4
    assert "train/transfer_soft" in fit.logged_metrics
    # One line as each stage begins, the first included.
    announced = [line.split(": ")[1] for line in said if ": stage " in line]
    assert announced == [f"stage {number}/5 from step {2 * (number - 1)}" for number in range(1, 6)]


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
    # A teacher that answers with an object holding .logits (as Hugging Face models do) is read the same.
    transfer.teacher.module = TeacherWithLogits(transfer.teacher.module)
    transfer._pass = None
    assert transfer._soft_loss(context).item() == 0.0
    transfer._pass, transfer.teacher_inputs = None, ["source", "tags"]
    with pytest.raises(KeyError, match="ProgressiveKnowledgeTransfer: the batch has no field 'tags' for the teacher"):
        transfer._soft_loss(context)


@pytest.mark.parametrize("stop", [3, 4])
def test_resume_in_the_middle_of_a_stage_equals_an_uninterrupted_run(stop: int, teacher: Path, prepared_dir: Path,
                                                                      tmp_path: Path) -> None:
    """Stopped at step 3 (inside the second layer's stage) or 4 (where the third stage begins: the
    resumed run must restart the optimiser there as the uninterrupted one did, so the checkpoint
    has to say which stage its optimiser state belongs to), resumed to step 10."""
    straight, resumed = resumed_and_uninterrupted(
        tmp_path, lambda: student(prepared_dir)[0],
        lambda: [ProgressiveKnowledgeTransfer(str(teacher), stage_steps=2)],
        lambda: TranslationDataModule(str(prepared_dir), max_tokens=256), stop=stop, total=10,
        deterministic=False)
    assert_same_state(straight, resumed, tolerance=1e-6)
    other = ProgressiveKnowledgeTransfer(str(teacher), stage_steps=3)
    saved = torch.load(tmp_path / "ckpt" / "mid.ckpt", weights_only=True)["callbacks"]
    with pytest.raises(ValueError, match="the checkpoint trained with .*'stage_steps': 2.* but this callback has"):
        other.load_state_dict(next(v for k, v in saved.items() if k.startswith("ProgressiveKnowledgeTransfer")))


class Terms(L.Callback):
    """The loss terms' weights (and the task loss's, as "task") at the end of every training batch,
    and the step of every forward of ``transfer``'s teacher."""

    def __init__(self, transfer: ProgressiveKnowledgeTransfer) -> None:
        self.transfer = transfer
        self.seen: list[dict] = []
        self.teacher_calls: list[int] = []
        self.teacher_arguments: list[tuple] = []  # the positional arguments of every teacher forward

    def on_train_start(self, trainer, module) -> None:
        self.transfer.teacher.module.register_forward_hook(lambda *_: self.teacher_calls.append(trainer.global_step))
        self.transfer.teacher.module.register_forward_pre_hook(lambda _, args: self.teacher_arguments.append(args))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.seen.append({**{name: term.weight for name, term in module.loss_terms.items()},
                          "task": module.loss_weight(CROSS_ENTROPY)})


@pytest.mark.parametrize("mode, weights_first, weights_last", [
    ("progressive", {"transfer_features": 3.0, "transfer_attention": 2.0, "task": 0.0},
     {"transfer_soft": 0.7, "task": 0.3}),
    ("joint", {"transfer_features": 3.0, "transfer_attention": 2.0, "task": 0.0},
     {"transfer_soft": 0.7, "task": 0.3}),
    ("auxiliary", {"transfer_features": 3.0, "transfer_attention": 2.0, "transfer_soft": 0.7, "task": 0.3},
     {"transfer_features": 3.0, "transfer_attention": 2.0, "transfer_soft": 0.7, "task": 0.3}),
])
def test_the_loss_terms_of_each_mode(mode: str, weights_first: dict, weights_last: dict, teacher: Path,
                                     prepared_dir: Path, tmp_path: Path) -> None:
    """The loss terms and their weights in every batch: layer-wise transfer without the task
    loss in the four layer stages (progressive) or the one transfer stage (joint), then
    distillation with it; everything at once (auxiliary). The teacher runs once per batch: its
    outputs are shared by the terms that read them."""
    L.seed_everything(0)
    module, datamodule = student(prepared_dir)
    transfer = ProgressiveKnowledgeTransfer(str(teacher), mode=mode, stage_steps=1, feature_weight=3.0,
                                            attention_weight=2.0, soft_weight=0.7, hard_weight=0.3)
    terms = Terms(transfer)
    tiny_trainer(tmp_path, max_steps=6, callbacks=[transfer, terms]).fit(module, datamodule=datamodule)
    transfer_batches = 6 if mode == "auxiliary" else 4
    assert terms.seen == [weights_first] * transfer_batches + [weights_last] * (6 - transfer_batches)
    assert terms.teacher_calls == list(range(6))  # once per batch, however many terms read it
    assert transfer.transfer_steps == (0 if mode == "auxiliary" else 4)
    assert not transfer.freezer.frozen


@pytest.mark.parametrize("weights, weights_first, weights_last, attention_recorded", [
    ({"feature_weight": 0.5, "attention_weight": 0.0, "soft_weight": 0.0, "hard_weight": 1.0},
     {"transfer_features": 0.5, "task": 0.0}, {"task": 1.0}, False),
    ({"feature_weight": 0.0, "attention_weight": 0.5, "soft_weight": 0.25, "hard_weight": 0.0},
     {"transfer_attention": 0.5, "task": 0.0}, {"transfer_soft": 0.25, "task": 0.0}, True),
], ids=["features_only", "attention_only"])
def test_a_zero_weight_leaves_its_term_out_and_a_small_one_keeps_it(weights: dict, weights_first: dict,
                                                                     weights_last: dict, attention_recorded: bool,
                                                                     teacher: Path, prepared_dir: Path,
                                                                     tmp_path: Path) -> None:
    """Weights of 0 switch their term off (nothing computes or records it); weights in (0, 1]
    are as real as the defaults (attention_weight=1.0 is one). The teacher records its attention
    maps only for an attention term; in the distillation stage (steps 4 and 5) it gets no recorder,
    and no call at all without a soft term."""
    L.seed_everything(0)
    module, datamodule = student(prepared_dir)
    transfer = ProgressiveKnowledgeTransfer(str(teacher), mode="joint", stage_steps=1, **weights)
    terms = Terms(transfer)
    tiny_trainer(tmp_path, max_steps=6, callbacks=[transfer, terms]).fit(module, datamodule=datamodule)
    assert terms.seen[0] == weights_first and terms.seen[-1] == weights_last
    first, last = terms.teacher_arguments[0], terms.teacher_arguments[-1]
    assert len(first) == 3 and first[-1].hidden_states and first[-1].attention == attention_recorded
    if weights["soft_weight"] > 0:
        assert terms.teacher_calls == list(range(6)) and len(last) == 2  # source and decoder input only
    else:
        assert terms.teacher_calls == list(range(4))


def test_one_callback_object_serves_several_fits(teacher: Path, prepared_dir: Path, tmp_path: Path) -> None:
    """The same object in the uninterrupted fit, the fit stopped in the middle and the resumed
    one (as in a notebook that fits again): what one fit leaves behind does not leak into the next."""
    transfer = ProgressiveKnowledgeTransfer(str(teacher), stage_steps=2)
    straight, resumed = resumed_and_uninterrupted(
        tmp_path, lambda: student(prepared_dir)[0], lambda: [transfer],
        lambda: TranslationDataModule(str(prepared_dir), max_tokens=256), stop=3, total=6, deterministic=False)
    assert_same_state(straight, resumed, tolerance=1e-6)


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
    module, _ = student(prepared_dir, encoder_layers=1, decoder_layers=1)
    first = ProgressiveKnowledgeTransfer(str(teacher), teacher_layers={"encoder": [1], "decoder": [1]})
    first.setup(None, module, "fit")
    assert first.mapping == {"encoder": [1], "decoder": [1]}
    module, _ = student(prepared_dir)
    same_depth = ProgressiveKnowledgeTransfer(str(teacher))
    same_depth.setup(None, module, "fit")
    assert same_depth.mapping == {"encoder": [1, 2], "decoder": [1, 2]}  # layer i learns from layer i
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


@pytest.mark.parametrize("layers", [[("encoder", 1), ("decoder", 1)], [("encoder", 2)]])
def test_the_transfer_losses_on_a_student_that_differs_from_its_teacher(layers: list, tmp_path: Path) -> None:
    """MobileBERT's two transfer losses, computed here from their definitions in float64 on random
    features: the feature-map loss is the mean squared difference of the two layer outputs, each
    normalised over its width (no learned scale); the attention loss is KL(teacher || student) per
    query (summed over keys), averaged over heads, real query positions and the stage's maps.
    Reversing the KL, dropping the normalisation or averaging over padding gives other numbers.
    Both models have 2+2 layers and student layer i learns from teacher layer 3 - i, so a stage
    that reads the wrong layer on either side is seen; the second stage has a single map (one
    side, self-attention only)."""
    from types import SimpleNamespace

    from callbacks.progressive_transfer import _Stage

    torch.save({}, tmp_path / "teacher.ckpt")
    transfer = ProgressiveKnowledgeTransfer(str(tmp_path / "teacher.ckpt"))
    transfer.stages, transfer.stage = [_Stage(layers, distill=False, trainable=None)], 0
    transfer.mapping = {"encoder": [2, 1], "decoder": [2, 1]}
    generator = torch.Generator().manual_seed(0)
    batch_size, source_length, target_length, width, heads, depth = 2, 5, 4, 6, 3, 2

    def features(scale: float) -> SimpleNamespace:
        def attention(queries: int, keys: int) -> list[torch.Tensor]:
            return [torch.softmax(scale * torch.randn(batch_size, heads, queries, keys, generator=generator), dim=-1)
                    for _ in range(depth)]
        return SimpleNamespace(  # states: the embeddings' output, then each layer's
            encoder_states=[torch.randn(batch_size, source_length, width, generator=generator) * scale + 1
                            for _ in range(depth + 1)],
            decoder_states=[torch.randn(batch_size, target_length, width, generator=generator) * scale
                            for _ in range(depth + 1)],
            encoder_self_attention=attention(source_length, source_length),
            decoder_self_attention=attention(target_length, target_length),
            cross_attention=attention(target_length, source_length))

    student, teacher = features(1.0), features(3.0)
    source_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    target_mask = torch.tensor([[True] * 4, [True] * 2 + [False] * 2])
    num_tokens = int(target_mask.sum())
    batch = object()
    context = SimpleNamespace(batch=batch, logits=torch.zeros(batch_size, target_length, 7), features=student,
                              target_mask=target_mask, source_mask=source_mask, num_tokens=num_tokens)
    transfer._pass = (batch, context.logits, teacher)

    def normalised(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        mean = x.mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + 1e-5)

    def kl(theirs: torch.Tensor, mine: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        total, count = 0.0, 0
        for b in range(theirs.shape[0]):
            for h in range(theirs.shape[1]):
                for q in range(theirs.shape[2]):
                    if queries[b, q]:
                        p, r = theirs[b, h, q].double(), mine[b, h, q].double()
                        total, count = total + (p * (p.log() - r.log())).sum(), count + 1
        return total / count

    kinds = {"encoder": ["encoder_self_attention"], "decoder": ["decoder_self_attention", "cross_attention"]}
    per_layer, maps = [], []
    for side, index in layers:
        mask = source_mask if side == "encoder" else target_mask
        theirs_index = 3 - index
        mine = normalised(getattr(student, f"{side}_states")[index][mask])
        theirs = normalised(getattr(teacher, f"{side}_states")[theirs_index][mask])
        per_layer.append(((mine - theirs) ** 2).mean())
        maps += [kl(getattr(teacher, kind)[theirs_index - 1], getattr(student, kind)[index - 1], mask)
                 for kind in kinds[side]]
    expected_features = sum(per_layer) / len(per_layer) * num_tokens
    expected_attention = sum(maps) / len(maps) * num_tokens
    assert transfer._feature_loss(context).item() == pytest.approx(expected_features.item(), rel=1e-5)
    assert transfer._attention_loss(context).item() == pytest.approx(expected_attention.item(), rel=1e-5)
    first = student.encoder_self_attention[0], teacher.encoder_self_attention[1]
    assert abs(kl(first[0], first[1], source_mask) - kl(first[1], first[0], source_mask)) > 0.1  # directions differ
    # A layer the forward did not record is named, not an IndexError.
    for reader, kind in ((transfer._state, "encoder"), (transfer._attention, "encoder_self_attention")):
        with pytest.raises(ValueError, match=r"^ProgressiveKnowledgeTransfer: the student's forward recorded "):
            reader(student, kind, depth + 1, "student")


@pytest.mark.parametrize("features", [None, "a namespace"])
def test_layer_stages_need_a_recorder_in_the_loss_context(features, tmp_path: Path) -> None:
    """A layer-wise stage reads the teacher's per-layer states through a recorder made by the
    class of context.features (its requesting()): a context without one is refused in one line
    before the teacher runs."""
    from callbacks.progressive_transfer import _Stage

    torch.save({}, tmp_path / "teacher.ckpt")
    transfer = ProgressiveKnowledgeTransfer(str(tmp_path / "teacher.ckpt"))
    transfer.stages, transfer.stage = [_Stage([("encoder", 1)], distill=False, trainable=None)], 0
    context = context_without_a_recorder(features)
    with pytest.raises(TypeError, match=r"^ProgressiveKnowledgeTransfer: the module's loss context carries no "
                                        r"per-layer features"):
        transfer._teacher_pass(context)


def test_embedding_modules_that_name_nothing_are_refused(teacher: Path, prepared_dir: Path) -> None:
    """On a module whose embeddings live elsewhere, the defaults would match nothing and leave the
    embeddings frozen through every layer stage: refused, naming the argument; empty lists are a choice."""
    module, _ = student(prepared_dir)
    wrong = ProgressiveKnowledgeTransfer(str(teacher), embedding_modules={"encoder": ["model.embeddings"],
                                                                          "decoder": ["model.target_embeddings"]})
    with pytest.raises(ValueError, match=r"^ProgressiveKnowledgeTransfer: embedding_modules .* name no parameter of "
                                         r"the TranslationModule"):
        wrong.setup(None, module, "fit")
    ProgressiveKnowledgeTransfer(str(teacher), embedding_modules={"encoder": [], "decoder": []},
                                 copy_embeddings=False).setup(None, module, "fit")
    # A side left out keeps its default.
    ProgressiveKnowledgeTransfer(str(teacher), embedding_modules={"encoder": []}).setup(None, module, "fit")


def test_layer_modules_that_are_missing_or_not_lists_are_named_with_their_owner(teacher: Path,
                                                                              prepared_dir: Path) -> None:
    """The student is checked first, then the teacher: the message says which of them lacks the module."""
    module, _ = student(prepared_dir)
    with pytest.raises(ValueError, match=r"^ProgressiveKnowledgeTransfer: the student has no module 'model.stack' "
                                         r"holding its encoder layers \(set layer_modules\)$"):
        ProgressiveKnowledgeTransfer(str(teacher), layer_modules={"encoder": "model.stack"}).setup(None, module, "fit")
    with pytest.raises(ValueError, match=r"^ProgressiveKnowledgeTransfer: the student's model.src_embed is a "
                                         r"Embedding, not a list of layers$"):
        ProgressiveKnowledgeTransfer(str(teacher), layer_modules={"decoder": "model.src_embed"}).setup(
            None, module, "fit")
    module.model.stack = torch.nn.ModuleList(module.model.encoder_layers)  # only the student has it
    with pytest.raises(ValueError, match=r"^ProgressiveKnowledgeTransfer: the teacher has no module 'model.stack' "):
        ProgressiveKnowledgeTransfer(str(teacher), layer_modules={"encoder": "model.stack"}).setup(None, module, "fit")


def test_the_checkpoint_states_the_schedule_and_an_older_one_without_it_loads(teacher: Path) -> None:
    transfer = ProgressiveKnowledgeTransfer(str(teacher), stage_steps=3, mode="joint", sides=["decoder"])
    # Written out: a resume compares this record with the callback's own settings.
    assert transfer.state_dict()["schedule"] == {"mode": "joint", "stage_steps": 3, "sides": ["decoder"]}
    # A checkpoint saved before the schedule was recorded resumes at its stage.
    transfer.load_state_dict({"stage": 1, "frozen": ["model.encoder_layers.0.ffn.weight"]})
    assert transfer.stage == 1 and transfer.freezer.frozen == ["model.encoder_layers.0.ffn.weight"]
    with pytest.raises(ValueError, match="the checkpoint trained with .*'stage_steps': 4"):
        transfer.load_state_dict({"stage": 1, "schedule": {"mode": "joint", "stage_steps": 4, "sides": ["decoder"]}})


def test_a_module_without_the_loss_extension_point_is_refused(teacher: Path, prepared_dir: Path,
                                                             tmp_path: Path) -> None:
    module, datamodule = student(prepared_dir)
    module.register_loss_term = None  # the extension point's member gone: not callable
    with pytest.raises(TypeError, match="ProgressiveKnowledgeTransfer needs the LightningModule to offer "
                                        "register_loss_term .*TranslationModule lacks it"):
        tiny_trainer(tmp_path, max_steps=1, callbacks=[ProgressiveKnowledgeTransfer(str(teacher), stage_steps=1)]).fit(
            module, datamodule=datamodule)


@pytest.mark.parametrize("mode, max_steps, warned", [("progressive", 8, True), ("progressive", 9, False),
                                                     ("progressive", -1, False), ("joint", 8, True),
                                                     ("joint", 9, False), ("auxiliary", 1, False)])
def test_a_fit_too_short_for_the_transfer_stages_is_warned_only_then(mode: str, max_steps: int, warned: bool,
                                                                     teacher: Path, prepared_dir: Path) -> None:
    # 2+2 layers of 2 steps: 8 transfer steps before distillation (progressive and joint);
    # auxiliary mode has no transfer stages to cut short; max_steps=-1 is unlimited.
    module, _ = student(prepared_dir)
    transfer = ProgressiveKnowledgeTransfer(str(teacher), stage_steps=2, mode=mode)
    transfer.setup(None, module, "fit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transfer.on_fit_start(SimpleNamespace(max_steps=max_steps), module)
    assert any("this fit ends before the distillation stage" in str(w.message) for w in caught) == warned


def test_the_modules_own_task_weight_is_restored_after_the_fit(teacher: Path, prepared_dir: Path,
                                                               tmp_path: Path) -> None:
    # Joint transfer sets the task loss to 0, then to hard_weight; the module weighed it 0.7.
    module, datamodule = student(prepared_dir)
    module.set_loss_weight(CROSS_ENTROPY, 0.7)
    transfer = ProgressiveKnowledgeTransfer(str(teacher), stage_steps=1, mode="joint")
    tiny_trainer(tmp_path, max_steps=2, callbacks=[transfer]).fit(module, datamodule=datamodule)
    assert module.loss_weight(CROSS_ENTROPY) == 0.7 and module.loss_terms == {}


def test_a_forward_that_records_no_states_or_maps_is_named() -> None:
    """Features without the per-layer states or attention maps at all (a model that records
    nothing): the one-line error of a missing layer, not an AttributeError."""
    nothing = SimpleNamespace()
    with pytest.raises(ValueError, match=r"^ProgressiveKnowledgeTransfer: the student's forward recorded 0 encoder "
                                         r"states, layer 1 is needed$"):
        ProgressiveKnowledgeTransfer._state(nothing, "encoder", 1, "student")
    with pytest.raises(ValueError, match=r"^ProgressiveKnowledgeTransfer: the teacher's forward recorded 0 "
                                         r"cross_attention maps, layer 1 is needed$"):
        ProgressiveKnowledgeTransfer._attention(nothing, "cross_attention", 1, "teacher")
