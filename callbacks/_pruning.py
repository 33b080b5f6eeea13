"""Magnitude-pruning masks shared by the pruning callbacks.

A mask is a ``PruningMask`` weight transform (stage MASK, the first of the chain): a buffer of
the model, so the ordinary checkpoint carries it and every DDP rank holds the same one (masks
are computed from the weights, which DDP keeps identical). The weight a layer computes with is
``W * mask``, so pruned entries are exactly zero in any precision; when a mask grows, the
pruned entries of the parameter itself are set to zero too, after which they stay zero (their
gradient is zero, and so is any weight decay of a zero), so the raw parameter equals the
masked weight and the exporter may encode it directly.
"""

from __future__ import annotations

from typing import Any, Sequence

from lightning.pytorch.utilities import rank_zero_info
import torch
from torch import nn

from callbacks._selection import select_modules
from callbacks._transforms import (WeightTransform, add_weight_transform, find_weight_transform, trainable_weight,
                                   weight_transforms)
from compression_contract.manifest import MASK, SPARSE_ORDER, record_codec


class PruningMask(WeightTransform):
    """``weight * mask`` (mask: 1 keeps, 0 prunes; float, the weight's shape)."""

    stage = MASK

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones_like(weight.detach(), dtype=torch.float32))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


class PrunedWeights:
    """The selected weights of one model and their masks. A parameter shared by several selected
    modules (an embedding tied to the output projection) is one weight with one mask: its modules
    hold the same ``PruningMask`` (the same buffer under each module's name). A parameter shared
    with a module that is not selected is left dense (listed in ``left_dense``)."""

    def __init__(self, root: nn.Module, owner: str, include: Sequence[str], exclude: Sequence[str],
                 embeddings: bool) -> None:
        self.owner = owner
        groups: dict[int, tuple[list[nn.Module], list[str]]] = {}
        for module, names in select_modules(root, owner, include, exclude, embeddings=embeddings):
            modules, all_names = groups.setdefault(id(trainable_weight(module)), ([], []))
            modules.append(module)
            all_names.extend(names)
        # A parameter also used by a module outside the selection (the output projection tied to
        # an embedding table when embeddings are not pruned) stays dense: masked in one use only,
        # its pruned entries would still get gradients from the other and drift from zero.
        users: dict[int, set[int]] = {}
        for module in root.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                users.setdefault(id(trainable_weight(module)), set()).add(id(module))
        self.left_dense: list[str] = []
        for key, (modules, names) in list(groups.items()):
            if users.get(key, set()) - {id(m) for m in modules}:
                self.left_dense.append(names[0])
                del groups[key]
        if not groups:
            raise ValueError(f"{owner}: every selected weight is shared with a module outside the selection "
                             f"({self.left_dense}); select those modules too (prune_embeddings=True for a tied "
                             f"embedding)")
        if self.left_dense:
            rank_zero_info(f"{owner}: left dense, their weights being shared with modules not selected "
                           f"(prune_embeddings=True prunes a tied embedding and its projection together): "
                           f"{', '.join(self.left_dense)}")
        self.groups = list(groups.values())
        for modules, _ in self.groups:
            existing = next((find_weight_transform(m, PruningMask) for m in modules
                             if find_weight_transform(m, PruningMask) is not None), None)
            mask = existing or PruningMask(trainable_weight(modules[0]))
            for module in modules:
                add_weight_transform(module, mask)

    def masks(self) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
        """(first name, parameter, mask buffer) of every pruned weight, each once."""
        return [(names[0], trainable_weight(modules[0]), find_weight_transform(modules[0], PruningMask).mask)
                for modules, names in self.groups]

    @property
    def total(self) -> int:
        return sum(mask.numel() for _, _, mask in self.masks())

    def remaining(self) -> int:
        return int(sum(mask.sum().item() for _, _, mask in self.masks()))

    def sparsity(self) -> float:
        return 1.0 - self.remaining() / self.total

    def layer_sparsity(self) -> dict[str, float]:
        return {name: 1.0 - mask.mean().item() for name, _, mask in self.masks()}

    @torch.no_grad()
    def prune_to(self, keep: float, scope: str) -> None:
        """Prune the smallest-magnitude surviving weights until a fraction ``keep`` of all of
        them (``scope="global"``) or of each layer (``"layer"``) survives. Masks only grow."""
        groups = [self.masks()] if scope == "global" else [[entry] for entry in self.masks()]
        for group in groups:
            total = sum(mask.numel() for _, _, mask in group)
            surviving = sum(int(mask.sum().item()) for _, _, mask in group)
            target = int(round(keep * total))
            prune = surviving - target
            if prune <= 0:
                continue
            # Magnitudes of the survivors only (pruned entries are +inf: never chosen again).
            scores = torch.cat([torch.where(mask.bool(), weight.detach().abs().float(), torch.full_like(mask, float("inf"))
                                            ).flatten() for _, weight, mask in group])
            order = torch.argsort(scores, stable=True)[:prune]  # ties broken by position: the same on every rank
            flat = torch.ones_like(scores)
            flat[order] = 0.0
            offset = 0
            for _, weight, mask in group:
                count = mask.numel()
                mask.mul_(flat[offset : offset + count].view_as(mask).to(mask.device))
                offset += count
        self.zero_pruned()

    @torch.no_grad()
    def zero_pruned(self) -> None:
        for _, weight, mask in self.masks():
            weight.mul_(mask.to(weight.dtype))

    @torch.no_grad()
    def set_masks(self, masks: dict[str, torch.Tensor], source: str) -> None:
        """Masks by first name, from the checkpoint ``source`` of another run (the random-reinit
        control)."""
        for name, _, mask in self.masks():
            if name not in masks:
                raise ValueError(f"{self.owner}: masks_from {source} has no mask for {name}")
            if masks[name].shape != mask.shape:
                raise ValueError(f"{self.owner}: masks_from {source}: the mask for {name} has shape "
                                 f"{tuple(masks[name].shape)}, the weight {tuple(mask.shape)}")
            mask.copy_(masks[name])
        self.zero_pruned()

    def record(self, checkpoint: dict[str, Any], root: nn.Module) -> None:
        """The sparse codec step of every masked weight, naming its mask in the state_dict."""
        for modules, _ in self.groups:
            for module in modules:
                index = next(i for i, t in enumerate(weight_transforms(module)) if isinstance(t, PruningMask))
                for name, candidate in root.named_modules(remove_duplicate=False):
                    if candidate is module:
                        record_codec(checkpoint, f"{name}.weight", "sparse", SPARSE_ORDER,
                                     mask=f"{name}.parametrizations.weight.{index}.mask")


def masks_in_checkpoint(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module name -> pruning mask, from a checkpoint's state_dict (any chain position)."""
    found = {}
    for key, value in state_dict.items():
        head, marker, tail = key.partition(".parametrizations.weight.")
        if marker and tail.endswith(".mask"):
            found[head] = value
    return found
