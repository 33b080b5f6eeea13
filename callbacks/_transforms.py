"""One chain of weight transforms per tensor, shared by every compression callback.

A pruning mask, Quant-Noise, product-quantization centroids and fake quantization may all act
on the same ``nn.Linear.weight`` in one run. They are registered with PyTorch's own
``torch.nn.utils.parametrize``: the module keeps its class (``isinstance(m, nn.Linear)`` still
holds, so the next callback finds it), the trainable tensor stays one ``nn.Parameter`` (tied
weights stay tied, the optimiser sees the same object) and every read of ``module.weight``
returns the chain applied to it, computed afresh from the untouched parameter.

The order is fixed by each transform's ``stage``, whatever the order of the callbacks list:

    MASK (pruning)  ->  PERTURB (Quant-Noise, iPQ centroids)  ->  QUANTIZE (fake quantization)

Structural changes belong in ``Callback.setup()`` (before weights are restored and before the
optimiser exists). ``add_weight_transform`` is idempotent per transform type, so a second
``setup`` (fit, then test with the same callbacks) changes nothing.

State-dict layout (torch's): the parameter is saved as ``<module>.parametrizations.weight.original``
and each transform's buffers as ``<module>.parametrizations.weight.<index>.<buffer>``.
"""

from __future__ import annotations

from typing import ClassVar, Optional, TypeVar

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["MASK", "PERTURB", "QUANTIZE", "WeightTransform", "add_weight_transform", "find_weight_transform",
           "weight_transforms", "trainable_weight"]

# Stages of the chain: a transform of a lower stage sees the raw weight first.
MASK, PERTURB, QUANTIZE = 0, 10, 20

T = TypeVar("T", bound="WeightTransform")


class WeightTransform(nn.Module):
    """A function of a weight tensor, ``forward(weight) -> tensor of the same shape and dtype``.

    Subclasses set ``stage``; their buffers (masks, ranges, codebooks) are saved with the model.
    Never write into the weight: return a new tensor, so the parameter keeps its trained value
    (fairseq's quant_noise writes its masked weight into ``.data`` and loses the dropped values).
    """

    stage: ClassVar[int]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def weight_transforms(module: nn.Module, tensor_name: str = "weight") -> list[WeightTransform]:
    """The transforms on ``module.<tensor_name>``, in the order they are applied."""
    if not parametrize.is_parametrized(module, tensor_name):
        return []
    return list(module.parametrizations[tensor_name])


def find_weight_transform(module: nn.Module, kind: type[T], tensor_name: str = "weight") -> Optional[T]:
    """The transform of type ``kind`` on ``module.<tensor_name>``, if there is one."""
    return next((t for t in weight_transforms(module, tensor_name) if isinstance(t, kind)), None)


def trainable_weight(module: nn.Module, tensor_name: str = "weight") -> nn.Parameter:
    """The parameter itself (before any transform): what the optimiser updates."""
    if parametrize.is_parametrized(module, tensor_name):
        return module.parametrizations[tensor_name].original
    return getattr(module, tensor_name)


def add_weight_transform(module: nn.Module, transform: T, tensor_name: str = "weight") -> T:
    """Put ``transform`` into the chain of ``module.<tensor_name>`` at the place its stage says.

    Returns the transform in the chain: ``transform`` itself, or the one of the same type
    already there (idempotent). The parameter object is kept, so tied weights stay tied.
    """
    if not isinstance(transform, WeightTransform):
        raise TypeError(f"{type(transform).__name__} is not a WeightTransform")
    chain = weight_transforms(module, tensor_name)
    existing = next((t for t in chain if type(t) is type(transform)), None)
    if existing is not None:
        return existing
    ordered = sorted([*chain, transform], key=lambda t: t.stage)  # stable: equal stages keep their order
    if chain:
        # Take the chain apart and build it again in order; the original parameter is put back
        # as it was (leave_parametrized=False), so nothing is lost and identity is kept.
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
    for step in ordered:
        parametrize.register_parametrization(module, tensor_name, step)
    return transform
