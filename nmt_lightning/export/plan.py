"""Which codec steps encode each tensor of a checkpoint: its compression manifest, adjusted by
the exporter's ``quantize`` option."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

from torch import nn

from compression_contract.manifest import COMPRESSION_KEY, QUANTIZE
from nmt_lightning.errors import ModelFileError
from nmt_lightning.export.codecs import codec

QUANTIZE_CHOICES = ("int8", "int4", "fp32")
Steps = list[dict]


def _manifest_of_0_1_0(checkpoint: Mapping) -> dict[str, list[dict]]:
    """nmt-lightning 0.1.0's QAT checkpoints had no manifest: their fake-quantized modules carried
    the buffers ``fake_quant_enabled`` and (nn.Linear) ``input_absmax``, and the callback's state
    its grid. The same information as a manifest, so those checkpoints still export."""
    state = checkpoint.get("state_dict", {})
    modules = [key[: -len(".fake_quant_enabled")] for key in state if key.endswith(".fake_quant_enabled")]
    settings = next((value for key, value in (checkpoint.get("callbacks") or {}).items()
                     if key.startswith("QuantizationAwareTraining") and isinstance(value, dict)), {})
    manifest = {}
    for module in modules:
        step = {"codec": "int8", "order": 20, "bits": int(settings.get("bits", 8)),
                "per_channel": bool(settings.get("per_channel", False))}
        if f"{module}.input_absmax" in state:
            step["activation_range"] = f"{module}.input_absmax"
        manifest[f"{module}.weight"] = [step]
    return manifest


def compression_manifest(checkpoint: Mapping) -> dict[str, list[dict]]:
    """The checkpoint's manifest (tensor name -> codec steps), empty for a plain model."""
    return checkpoint.get(COMPRESSION_KEY) or _manifest_of_0_1_0(checkpoint)


def manifest_steps(checkpoint: Mapping, prefix: str = "model.") -> dict[str, Steps]:
    """Tensor name (without ``prefix``) -> codec steps, from the checkpoint's manifest."""
    manifest = compression_manifest(checkpoint)
    if not isinstance(manifest, dict):
        raise ModelFileError(f"the checkpoint's '{COMPRESSION_KEY}' entry is not a mapping")
    steps = {}
    for name, entries in manifest.items():
        if name.startswith(prefix):
            for entry in entries:
                codec(entry["codec"])  # an unknown codec is an error here, not half-way through writing
            steps[name[len(prefix):]] = sorted((dict(entry) for entry in entries), key=lambda entry: entry["order"])
    return steps


def quantizable_weights(model: nn.Module) -> list[str]:
    """Every name of every nn.Linear / nn.Embedding weight (a shared module under each of its names)."""
    return [f"{name}.weight" for name, module in model.named_modules(remove_duplicate=False)
            if isinstance(module, (nn.Linear, nn.Embedding))]


INT8_STEP = {"codec": "int8", "order": QUANTIZE, "bits": 8, "per_channel": False}


def _quantize_where_dense(plan: dict[str, Steps], names: Iterable[str], step: Callable[[str], dict]) -> None:
    """Append ``step(name)`` to each named tensor's steps unless one of them already quantizes it."""
    for name in names:
        steps = plan.setdefault(name, [])
        if not any(codec(s["codec"]).quantizes for s in steps):
            steps.append(step(name))


def _eight_bits_beside_int8_codebooks(plan: dict[str, Steps], model: nn.Module) -> None:
    """The paper's "iPQ & int8": a model trained with int8 codebooks
    (``IterativeProductQuantization(centroid_bits=8)``) stores what stays dense in 8 bits too:
    nn.Linear / nn.Embedding weights on the int8 grid (per tensor, as ``--quantize int8``), every
    other parameter (biases, LayerNorm gains and shifts) as ``affine8``. Without this, the fp32
    biases and norms of the tiny model are 6% of its iPQ & int8 file."""
    if not any(s["codec"] == "ipq" and int(s.get("centroid_bits", 16)) == 8 for steps in plan.values() for s in steps):
        return
    weights = set(quantizable_weights(model))
    _quantize_where_dense(plan, (name for name, _ in model.named_parameters(remove_duplicate=False)),
                          lambda name: dict(INT8_STEP) if name in weights else {"codec": "affine8", "order": QUANTIZE})


def export_plan(checkpoint: Mapping, model: nn.Module, quantize: Optional[str], prefix: str = "model.") -> dict[str, Steps]:
    """The steps per tensor: the manifest as trained (None); without its quantizing steps
    ("fp32"); or with int8 / int4 added where nothing quantizes yet (post-training, dynamic
    activations). A model with int8 codebooks keeps nothing in fp32 (``_eight_bits_beside_int8_codebooks``).
    ``prefix``: where ``model``'s tensors sit in the checkpoint (the manifest's names)."""
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES} or None, got {quantize!r}")
    plan = manifest_steps(checkpoint, prefix)
    if quantize == "fp32":
        plan = {name: [s for s in steps if not codec(s["codec"]).quantizes] for name, steps in plan.items()}
    elif quantize in ("int8", "int4"):
        # Post-training: int8 per tensor (Q8BERT's "DQ"); int4 per row (a 15-level grid per
        # tensor loses too much). Embeddings as well as nn.Linear.
        step = INT8_STEP if quantize == "int8" else {"codec": "int4", "order": QUANTIZE, "bits": 4, "per_channel": True}
        _quantize_where_dense(plan, quantizable_weights(model), lambda name: dict(step))
    _eight_bits_beside_int8_codebooks(plan, model)
    for name, steps in plan.items():
        grids = [s["codec"] for s in steps if codec(s["codec"]).quantizes]
        if len(grids) > 1:  # e.g. QAT's int8 on top of iPQ's codebook: int8 would encode the assignments
            raise ModelFileError(f"{name} is recorded as {' then '.join(grids)}; two quantizing steps do not compose "
                              f"(for iPQ with int8 codebooks, train IterativeProductQuantization with centroid_bits=8)")
    return {name: steps for name, steps in plan.items() if steps}
