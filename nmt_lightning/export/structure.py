"""Cutting out the units structured pruning removed: smaller matrices in the exported file.

A checkpoint trained with structured pruning records, per module, which units (attention
heads, feed-forward neurons) it dropped (``compression_contract.manifest.STRUCTURE_KEY``). The
exporter takes their rows and columns out of the tensors before encoding them (``cut_units``),
and the file lists each module's new size, so loading first shrinks the freshly built model to
those shapes (``shrink_modules``) and then fills it. Nothing here knows our model: the record
names the layers and the attribute that counts the units.

A torch.nn.MultiheadAttention (record ``fused_rows: "in_proj"``) loses the removed heads' rows in
each of the q, k and v blocks of its own ``in_proj_weight``; it cannot hold fewer heads of the same
width, so loading puts a ``PrunedMultiheadAttention`` (same call, same output) in its place. A
record marked ``cut: False`` (such attentions, as checkpoints of earlier versions recorded them)
keeps its shapes, with the removed units' rows and columns written as zeros.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from compression_contract.manifest import STRUCTURE_KEY
from nmt_lightning.errors import ModelFileError
from nmt_lightning.export.pruned_attention import PrunedMultiheadAttention, disable_nested_tensor_paths

__all__ = ["cut_units", "shrink_modules", "structure_records"]


def structure_records(checkpoint: Mapping[str, Any], prefix: str) -> dict[str, dict]:
    """Module name (without ``prefix``) -> its structure record, for the modules under ``prefix``."""
    records = checkpoint.get(STRUCTURE_KEY) or {}
    if not isinstance(records, Mapping):
        raise ModelFileError(f"the checkpoint's '{STRUCTURE_KEY}' entry is not a mapping")
    return {name[len(prefix):]: dict(record) for name, record in records.items() if name.startswith(prefix)}


def _kept_rows(units: torch.Tensor, width: int) -> torch.Tensor:
    """The row (or column) indices of the kept ``units`` (indices): unit u spans rows u * width .. u * width + width - 1."""
    return (units[:, None] * width + torch.arange(width)).flatten()


def _unit_tensor_names(module: str, record: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(the tensors whose rows hold the record's units: its ``rows`` children's weights and biases and
    the module's own fused q/k/v tensors, the tensors whose columns hold them: its ``columns`` children's weights)."""
    rows = [f"{module}.{child}.{part}" for child in record["rows"] for part in ("weight", "bias")]
    if record.get("fused_rows"):
        rows += [f"{module}.{record['fused_rows']}_{part}" for part in ("weight", "bias")]
    return rows, [f"{module}.{child}.weight" for child in record["columns"]]


def cut_units(weights: Mapping[str, torch.Tensor], plan: Mapping[str, list[dict]], state: Mapping[str, torch.Tensor],
              records: Mapping[str, dict], origin: str, prefix: str) -> tuple[dict, dict, dict[str, dict]]:
    """(weights, state, sizes): ``weights`` (names without ``prefix``) with the dropped units'
    rows and columns taken out; ``state`` (the checkpoint's) with the same cut made in every
    tensor a codec step of those weights reads that has the weight's shape (a pruning mask);
    sizes: module -> {"units": kept, "width", "rows", "columns", "count_attribute"} (and
    "row_blocks", or "fused_rows" with "kept_units": the kept heads' indices), for the file."""
    weights, state, sizes = dict(weights), dict(state), {}
    for module, record in records.items():
        keep_key = record["keep"]
        if keep_key not in state:
            raise ModelFileError(f"{origin}: the structure record of {module} names {keep_key}, but the checkpoint has "
                                 f"no such tensor")
        keep = state[keep_key].detach().cpu()
        width = int(record["width"])
        if record.get("cut", True) is False:
            weights = _zero_units(weights, keep, width, record, module)
            continue
        fused = record.get("fused_rows")
        if fused and bool((keep > 0).all()):  # no head removed: torch's attention stays, with its fused kernels
            continue
        units = torch.nonzero(keep.flatten() > 0).flatten()  # the kept units' indices
        kept = _kept_rows(units, width)
        row_blocks = 3 if fused else int(record.get("row_blocks", 1))
        # q, k and v in one tensor: the kept rows of each of its blocks of units * width rows
        rows = torch.cat([block * keep.numel() * width + kept for block in range(row_blocks)])
        row_tensors, column_tensors = _unit_tensor_names(module, record)
        for axis, names, index in ((0, row_tensors, rows), (1, column_tensors, kept)):
            for tensor_name in names:
                if tensor_name not in weights:
                    continue
                original = weights[tensor_name]
                weights[tensor_name] = original.index_select(axis, index.to(original.device))
                for step in plan.get(tensor_name, []):
                    if step["codec"] == "ipq":
                        raise ModelFileError(f"{origin}: {tensor_name} has iPQ codebooks and structured pruning "
                                             f"removed units of it; codebooks cannot be cut (train iPQ without "
                                             f"structured pruning, or export without iPQ)")
                    for value in step.values():
                        if isinstance(value, str) and value in state and state[value].shape == original.shape:
                            state[value] = state[value].index_select(axis, index.to(state[value].device))
        sizes[module] = {"units": len(units), "width": width, "rows": list(record["rows"]),
                         "columns": list(record["columns"]), "count_attribute": record.get("count_attribute")}
        if fused:  # loading swaps the module for one of the kept heads: which, for 3-D attention masks
            sizes[module].update(fused_rows=fused, kept_units=units.tolist())
        elif row_blocks != 1:
            sizes[module]["row_blocks"] = row_blocks
    return weights, state, sizes


