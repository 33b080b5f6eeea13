"""callbacks._teacher: a frozen model held outside the student."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from callbacks import QuantizationAwareTraining
from callbacks._teacher import FrozenTeacher
from callbacks._transforms import weight_transforms
from nmt_lightning.export.codecs.int8_kernels import Int8Linear
from nmt_lightning.module import TranslationModule
from tests.callbacks.classifier import BagOfWordsClassifier, DistillableClassifier, classification_data
from tests.callbacks.helpers import trainer
from tests.callbacks.staged import TeacherOutputs
from tests.conftest import run_script, train_tiny_checkpoint


@pytest.fixture
def teacher_checkpoint(tmp_path: Path) -> Path:
    L.seed_everything(3)
    fit = trainer(tmp_path / "teacher", [], max_steps=10)
    fit.fit(BagOfWordsClassifier(), classification_data())
    fit.save_checkpoint(tmp_path / "teacher.ckpt")
    return tmp_path / "teacher.ckpt"


def small_teacher(path: str) -> nn.Module:
    """A loader named in YAML by its dotted path: any callable from a path to an nn.Module."""
    return BagOfWordsClassifier.load_from_checkpoint(path, weights_only=True)


@pytest.mark.parametrize("loader", [None, "tests.callbacks.test_teacher.small_teacher"])
def test_the_teacher_stays_outside_the_student(teacher_checkpoint: Path, tmp_path: Path, loader) -> None:
    student = BagOfWordsClassifier()
    user = TeacherOutputs(str(teacher_checkpoint), loader)
    fit = trainer(tmp_path, [QuantizationAwareTraining(include=["*"]), user], max_steps=4, enable_checkpointing=True)
    fit.fit(student, classification_data())
    teacher = user.teacher.module
    # Not in the student's weights, optimiser or checkpoint; untouched by the QAT callback's globs.
    student_parameters = {id(p) for p in student.parameters()}
    assert not any(id(p) in student_parameters for p in teacher.parameters())
    optimised = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert not any(id(p) in optimised for p in teacher.parameters())
    fit.save_checkpoint(tmp_path / "student.ckpt")
    saved = torch.load(tmp_path / "student.ckpt", weights_only=True)
    assert len(saved["state_dict"]) == len(student.state_dict())
    assert all(weight_transforms(m) == [] for m in teacher.modules())
    # Frozen, in eval mode, on the student's device; its outputs carry no graph.
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.device == student.device for p in teacher.parameters())
    assert len(user.outputs) == 4 and not any(o.requires_grad for o in user.outputs)
    # The teacher's weights are the checkpoint's.
    reference = BagOfWordsClassifier.load_from_checkpoint(str(teacher_checkpoint), weights_only=True)
    for (name, p), q in zip(teacher.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_misconfigured_teachers(teacher_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^FrozenTeacher: teacher must be the path of a file, got ''$"):
        FrozenTeacher("")
    with pytest.raises(FileNotFoundError, match="^FrozenTeacher: teacher .*x.ckpt: no such file$"):
        FrozenTeacher(str(tmp_path / "x.ckpt"))
    with pytest.raises(ValueError, match="^Owner: teacher_loader 'no.such.function' is not an importable callable"):
        FrozenTeacher(str(teacher_checkpoint), loader="no.such.function", owner="Owner")
    (tmp_path / "garbage.ckpt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"^FrozenTeacher: teacher .*garbage.ckpt is not a checkpoint: it does not "
                                         r"start as a file torch.save writes"):
        FrozenTeacher(str(tmp_path / "garbage.ckpt"))
    # The right magic bytes, then garbage: the loader fails, in one line naming the file and the loader.
    (tmp_path / "truncated.ckpt").write_bytes(teacher_checkpoint.read_bytes()[:200])
    teacher = FrozenTeacher(str(tmp_path / "truncated.ckpt"))
    with pytest.raises(ValueError, match=r"^FrozenTeacher: teacher .*truncated.ckpt could not be loaded by "
                                         r"BagOfWordsClassifier.load_from_checkpoint: \w+") as caught:
        teacher.load(BagOfWordsClassifier())
    assert "\n" not in str(caught.value)
    # A student's own from_checkpoint is named as the loader that failed, with its error's first line.
    with pytest.raises(ValueError, match=r"^FrozenTeacher: teacher .* could not be loaded by "
                                         r"StudentWithItsOwnLoader.from_checkpoint: .*cannot read it") as caught:
        FrozenTeacher(str(teacher_checkpoint)).load(StudentWithItsOwnLoader())
    assert "\n" not in str(caught.value)


class StudentWithItsOwnLoader(BagOfWordsClassifier):
    @classmethod
    def from_checkpoint(cls, path: str) -> nn.Module:
        raise RuntimeError("cannot read it\nsecond line")


class Unsafe:
    """An object whose unpickling would run code: a teacher file holding it is refused."""


def test_a_teacher_file_holding_python_objects_is_refused(teacher_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(teacher_checkpoint, weights_only=True)
    checkpoint["payload"] = Unsafe()
    torch.save(checkpoint, tmp_path / "unsafe.ckpt")
    with pytest.raises(ValueError, match=r"^FrozenTeacher: teacher .*unsafe.ckpt could not be loaded by .*: it holds "
                                         r"Python objects that unpickling would run"):
        FrozenTeacher(str(tmp_path / "unsafe.ckpt")).load(BagOfWordsClassifier())


def test_a_batch_beyond_the_teachers_vocabulary_is_refused_before_the_lookup(tmp_path: Path) -> None:
    """The teacher's embedding has 20 entries, the student's batch ids up to 29: a one-line error
    naming the table, not an IndexError from inside the teacher's forward."""
    fit = trainer(tmp_path / "t", [], max_steps=1)
    fit.fit(DistillableClassifier(vocab_size=20), classification_data(vocabulary=20))
    fit.save_checkpoint(tmp_path / "small.ckpt")
    teacher = FrozenTeacher(str(tmp_path / "small.ckpt"), owner="Owner")
    module = teacher.load(DistillableClassifier())
    assert module(torch.tensor([[19, 0]])).shape == (1, 3)
    # An empty lookup holds no id beyond the table (the maximum of nothing is not taken).
    assert module.embed(torch.empty(0, 2, dtype=torch.long)).shape[:2] == (0, 2)
    with pytest.raises(ValueError, match=r"^Owner: the batch holds token id 29 but the teacher's embedding embed has "
                                         r"20 entries: teacher and student must share the vocabulary$"):
        teacher(torch.tensor([[29, 1]]))
    with pytest.raises(ValueError, match=r"token id 20 but .* has 20 entries"):  # one past the last entry
        teacher(torch.tensor([[20, 1]]))


