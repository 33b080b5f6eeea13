"""What the distillation callbacks share: argument checks, the teacher's inputs, the soft-target loss.

KnowledgeDistillation and ProgressiveKnowledgeTransfer both run a frozen teacher on the
student's batch and add a word-level soft-target term; ``owner`` names the callback in errors.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["check_weight", "check_temperature", "check_teacher_inputs", "teacher_inputs_of", "soft_target_loss"]


def check_weight(owner: str, name: str, value: float) -> float:
    """A loss weight: a finite number >= 0."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_temperature(owner: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: temperature must be a finite number > 0, got {value!r}")
    return float(value)


def check_teacher_inputs(owner: str, fields: Sequence[Union[str, int]]) -> list[Union[str, int]]:
    if isinstance(fields, (str, int)) or not fields:
        raise ValueError(f"{owner}: teacher_inputs is a non-empty list of batch fields, got {fields!r}")
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


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """T^2 * sum over the positions where ``mask`` is True of KL(softmax(teacher / T) || softmax(student / T)).

    student_logits, teacher_logits: (..., V); mask: bool of their leading shape. Computed in fp32
    (a softmax over tens of thousands of words in fp16 loses the small probabilities that carry
    the teacher's knowledge). T^2 keeps the gradient on the cross-entropy's scale as T grows.
    """
    student = student_logits[mask].float() / temperature  # (N, V): the selected positions
    target = teacher_logits[mask].float() / temperature
    divergence = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(target, dim=-1), log_target=True,
                          reduction="sum")
    return divergence * temperature ** 2
