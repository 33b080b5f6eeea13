"""Word-level soft-target loss shared by the distillation callbacks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["soft_target_loss"]


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