def test_a_translation_teacher_is_dense_fp32(prepared_dir: Path, tmp_path: Path) -> None:
    """TranslationModule.from_checkpoint: a QAT-trained teacher comes back as plain fp32 modules
    (int8 layers are for deployment; a teacher must run on any device, in any precision)."""
    checkpoint = train_tiny_checkpoint(prepared_dir, tmp_path, callbacks=(QuantizationAwareTraining(),))
    teacher = FrozenTeacher(str(checkpoint)).load(TranslationModule(64, 64))
    assert isinstance(teacher, TranslationModule) and not teacher.training
    assert not any(isinstance(m, Int8Linear) for m in teacher.modules())
    assert all(weight_transforms(m) == [] for m in teacher.modules())


def test_two_process_ddp_keeps_the_teacher_out_of_the_wrapper(teacher_checkpoint: Path, tmp_path: Path) -> None:
    run_script("teacher_ddp.py", teacher_checkpoint, tmp_path)
    for rank in range(2):
        facts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert facts["wrapped_parameters"] == facts["student_parameters"]
        assert facts["teacher_calls"] == 3 and not facts["teacher_training"]


def test_a_loader_is_resolved_by_the_longest_importable_prefix(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``package.module.attribute[.attribute]``: the longest prefix that imports is the module, the
    rest are attributes (a class's method too); what does not resolve to a callable is refused.
    A package nothing has imported yet: its submodule is no attribute of it until it is imported,
    so only the full module prefix finds the loader."""
    import collections
    import os.path

    from callbacks._teacher import resolve_callable

    package = tmp_path / "unimported_teachers" / "deep"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "loaders.py").write_text("def load(path):\n    return path\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_callable("unimported_teachers.deep.loaders.load")("x") == "x"

    assert resolve_callable("os.path.join") is os.path.join
    assert resolve_callable("collections.OrderedDict.fromkeys") == collections.OrderedDict.fromkeys
    assert resolve_callable("tests.callbacks.test_teacher.small_teacher") is small_teacher
    for wrong in ("os.path.no_such_function", "os.sep", "no_such_package.loader", "os"):
        with pytest.raises(ValueError, match=f"^resolve_callable: teacher_loader '{wrong}' is not an importable callable"):
            resolve_callable(wrong)


def test_the_teacher_takes_the_students_floating_dtype(teacher_checkpoint: Path) -> None:
    # A bf16-true (or 16-true) student computes in bf16: the teacher's logits must come in the
    # same dtype, so the teacher is cast with it.
    student = BagOfWordsClassifier().to(torch.bfloat16)
    teacher = FrozenTeacher(str(teacher_checkpoint), owner="KnowledgeDistillation")
    teacher.load(student)
    attached = teacher.attach(student)
    assert {p.dtype for p in attached.parameters()} == {torch.bfloat16}
    assert teacher(torch.zeros(2, 4, dtype=torch.long)).dtype == torch.bfloat16


def bf16_teacher(path: str) -> nn.Module:
    """A loader returning the teacher in bfloat16, as a checkpoint saved by a bf16-true run loads."""
    return small_teacher(path).to(torch.bfloat16)


def test_a_student_without_floating_parameters_gets_a_float32_teacher(teacher_checkpoint: Path) -> None:
    """Nothing of the student tells a floating dtype (no parameters, or integer ones only): the
    teacher computes in float32, whatever dtype its loader returned it in."""
    student = L.LightningModule()
    student.register_buffer("ids", torch.zeros(3, dtype=torch.long))
    teacher = FrozenTeacher(str(teacher_checkpoint), loader="tests.callbacks.test_teacher.bf16_teacher")
    attached = teacher.attach(student)
    assert {p.dtype for p in attached.parameters()} == {torch.float32}


def test_the_teacher_goes_to_the_students_device(teacher_checkpoint: Path) -> None:
    """attach moves the teacher (loaded on the CPU) to the student's device; the meta device
    stands in for a GPU on a machine without one."""
    student = BagOfWordsClassifier().to("meta")
    attached = FrozenTeacher(str(teacher_checkpoint)).attach(student)
    assert {p.device.type for p in attached.parameters()} == {"meta"}


SHARED: dict[str, nn.Module] = {}


def the_student_itself(path: str) -> nn.Module:
    return SHARED["student"]


def a_teacher_holding_the_students_output_layer(path: str) -> nn.Module:
    teacher = BagOfWordsClassifier()
    teacher.out = SHARED["student"].out
    return teacher


@pytest.mark.parametrize("loader", ["the_student_itself", "a_teacher_holding_the_students_output_layer"])
def test_a_teacher_sharing_parameters_with_the_student_is_refused(teacher_checkpoint: Path, loader: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The student itself, or another model holding one of its layers: distilling from it would
    train the teacher too, so it is refused."""
    student = BagOfWordsClassifier()
    monkeypatch.setitem(SHARED, "student", student)
    teacher = FrozenTeacher(str(teacher_checkpoint), loader=f"tests.callbacks.test_teacher.{loader}", owner="Owner")
    with pytest.raises(ValueError, match=r"^Owner: the teacher shares parameters with the student; "
                                         r"it must be a separate model$"):
        teacher.load(student)
    assert all(p.requires_grad for p in student.parameters())  # refused before it was frozen
