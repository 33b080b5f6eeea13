"""Students initialised from a deeper teacher's layers (DistilBERT's initialisation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nmt_lightning.model import Transformer, TransformerConfig
from nmt_lightning.model.initialization import initialize_from_teacher
from nmt_lightning.module import TranslationModule

WIDTH = dict(src_vocab_size=40, tgt_vocab_size=40, d_model=32, ffn_dim=64, heads=2, pre_norm=True)


def model(encoder_layers: int, decoder_layers: int, **overrides) -> Transformer:
    torch.manual_seed(encoder_layers * 10 + decoder_layers)
    return Transformer(TransformerConfig(**{**WIDTH, **overrides}, encoder_layers=encoder_layers,
                                         decoder_layers=decoder_layers))


def assert_copied(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    for (name, mine), (_, theirs) in zip(student.state_dict().items(), teacher.state_dict().items()):
        assert torch.equal(mine, theirs), name


@pytest.mark.parametrize(("layers", "encoder", "decoder"), [
    ("every_other", [1, 3, 5], [1, 3]),
    ({"encoder": [0, 2, 4], "decoder": [0, 3]}, [0, 2, 4], [0, 3]),
    ({"decoder": [2, 3]}, [1, 3, 5], [2, 3]),  # a stack not named is every other
])
def test_the_chosen_layers_and_nothing_else_are_copied(layers, encoder: list[int], decoder: list[int]) -> None:
    teacher, student = model(6, 4), model(3, 2, dropout=0.3)
    source_of = initialize_from_teacher(student, teacher, layers)
    for i, j in enumerate(encoder):
        assert_copied(student.encoder_layers[i], teacher.encoder_layers[j])
    for i, j in enumerate(decoder):
        assert_copied(student.decoder_layers[i], teacher.decoder_layers[j])
    for name in ("src_embed", "output_projection", "encoder_norm", "decoder_norm"):
        assert_copied(getattr(student, name), getattr(teacher, name))
    assert set(source_of) == set(student.state_dict())
    assert source_of["decoder_layers.1.ffn.fc2.weight"] == f"decoder_layers.{decoder[1]}.ffn.fc2.weight"
    # The copies are the student's own tensors, not views of the teacher's.
    student.src_embed.weight.data.add_(1.0)
    assert not torch.equal(student.src_embed.weight, teacher.src_embed.weight)


@pytest.mark.parametrize(("layers", "message"), [
    ("every_other", "the teacher's encoder has 5 layers, not twice the student's 3"),
    ({"encoder": [0, 1]}, r"init_layers\['encoder'\] names 2 layers but the student's encoder has 3"),
    ({"encoder": [0, 1, 5]}, r"each must be a distinct layer index in \[0, 5\)"),
    ({"encoder": [1, 1, 2]}, "distinct"),
    ({"middle": [0]}, "unknown stack"),
    ("all", "init_layers must be 'every_other', 'none' or a mapping"),
])
def test_impossible_choices_are_refused(layers, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        initialize_from_teacher(model(3, 2), model(5, 4), layers)


def test_a_teacher_of_another_width_is_refused() -> None:
    with pytest.raises(ValueError, match=r"differ in d_model \(student 32, teacher 64\)"):
        initialize_from_teacher(model(3, 2), model(6, 4, d_model=64))


def test_a_recipe_sets_it_on_the_module(tmp_path: Path) -> None:
    """TranslationModule(init_from=teacher.ckpt, init_layers='every_other'), as YAML sets it."""
    options = dict(src_vocab_size=40, tgt_vocab_size=40, d_model=32, ffn_dim=64, heads=2, pre_norm=True)
    teacher = TranslationModule(**options, encoder_layers=4, decoder_layers=2)
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}, tmp_path / "t.ckpt")
    student = TranslationModule(**options, encoder_layers=2, decoder_layers=1, init_from=str(tmp_path / "t.ckpt"),
                                init_layers="every_other")
    assert_copied(student.model.encoder_layers[1], teacher.model.encoder_layers[3])
    assert_copied(student.model.decoder_layers[0], teacher.model.decoder_layers[1])
    with pytest.raises(ValueError, match="weights do not fit this model .*init_layers, e.g. 'every_other'"):
        TranslationModule(**options, encoder_layers=2, decoder_layers=1, init_from=str(tmp_path / "t.ckpt"))
    with pytest.raises(ValueError, match="init_layers chooses layers of the init_from checkpoint; give init_from too"):
        TranslationModule(**options, init_layers="every_other")


def test_narrower_embeddings_are_the_teachers_factorised_exactly_at_full_rank() -> None:
    """A teacher table of rank 12: 12-wide factors reproduce it, so a student with the teacher's
    layers computes the teacher's logits."""
    teacher, student = model(2, 2), model(2, 2, embedding_dim=12)
    with torch.no_grad():
        teacher.src_embed.weight.copy_(torch.randn(40, 12) @ torch.randn(12, 32) / 12)
    source_of = initialize_from_teacher(student, teacher, "every_other")
    assert source_of["encoder_embed_projection.weight"] == "rank-12 factors of src_embed.weight"
    source, decoder_input = torch.randint(1, 40, (3, 7)), torch.randint(1, 40, (3, 5))
    teacher.eval(), student.eval()
    with torch.no_grad():
        expected, found = teacher(source, decoder_input), student(source, decoder_input)
    # Float32 rounding through an SVD of a 40 x 32 table and two layers: relative error ~1e-6.
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_narrower_embeddings_are_the_best_low_rank_approximation() -> None:
    teacher, student = model(2, 2), model(2, 2, embedding_dim=8)
    initialize_from_teacher(student, teacher, "every_other")
    table = teacher.src_embed.weight.detach().double()
    u, s, vh = torch.linalg.svd(table, full_matrices=False)
    best = (u[:, :8] * s[:8]) @ vh[:8]  # (40, 32): Eckart-Young's rank-8 optimum
    with torch.no_grad():
        looked_up = student.encoder_embed_projection(student.src_embed.weight) * 8 ** 0.5 / 32 ** 0.5
        scores = student.output_down_projection.weight.T @ student.output_projection.weight.T  # (32, 40)
    torch.testing.assert_close(looked_up.double(), best, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores.T.double(), best, rtol=0, atol=1e-5)
    assert student.tgt_embed is student.src_embed  # ties survive


