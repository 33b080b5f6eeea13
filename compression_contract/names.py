"""A parameter's logical name: the name it has without the weight-transform chain."""

from __future__ import annotations

__all__ = ["PARAMETRIZED", "logical_name"]

PARAMETRIZED = ".parametrizations."  # torch.nn.utils.parametrize's state_dict layout


def logical_name(name: str) -> str:
    """``fc.parametrizations.weight.original`` -> ``fc.weight``; other names unchanged (a
    transform's own tensor, ``fc.parametrizations.weight.0.mask``, keeps its name)."""
    head, found, tail = name.partition(PARAMETRIZED)
    if found and tail.endswith(".original"):
        return f"{head}.{tail[: -len('.original')]}"
    return name
