"""How a compression callback tells an exporter what it did, in the checkpoint it saves.

``checkpoint[COMPRESSION_KEY]`` maps the qualified name of a tensor (as the LightningModule
names it, e.g. ``model.decoder_layers.0.ffn.fc1.weight``) to the list of codec steps that
encode it, each a dict of plain values::

    {"codec": "int8", "order": 20, "bits": 8, "per_channel": False,
     "activation_range": "model.decoder_layers.0.ffn.fc1.input_quantizer.absmax"}

``order`` is the encoding order (the first step encodes the trained weight); string values
that are state_dict keys name tensors of the same checkpoint. The weight-transform stages are
ordered the same way: a transform of a lower stage sees the raw weight first.

Structured pruning removes whole units (attention heads, feed-forward neurons) and records them
apart, in ``checkpoint[STRUCTURE_KEY]``: module name -> how to cut it, e.g. for the heads of an
attention module::

    {"keep": "model.encoder_layers.0.self_attn.q_proj.parametrizations.weight.0.keep",
     "rows": ["q_proj", "k_proj", "v_proj"], "columns": ["out_proj"], "width": 64,
     "count_attribute": "heads"}

``keep`` names a state_dict tensor (units,), 1 for a unit kept; unit ``u`` is rows
``u * width .. (u + 1) * width - 1`` of each ``rows`` child's weight (and bias) and those
columns of each ``columns`` child's weight; ``count_attribute`` (or None) is the module's integer
attribute counting the units, set to the number kept. An exporter cuts the tensors before
encoding them, so the file holds smaller matrices and its model is built with them.

``"fused_rows": "in_proj"`` describes a torch.nn.MultiheadAttention, whose q, k and v rows are
the module's own fused tensors: unit ``u``'s rows sit in each of the three blocks of
``in_proj_weight`` and ``in_proj_bias``, and are cut from each. Such a module cannot hold fewer
heads of the same width, so a loader puts one that can in its place. ``"cut": False`` says the
module keeps its size: the exporter zeroes the removed units' rows and columns in place instead
of taking them out (what checkpoints of earlier versions recorded for nn.MultiheadAttention). A
record without it is cut.
``"row_blocks": 3`` says each ``rows`` child computes q, k and v at once: its rows are three
blocks of ``units * width``, and unit ``u`` has its rows in each (cut from each).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CODEBOOK", "COMPRESSION_KEY", "MASK", "PERTURB", "QUANTIZE", "SPARSE_ORDER", "STRUCTURE_KEY", "record_codec",
           "record_structure"]

COMPRESSION_KEY = "compression"
STRUCTURE_KEY = "compression_structure"
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


def record_structure(checkpoint: dict[str, Any], module_name: str, keep: str, rows: list[str], columns: list[str],
                     width: int, count_attribute: str | None, fused_rows: str | None = None, cut: bool = True,
                     row_blocks: int = 1) -> None:
    """Record that ``module_name`` loses the units its ``keep`` tensor marks 0 (see the module
    docstring; saving twice writes it once)."""
    record = {"keep": keep, "rows": list(rows), "columns": list(columns), "width": int(width),
              "count_attribute": count_attribute}
    if fused_rows is not None:
        record["fused_rows"] = fused_rows
    if not cut:
        record["cut"] = False
    if row_blocks != 1:
        record["row_blocks"] = int(row_blocks)
    checkpoint.setdefault(STRUCTURE_KEY, {})[module_name] = record