def test_none_copies_embeddings_and_final_norms_into_a_bottleneck_student() -> None:
    teacher = model(2, 2)
    student = model(2, 2, embedding_dim=16, bottleneck_dim=8, stacked_ffn=2, ffn_dim=16)
    untouched = {name: tensor.clone() for name, tensor in student.state_dict().items() if "_layers." in name}
    source_of = initialize_from_teacher(student, teacher, "none")
    assert not any("_layers." in name for name in source_of)
    for name, tensor in student.state_dict().items():
        if name in untouched:
            assert torch.equal(tensor, untouched[name]), name
    assert_copied(student.encoder_norm, teacher.encoder_norm)
    assert_copied(student.decoder_norm, teacher.decoder_norm)
    assert source_of["src_embed.weight"] == "rank-16 factors of src_embed.weight"


@pytest.mark.parametrize(("student_options", "teacher_options", "message"), [
    (dict(embedding_dim=16, bottleneck_dim=8), dict(), "differ in bottleneck_dim.*init_layers='none'"),
    (dict(embedding_dim=16), dict(embedding_dim=24), "narrower than a teacher whose embeddings are d_model wide"),
    (dict(d_model=16, ffn_dim=16), dict(), "differ in d_model"),
])
def test_embeddings_that_cannot_be_factorised_are_refused(student_options, teacher_options, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        initialize_from_teacher(model(2, 2, **student_options), model(2, 2, **teacher_options),
                                "every_other" if "bottleneck_dim" in student_options else "none")


def test_a_bottleneck_recipe_starts_from_the_teachers_embeddings(tmp_path: Path) -> None:
    options = dict(src_vocab_size=40, tgt_vocab_size=40, d_model=32, heads=2, pre_norm=True, encoder_layers=2,
                   decoder_layers=2)
    teacher = TranslationModule(**options, ffn_dim=64)
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}, tmp_path / "t.ckpt")
    student = TranslationModule(**options, ffn_dim=16, bottleneck_dim=8, stacked_ffn=2, embedding_dim=16,
                                init_from=str(tmp_path / "t.ckpt"), init_layers="none")
    assert_copied(student.model.decoder_norm, teacher.model.decoder_norm)
    assert student.model.src_embed.weight.shape == (40, 16)
