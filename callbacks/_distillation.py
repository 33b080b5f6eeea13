"""What the distillation callbacks share: argument checks, the teacher's inputs, the soft-target loss.

KnowledgeDistillation and ProgressiveKnowledgeTransfer both run a frozen teacher on the
student's batch and add a word-level soft-target term; ``owner`` names the callback in errors.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch.autograd.function import once_differentiable

from callbacks._arguments import number, shown

__all__ = ["check_weight", "check_temperature", "check_teacher_inputs", "teacher_inputs_of", "soft_target_loss",
           "task_weight_of"]


def check_weight(owner: str, name: str, value: float) -> float:
    """A loss weight: a finite number >= 0."""
    return number(owner, name, value, minimum=0.0)


def check_temperature(owner: str, value: float) -> float:
    return number(owner, "temperature", value, minimum=0.0, low_open=True)


def check_teacher_inputs(owner: str, fields: Sequence[Union[str, int]]) -> list[Union[str, int]]:
    """A non-empty list of batch fields: dict keys (strings) or tuple positions (integers >= 0)."""
    if isinstance(fields, (str, bytes, int)) or not isinstance(fields, Sequence) or not fields or not all(
            (isinstance(f, str) and f) or (isinstance(f, int) and not isinstance(f, bool) and f >= 0) for f in fields):
        raise ValueError(f"{owner}: teacher_inputs must be a non-empty list of batch fields (keys, or positions >= 0), "
                         f"got {shown(fields)}")
    return list(fields)


def teacher_inputs_of(owner: str, batch: Any, fields: Sequence[Union[str, int]]) -> list[torch.Tensor]:
    """The batch fields (dict keys or tuple indices) the teacher's forward takes, in order."""
    inputs = []
    for field in fields:
        try:
            inputs.append(batch[field])
        except (KeyError, IndexError, TypeError):
            present = list(batch.keys()) if isinstance(batch, Mapping) else f"{len(batch)} items"
            raise KeyError(f"{owner}: the batch has no field {field!r} for the teacher (teacher_inputs={list(fields)}; "
                           f"the batch has {present})") from None
    return inputs


class _SoftTargetKL(torch.autograd.Function):
    """T^2 * sum over masked positions of KL(p || q), p = softmax(teacher / T), q = softmax(student / T),
    with its gradient T * (q - p) computed in the forward pass.

    Written by hand because autograd's version (gather the masked rows, two log_softmax, kl_div,
    then the backward of each and a scatter back into the logits' shape) makes some fifteen
    passes over (positions x vocabulary) floats, each a fresh allocation; on CPU that cost as much
    as half a training step of the tiny model. This makes about six and keeps one tensor for the
    backward. Padding positions are computed and then zeroed (cheaper than gathering the rest;
    batches are bucketed by length, so there are few)."""

    @staticmethod
    def forward(ctx: Any, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                temperature: float) -> torch.Tensor:
        log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (..., V)
        log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (..., V)
        p = log_p.exp()
        per_position = torch.sub(log_p, log_q).mul_(p).sum(dim=-1)  # (...): KL at each position
        loss = per_position.masked_fill_(~mask, 0.0).sum() * temperature ** 2
        # d loss / d student_logits = T^2 * (q - p) / T, zero where mask is False
        gradient = log_q.exp_().sub_(p).mul_(temperature).masked_fill_(~mask.unsqueeze(-1), 0.0)
        ctx.save_for_backward(gradient)
        ctx.student_dtype = student_logits.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None, None]:
        (gradient,) = ctx.saved_tensors
        return (gradient * grad_loss).to(ctx.student_dtype), None, None, None  # not in place: backward may run twice


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """T^2 * sum over the positions where ``mask`` is True of KL(softmax(teacher / T) || softmax(student / T)).

    student_logits, teacher_logits: (..., V); mask: bool of their leading shape. Computed in fp32
    (a softmax over tens of thousands of words in fp16 loses the small probabilities that carry
    the teacher's knowledge). T^2 keeps the gradient on the scale of the cross-entropy's as T grows.
    Only the student's logits receive a gradient (the teacher is frozen).
    """
    if student_logits.shape != teacher_logits.shape or mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"soft_target_loss: student logits {tuple(student_logits.shape)}, teacher logits "
                         f"{tuple(teacher_logits.shape)} and mask {tuple(mask.shape)} do not match")
    return _SoftTargetKL.apply(student_logits, teacher_logits.detach(), mask.bool(), float(temperature))


def task_weight_of(module: Any, name: str) -> float:
    """The module's current weight of its task loss ``name``, to restore at the end of a fit:
    ``module.loss_weight(name)`` where the module offers it (the protocol's optional getter),
    else 1.0 (a module without the getter is assumed to weigh its own loss 1)."""
    getter = getattr(module, "loss_weight", None)
    return float(getter(name)) if callable(getter) else 1.0
