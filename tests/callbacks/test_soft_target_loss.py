"""callbacks._distillation.soft_target_loss: the hand-written KL against autograd's, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from callbacks._distillation import soft_target_loss

BATCH, LENGTH, VOCABULARY = 3, 7, 50
FLOAT32_EPS = torch.finfo(torch.float32).eps


def reference(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * sum over masked positions of KL(teacher || student), by autograd in float64."""
    log_q = F.log_softmax(student[mask].double() / temperature, dim=-1)
    log_p = F.log_softmax(teacher[mask].double() / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum") * temperature ** 2


def sum_tolerance(mask: torch.Tensor) -> float:
    """Relative tolerance of the float32 loss: each of its N * V non-negative terms carries a few
    float32 roundings, so their sum is off by at most a few N * V eps relative to the total."""
    return 4 * int(mask.sum()) * VOCABULARY * FLOAT32_EPS


def inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(BATCH, LENGTH, VOCABULARY, generator=generator) * 3
    teacher = torch.randn(BATCH, LENGTH, VOCABULARY, generator=generator) * 3
    mask = torch.ones(BATCH, LENGTH, dtype=torch.bool)
    mask[0, 5:] = False  # padding
    mask[2, 2:] = False
    return student.to(dtype), teacher.to(dtype), mask


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_value_and_gradient_match_autograd(temperature: float) -> None:
    student, teacher, mask = inputs()
    mine = student.clone().requires_grad_(True)
    loss = soft_target_loss(mine, teacher, mask, temperature)
    loss.backward()
    theirs = student.double().requires_grad_(True)
    expected = reference(theirs, teacher, mask, temperature)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=sum_tolerance(mask))
    # Gradient T * (q - p): probabilities below 1, a few float32 roundings each.
    torch.testing.assert_close(mine.grad, theirs.grad.float(), rtol=0, atol=8 * temperature * FLOAT32_EPS)
    assert torch.all(mine.grad[~mask] == 0)


def test_padding_positions_are_ignored_even_when_not_finite() -> None:
    student, teacher, mask = inputs()
    student[~mask] = float("nan")
    teacher[~mask] = float("inf")
    mine = student.clone().requires_grad_(True)
    loss = soft_target_loss(mine, teacher, mask, 2.0)
    loss.backward()
    clean_student, clean_teacher, _ = inputs()
    assert loss.item() == pytest.approx(reference(clean_student, clean_teacher, mask, 2.0).item(), rel=sum_tolerance(mask))
    assert torch.all(mine.grad[~mask] == 0) and torch.isfinite(mine.grad).all()


def test_zero_when_the_student_is_the_teacher() -> None:
    student, _, mask = inputs()
    loss = soft_target_loss(student, student.clone(), mask, 1.0)
    assert abs(loss.item()) <= int(mask.sum()) * VOCABULARY * FLOAT32_EPS


def test_bfloat16_logits_get_a_bfloat16_gradient_computed_in_float32() -> None:
    student, teacher, mask = inputs(torch.bfloat16)
    mine = student.clone().requires_grad_(True)
    loss = soft_target_loss(mine, teacher, mask, 2.0)
    loss.backward()
    assert loss.dtype == torch.float32 and mine.grad.dtype == torch.bfloat16
    expected = reference(student.float(), teacher.float(), mask, 2.0)  # the same bf16 inputs, exactly widened
    assert loss.item() == pytest.approx(expected.item(), rel=sum_tolerance(mask))


def test_a_backward_run_twice_gives_the_same_gradient() -> None:
    student, teacher, mask = inputs()
    mine = student.clone().requires_grad_(True)
    loss = soft_target_loss(mine, teacher, mask, 2.0)
    loss.backward(retain_graph=True)
    first = mine.grad.clone()
    mine.grad = None
    (3 * loss).backward()
    torch.testing.assert_close(mine.grad, 3 * first, rtol=0, atol=3 * 8 * 2.0 * FLOAT32_EPS)


def test_shapes_that_do_not_match_are_refused() -> None:
    student, teacher, mask = inputs()
    with pytest.raises(ValueError, match="do not match"):
        soft_target_loss(student, teacher[:, :-1], mask, 2.0)