def _zero_units(weights: Mapping[str, torch.Tensor], keep: torch.Tensor, width: int, record: Mapping[str, Any],
                module: str) -> dict[str, torch.Tensor]:
    """``weights`` with the removed units' rows and columns set to zero, shapes unchanged (a module
    that cannot take smaller matrices: torch.nn.MultiheadAttention). The masked model computed
    the same: its out_proj columns were masked, so a removed head added nothing."""
    weights = dict(weights)
    dropped = (keep.flatten() <= 0).repeat_interleave(width)  # (units * width,): the complement of _kept_rows
    for axis, names in zip((0, 1), _unit_tensor_names(module, record)):
        for name in names:
            if name not in weights:
                continue
            tensor = weights[name]
            blocks = tensor.shape[axis] // dropped.numel()  # 3 for fused q/k/v rows
            mask = dropped.repeat(blocks).to(tensor.device)
            shaped = mask if tensor.dim() == 1 else mask[:, None] if axis == 0 else mask[None, :]  # a bias: (rows,)
            weights[name] = tensor.masked_fill(shaped, 0.0)
    return weights


def _smaller_linear(linear: nn.Module, rows: int | None, columns: int | None) -> nn.Linear:
    """A fresh nn.Linear like ``linear`` with ``rows`` outputs or ``columns`` inputs."""
    out_features = rows if rows is not None else linear.out_features
    in_features = columns if columns is not None else linear.in_features
    return nn.Linear(in_features, out_features, bias=linear.bias is not None, device=linear.weight.device)


def shrink_modules(model: nn.Module, sizes: Mapping[str, dict]) -> nn.Module:
    """Shrink the named modules of ``model`` in place to the sizes an exported file lists (their
    values are filled afterwards); returns ``model``."""
    for module_name, size in sizes.items():
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise ModelFileError(f"the file cuts units of {module_name}, which the {type(model).__name__} does not "
                                 f"have: another class than the one exported?") from None
        if size.get("fused_rows"):
            _replace_multihead_attention(model, module_name, module, size)
            continue
        width = size["units"] * size["width"]
        for child in size["rows"]:
            rows = width * int(size.get("row_blocks", 1))
            setattr(module, child, _smaller_linear(getattr(module, child), rows=rows, columns=None))
        for child in size["columns"]:
            setattr(module, child, _smaller_linear(getattr(module, child), rows=None, columns=width))
        if size.get("count_attribute"):
            setattr(module, size["count_attribute"], size["units"])
    disable_nested_tensor_paths(model)
    return model


def _replace_multihead_attention(model: nn.Module, name: str, module: nn.Module, size: Mapping[str, Any]) -> None:
    """Put a PrunedMultiheadAttention of the file's kept heads in the place of ``name``."""
    if not isinstance(module, nn.MultiheadAttention) or size["fused_rows"] != "in_proj":
        raise ModelFileError(f"the file cuts heads out of the fused {size['fused_rows']} rows of {name}, a "
                             f"{type(module).__name__} in the {type(model).__name__}: only an nn.MultiheadAttention "
                             f"has those")
    kept = size.get("kept_units") or list(range(size["units"]))
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attribute, PrunedMultiheadAttention.like(module, kept))
