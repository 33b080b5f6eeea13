"""torch layers that use an nn.Linear child without calling it.

``nn.MultiheadAttention`` keeps its output projection as an ``nn.Linear`` (``out_proj``, of the
class ``NonDynamicallyQuantizableLinear``) but applies it inside
``F.multi_head_attention_forward`` from its ``weight`` and ``bias``. A hook on that child's
forward never fires, so it has no observed input range, and a layer put in its place (an int8
runtime layer) is never called: the attention reads ``.weight`` and finds none. Callbacks
transform such a child's weight only; loaders keep it an nn.Linear. A module standing in for an
nn.MultiheadAttention that reads its ``out_proj`` the same way says so with a class attribute
``reads_out_proj_by_weight = True`` (the loader's attention with heads cut out).
"""

from __future__ import annotations

from torch import nn

__all__ = ["linears_read_by_weight"]


def linears_read_by_weight(root: nn.Module) -> set[int]:
    """The ``id`` of every nn.Linear of ``root`` that its parent reads by weight instead of calling."""
    return {id(module.out_proj) for module in root.modules()
            if isinstance(module, nn.MultiheadAttention) or getattr(module, "reads_out_proj_by_weight", False)}
