"""Which modules a compression callback acts on: qualified-name globs, shared modules once.

Every callback selects ``nn.Linear`` (and optionally ``nn.Embedding``) leaves by globs over
their qualified names (``model.decoder_layers.*.ffn.*``). A module reachable under several
names (one embedding shared by encoder and decoder) is one target, and must be selected under
all its names or none, else the callback would treat one tensor two ways.
"""

from __future__ import annotations

import fnmatch
from typing import Mapping, Optional, Sequence, TypeVar

from torch import nn

from callbacks._arguments import glob_mapping, integer

__all__ = ["BlockSizes", "SelectedModule", "first_match", "select_modules"]

SelectedModule = tuple[nn.Module, list[str]]  # (module, every qualified name it has)
T = TypeVar("T")


def matches(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in globs)


def first_match(name: str, by_glob: Mapping[str, T], default: T) -> T:
    """The value of the first glob of ``by_glob`` matching ``name``, else ``default``."""
    return next((value for pattern, value in by_glob.items() if fnmatch.fnmatchcase(name, pattern)), default)


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


class BlockSizes:
    """Columns per block of each selected weight (Quant-Noise, product quantization): the first
    glob of ``block_sizes`` matching the module's name, else ``block_size``."""

    def __init__(self, owner: str, block_size: int, block_sizes: Optional[Mapping[str, int]]) -> None:
        self.owner = owner
        self.block_size = integer(owner, "block_size", block_size, minimum=1)
        self.block_sizes = glob_mapping(owner, "block_sizes", block_sizes,
                                        lambda name, size: integer(owner, name, size, minimum=1))

    def of(self, name: str, weight: nn.Parameter) -> int:
        """The block size of module ``name``'s ``weight`` (rows, columns); it must divide the columns."""
        size = first_match(name, self.block_sizes, self.block_size)
        if weight.shape[1] % size:
            raise ValueError(f"{self.owner}: block size {size} does not divide the {weight.shape[1]} columns of "
                             f"{name}.weight {tuple(weight.shape)}; choose a divisor (block_size, or block_sizes for "
                             f"this module)")
        return size
