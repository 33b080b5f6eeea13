"""What a compression callback tells the exporter, in the checkpoint it saves.

``checkpoint["compression"]`` maps the qualified name of a tensor (as the LightningModule
names it, e.g. ``model.decoder_layers.0.ffn.fc1.weight``) to the list of codec steps that
encode it, each a dict of plain values::

    {"codec": "int8", "order": 20, "bits": 8, "per_channel": False,
     "activation_range": "model.decoder_layers.0.ffn.fc1.input_quantizer.absmax"}

``order`` is the encoding order (the first step encodes the trained weight); values that
are strings ending in a state_dict key refer to tensors of the same checkpoint. The exporter
(``nmt_lightning.export``) holds one codec per name and never needs to know which callback
wrote the step, so a new compression method adds a codec, not a branch in the exporter.
"""

from __future__ import annotations

from typing import Any

COMPRESSION_KEY = "compression"

__all__ = ["COMPRESSION_KEY", "record_codec"]


def record_codec(checkpoint: dict[str, Any], tensor_name: str, codec: str, order: int, **spec: Any) -> None:
    """Add one codec step for ``tensor_name`` to the checkpoint's manifest (replacing a step of
    the same codec, so saving twice writes it once)."""
    steps = checkpoint.setdefault(COMPRESSION_KEY, {}).setdefault(tensor_name, [])
    steps[:] = [step for step in steps if step["codec"] != codec]
    steps.append({"codec": codec, "order": order, **spec})
    steps.sort(key=lambda step: step["order"])
