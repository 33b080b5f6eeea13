"""One chain of weight transforms per tensor, shared by every compression callback.

A pruning mask, Quant-Noise, product-quantization centroids and fake quantization may all act
on the same ``nn.Linear.weight`` in one run. They are registered with PyTorch's own
``torch.nn.utils.parametrize``: the module keeps its class (``isinstance(m, nn.Linear)`` still
holds, so the next callback finds it), the trainable tensor stays one ``nn.Parameter`` (tied
weights stay tied, the optimiser sees the same object) and every read of ``module.weight``
returns the chain applied to it, computed afresh from the untouched parameter.

The order is fixed by each transform's ``stage``, whatever the order of the callbacks list:

    MASK (pruning)  ->  PERTURB (Quant-Noise)  ->  CODEBOOK (iPQ centroids)  ->  QUANTIZE (fake quantization)

Structural changes belong in ``Callback.setup()`` (before weights are restored and before the
optimiser exists). ``add_weight_transform`` is idempotent per transform type, so a second
``setup`` (fit, then test with the same callbacks) changes nothing.

State-dict layout (torch's): the parameter is saved as ``<module>.parametrizations.weight.original``
and each transform's buffers as ``<module>.parametrizations.weight.<index>.<buffer>``. A
checkpoint saved before a transform was added (a plain model, or a run with fewer callbacks)
still loads: its plain ``<module>.weight`` becomes the ``original``, and a transform none of
whose tensors the checkpoint has starts from its fresh state (a load pre-hook does both).
"""

from __future__ import annotations

from typing import ClassVar, Optional, TypeVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from compression_contract.manifest import CODEBOOK, MASK, PERTURB, QUANTIZE
from compression_contract.names import logical_name

__all__ = ["CODEBOOK", "MASK", "PERTURB", "QUANTIZE", "WeightTransform", "add_weight_transform", "find_weight_transform",
           "logical_name", "refuse_optimizer_state_of_untransformed_weights", "trainable_weight", "weight_transforms"]

# Stages of the chain (compression_contract.manifest): a transform of a lower stage sees the raw weight first.

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

    def decides_encoding(self) -> bool:
        """Whether this transform fixes how the weight is stored on export (a fake-quantization
        grid, a codebook in use): another callback then records no encoding of its own for it."""
        return False


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
    tensors = module.__dict__.setdefault("_transformed_tensors", set())
    if not tensors:
        module.register_load_state_dict_pre_hook(_load_checkpoints_saved_without_transforms)
    tensors.add(tensor_name)
    return transform


def refuse_optimizer_state_of_untransformed_weights(checkpoint: dict, root: nn.Module, owner: str) -> None:
    """Call from ``Callback.on_load_checkpoint``: resuming (``ckpt_path``) a checkpoint saved
    before a transform was put on a weight cannot restore its optimiser state, which is stored
    by parameter position, and parametrize moves the weight behind the bias (same-shaped
    tensors would silently swap their Adam moments). Starting from its weights works."""
    if not checkpoint.get("optimizer_states"):
        return
    saved = checkpoint.get("state_dict", {})
    for name, module in root.named_modules():
        for tensor_name in getattr(module, "_transformed_tensors", ()):
            prefix = f"{name}." if name else ""
            if f"{prefix}{tensor_name}" in saved and f"{prefix}parametrizations.{tensor_name}.original" not in saved:
                raise ValueError(
                    f"{owner}: the checkpoint was saved without weight transforms on {prefix}{tensor_name}, so its "
                    f"optimiser state does not fit this model; start from its weights instead of resuming it "
                    f"(TranslationModule's init_from, or load_state_dict) and let the optimiser start afresh")


def _load_checkpoints_saved_without_transforms(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    for tensor_name in module._transformed_tensors:
        plain, original = f"{prefix}{tensor_name}", f"{prefix}parametrizations.{tensor_name}.original"
        if plain in state_dict and original not in state_dict:
            state_dict[original] = state_dict.pop(plain)
        if original not in state_dict:
            continue  # nothing of this tensor in the checkpoint: strict loading reports it
        for index, transform in enumerate(weight_transforms(module, tensor_name)):
            own = {f"{prefix}parametrizations.{tensor_name}.{index}.{key}": value
                   for key, value in transform.state_dict().items()}
            if own and not any(key in state_dict for key in own):
                state_dict.update({key: value.detach().clone() for key, value in own.items()})
