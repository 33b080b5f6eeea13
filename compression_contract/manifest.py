"""How a compression callback tells an exporter what it did, in the checkpoint it saves.

``checkpoint[COMPRESSION_KEY]`` maps the qualified name of a tensor (as the LightningModule
names it, e.g. ``model.decoder_layers.0.ffn.fc1.weight``) to the list of codec steps that
encode it, each a dict of plain values::

    {"codec": "int8", "order": 20, "bits": 8, "per_channel": False,
     "activation_range": "model.decoder_layers.0.ffn.fc1.input_quantizer.absmax"}

``order`` is the encoding order (the first step encodes the trained weight); string values
that are state_dict keys name tensors of the same checkpoint. The weight-transform stages are
ordered the same way: a transform of a lower stage sees the raw weight first.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CODEBOOK", "COMPRESSION_KEY", "MASK", "PERTURB", "QUANTIZE", "SPARSE_ORDER", "record_codec"]

COMPRESSION_KEY = "compression"
# Stages of the weight-transform chain, and the encoding order of their codec steps.
MASK, PERTURB, CODEBOOK, QUANTIZE = 0, 10, 15, 20
SPARSE_ORDER = 30  # after any quantization: the sparse step stores the survivors of the quantized values


def record_codec(checkpoint: dict[str, Any], tensor_name: str, codec: str, order: int, **spec: Any) -> None:
    """Add one codec step for ``tensor_name`` to the checkpoint's manifest (replacing a step of
    the same codec, so saving twice writes it once)."""
    steps = checkpoint.setdefault(COMPRESSION_KEY, {}).setdefault(tensor_name, [])
    steps[:] = [step for step in steps if step["codec"] != codec]
    steps.append({"codec": codec, "order": order, **spec})
    steps.sort(key=lambda step: step["order"])
