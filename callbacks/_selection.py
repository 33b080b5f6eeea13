"""Which modules a compression callback acts on: qualified-name globs, shared modules once.

Every callback selects ``nn.Linear`` (and optionally ``nn.Embedding``) leaves by globs over
their qualified names (``model.decoder_layers.*.ffn.*``). A module reachable under several
names (one embedding shared by encoder and decoder) is one target, and must be selected under
all its names or none, else the callback would treat one tensor two ways.
"""

from __future__ import annotations

import fnmatch
from typing import Sequence

from torch import nn

__all__ = ["SelectedModule", "check_globs", "select_modules"]

SelectedModule = tuple[nn.Module, list[str]]  # (module, every qualified name it has)


def check_globs(owner: str, include: Sequence[str], exclude: Sequence[str]) -> None:
    if isinstance(include, str) or isinstance(exclude, str):
        raise ValueError(f"{owner}: include and exclude are lists of globs, e.g. ['*'], not a single string")
    if not include:
        raise ValueError(f"{owner}: include must name at least one glob (['*'] selects every module)")


def matches(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in globs)


def select_modules(root: nn.Module, owner: str, include: Sequence[str], exclude: Sequence[str],
                   embeddings: bool = True, required: bool = True) -> list[SelectedModule]:
    """The nn.Linear (and nn.Embedding) modules of ``root`` matching ``include`` and not
    ``exclude``, each once with all its names. ``required``: selecting nothing is an error."""
    kinds = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    aliases: dict[int, SelectedModule] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        if isinstance(module, kinds):
            aliases.setdefault(id(module), (module, []))[1].append(name)
    selected = []
    for module, names in aliases.values():
        chosen = [name for name in names if matches(name, include) and not matches(name, exclude)]
        if chosen and len(chosen) < len(names):
            raise ValueError(f"{owner}: one module is shared as {names}, and include={list(include)} "
                             f"exclude={list(exclude)} select it as {chosen} only; select all its names or none")
        if chosen:
            selected.append((module, names))
    if required and not selected:
        kind = "nn.Linear/nn.Embedding" if embeddings else "nn.Linear"
        raise ValueError(f"{owner} selected no {kind} module with include={list(include)} exclude={list(exclude)}")
    return selected
