"""A compressed file for any nn.Module trained with the compression callbacks.

``export_module(checkpoint, model, output)`` writes the weights of ``model``'s class as the
checkpoint trained them, each tensor through the codec chain the checkpoint's ``compression``
manifest names (int8, int4, iPQ, sparse; what the callbacks recorded), in one safetensors file
(no pickle). ``load_module(model, path)`` fills a plain instance of the same class from it:
every tensor decoded to the values the compressed model computed with in training (a QAT
grid's dequantized values, a pruned weight's zeros, an iPQ weight's codewords), and each
``nn.Linear`` whose codec has a faster form replaced by it (``Int8Linear``, with QAT's trained
activation range where the file has one). ``model`` is an instance of the class the checkpoint
trained, built without the callbacks: it says which tensors are the model's own (the masks,
ranges and codebooks the callbacks added are read from the checkpoint, not exported as such).

``nmt-lightning export`` writes ``TranslationModule`` checkpoints this way too (``model_file.py``
adds the sentencepiece models and the hyper-parameters).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from compression_contract.torch_layers import linears_read_by_weight
from nmt_lightning.atomic import atomic_path
from nmt_lightning.checkpoint_reading import model_weights, read_checkpoint
from nmt_lightning.errors import ModelFileError
from nmt_lightning.export.codecs import codec, decode_chain, encode_chain, encoding_spec, runtime_linear
from nmt_lightning.export.plan import export_plan
from nmt_lightning.export.structure import cut_units, shrink_modules, structure_records

__all__ = ["MODULE_FORMAT", "EncodedWeights", "encode_weights", "export_module", "fill_module", "load_module"]

MODULE_FORMAT = "nmt-lightning-module/1"


@dataclass
class EncodedWeights:
    tensors: dict[str, torch.Tensor]  # stored name (and part) -> tensor
    entries: dict[str, dict]  # weight name -> {"stored", "parts", "codecs", "options"}
    weight_bytes_fp32: int  # the same weights in fp32, each storage once
    structure: dict[str, dict] = field(default_factory=dict)  # module -> its size after structured pruning

    def quantization(self) -> str:
        grids = sorted({s["codec"] for e in self.entries.values() for s in e["codecs"] if codec(s["codec"]).quantizes})
        return "+".join(grids) or "fp32"

    def activations(self) -> str:
        quantized = any(codec(s["codec"]).quantizes_inputs for e in self.entries.values() for s in e["codecs"])
        static = any(float(self.tensors[_key(n, "activation_range")]) > 0 for n, e in self.entries.items()
                     if "activation_range" in e["options"])
        return ("static" if static else "dynamic") if quantized else "fp32"


def _key(stored: str, part: str) -> str:
    return f"{stored}.{part}" if part else stored


def _state_tensor(state: Mapping[str, torch.Tensor], key: str, name: str, origin: str) -> torch.Tensor:
    if key not in state:
        raise ModelFileError(f"{origin}: the compression manifest names {key} for {name}, but the checkpoint has no "
                          f"such tensor")
    return state[key].detach()


def encode_weights(weights: Mapping[str, torch.Tensor], plan: Mapping[str, list[dict]],
                   state: Mapping[str, torch.Tensor], origin: str) -> EncodedWeights:
    """Encode each of ``weights`` (name -> trained tensor) by its steps in ``plan``; ``state`` is
    the checkpoint's state_dict (the steps' masks, codebooks and ranges are read from it). A tensor
    shared by several names is stored once per distinct encoding."""
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    stored_as: dict[tuple, str] = {}  # (storage, encoding) -> the name it is stored under
    parts_of: dict[str, list[str]] = {}
    fp32_storages: set[tuple] = set()
    fp32_bytes = 0
    for name, tensor in weights.items():
        steps = plan.get(name, [])
        encodings = [encoding_spec(step) for step in steps]
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if storage not in fp32_storages:
            fp32_storages.add(storage)
            fp32_bytes += tensor.numel() * 4
        identity = (*storage, json.dumps(encodings, sort_keys=True))
        if identity not in stored_as:
            stored_as[identity] = name
            parts = encode_chain(tensor, steps, lambda key: _state_tensor(state, key, name, origin))
            parts_of[name] = sorted(parts)
            for part, value in parts.items():
                tensors[_key(name, part)] = value.contiguous()
        options = []
        for step in steps:
            for option in codec(step["codec"]).runtime_options:
                if option in step:
                    tensors[_key(name, option)] = _state_tensor(state, step[option], name, origin).float().contiguous()
                    options.append(option)
        stored = stored_as[identity]
        entries[name] = {"stored": stored, "parts": parts_of[stored], "codecs": encodings, "options": options}
    return EncodedWeights(tensors, entries, fp32_bytes)


def encode_module_checkpoint(checkpoint: Mapping[str, Any], model: nn.Module, origin: str,
                             quantize: Optional[str] = None, prefix: str = "") -> EncodedWeights:
    """The weights of ``model`` (its state_dict's names, under ``prefix`` in the checkpoint),
    encoded as the checkpoint's manifest says (``quantize``: as ``nmt-lightning export``'s)."""
    if "state_dict" not in checkpoint:
        raise ModelFileError(f"{origin}: not a Lightning checkpoint (no state_dict)")
    state = checkpoint["state_dict"]
    weights = model_weights(state, model, prefix)
    missing = sorted(set(model.state_dict()) - set(weights))
    if missing:
        raise ModelFileError(f"{origin}: the checkpoint lacks {len(missing)} weights of the {type(model).__name__}, "
                          f"e.g. {prefix}{missing[0]} (another class, or another prefix?)")
    try:
        plan = export_plan(checkpoint, model, quantize, prefix)
    except KeyError as error:
        raise ModelFileError(f"{origin}: a compression step lacks the field {error}") from None
    structure: dict[str, dict] = {}
    records = structure_records(checkpoint, prefix)
    if records:  # structured pruning: the dropped heads' and neurons' rows and columns leave the file
        weights, state, structure = cut_units(weights, plan, state, records, origin, prefix)
    encoded = encode_weights(weights, plan, state, origin)
    encoded.structure = structure
    return encoded


@dataclass
class ModuleExportReport:
    output: Path
    quantization: str
    bytes_on_disk: int
    weight_bytes_fp32: int
    activations: str


def export_module(checkpoint: Union[str, os.PathLike, Mapping[str, Any]], model: nn.Module,
                  output: Union[str, os.PathLike], quantize: Optional[str] = None, prefix: str = "") -> ModuleExportReport:
    """Write ``output`` (safetensors): the weights of ``model``'s class as ``checkpoint`` (a path,
    or a loaded checkpoint) trained them, compressed by the codecs its callbacks recorded.
    ``model``: a plain instance of the class (no callbacks); ``prefix``: where its weights sit in
    the checkpoint's state_dict ("" for the LightningModule itself, "model." for a submodule)."""
    origin = str(checkpoint) if not isinstance(checkpoint, Mapping) else "the checkpoint"
    loaded = read_checkpoint(checkpoint) if not isinstance(checkpoint, Mapping) else checkpoint
    encoded = encode_module_checkpoint(loaded, model, origin, quantize, prefix)
    metadata = {"format": MODULE_FORMAT, "class": f"{type(model).__module__}.{type(model).__qualname__}",
                "quantization": encoded.quantization(), "activations": encoded.activations(),
                "weights": json.dumps(encoded.entries), "source_checkpoint": origin,
                "structure": json.dumps(encoded.structure)}
    output = Path(output)
    with atomic_path(output) as tmp:
        save_file(encoded.tensors, str(tmp), metadata=metadata)
    return ModuleExportReport(output, metadata["quantization"], output.stat().st_size, encoded.weight_bytes_fp32,
                              metadata["activations"])


def _set_attribute(root: nn.Module, dotted: str, value: Any) -> None:
    parent, _, attribute = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attribute, value)


def _untie_where_encodings_differ(model: nn.Module, entries: Mapping[str, dict]) -> None:
    """One parameter under several names whose entries differ (an fp32 embedding and an int8
    output projection) becomes one parameter per encoding, each loaded with its own values."""
    users: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(parameter), []).append(name)
    for names in users.values():
        groups: dict[str, list[str]] = {}
        for name in names:
            entry = entries[name]
            groups.setdefault(json.dumps([entry["stored"], entry["codecs"]]), []).append(name)
        first, *others = groups.values()
        first_modules = {id(model.get_submodule(n.rpartition(".")[0])) for n in first}
        for group in others:
            if {id(model.get_submodule(n.rpartition(".")[0])) for n in group} & first_modules:
                raise ModelFileError(f"{group[0]} and {first[0]} are one module but encoded differently")
            replacement = nn.Parameter(model.get_parameter(group[0]).detach().clone())
            for name in group:
                _set_attribute(model, name, replacement)


def fill_module(model: nn.Module, tensors: Mapping[str, torch.Tensor], entries: Mapping[str, dict],
                runtime_layers: bool = True, structure: Optional[Mapping[str, dict]] = None) -> nn.Module:
    """Load the decoded weights into ``model`` (strict) and, with ``runtime_layers``, replace each
    nn.Linear whose codec has a faster form by it (not one its parent reads by weight:
    nn.MultiheadAttention's out_proj); returns ``model`` in eval mode. ``structure``
    (the file's): the modules structured pruning made smaller, shrunk first to their new sizes."""
    if structure:
        shrink_modules(model, structure)
    def parts(entry: dict) -> dict[str, torch.Tensor]:
        return {part: tensors[_key(entry["stored"], part)] for part in entry["parts"]}

    missing = sorted(set(model.state_dict()) - set(entries))
    if missing:
        raise ModelFileError(f"the file holds no {missing[0]} of the {type(model).__name__} (and {len(missing) - 1} more): "
                          f"another class than the one exported?")
    decoded = {name: decode_chain(parts(e), e["codecs"]) for name, e in entries.items()}
    own = model.state_dict()
    for name, tensor in decoded.items():
        if name in own and tuple(own[name].shape) != tuple(tensor.shape):
            raise ModelFileError(f"{name} is {tuple(tensor.shape)} in the file but {tuple(own[name].shape)} in the "
                              f"{type(model).__name__}: another configuration than the one exported?")
    _untie_where_encodings_differ(model, entries)
    model.load_state_dict(decoded, strict=True)
    if runtime_layers:
        deployed: dict[int, nn.Module] = {}
        read_by_weight = linears_read_by_weight(model)  # stay nn.Linear, with the decoded weight
        for name, linear in list(model.named_modules(remove_duplicate=False)):
            entry = entries.get(f"{name}.weight")
            if not isinstance(linear, nn.Linear) or not entry or not entry["codecs"] or id(linear) in read_by_weight:
                continue
            if id(linear) not in deployed:
                options = {field: tensors[_key(f"{name}.weight", field)] for field in entry["options"]}
                deployed[id(linear)] = runtime_linear(parts(entry), entry["codecs"], linear.bias, options) or linear
            _set_attribute(model, name, deployed[id(linear)])
    return model.eval()


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a one-line error naming it if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(str(path)), metadata
    except Exception as error:
        raise ModelFileError(f"{path}: not a readable safetensors file ({type(error).__name__})") from None


def load_module(model: nn.Module, path: Union[str, os.PathLike], runtime_layers: bool = True) -> nn.Module:
    """``model`` (a plain instance of the exported class) filled from a file of ``export_module``."""
    path = Path(path)
    tensors, metadata = read_file(path)
    if metadata.get("format") != MODULE_FORMAT:
        raise ModelFileError(f"{path}: a safetensors file, but not one written by export_module "
                          f"(for 'nmt-lightning export' files use load_exported)")
    try:
        return fill_module(model, tensors, json.loads(metadata["weights"]), runtime_layers,
                           json.loads(metadata.get("structure", "{}")))
    except (ModelFileError, RuntimeError) as error:
        raise ModelFileError(f"{path}: {str(error).strip().splitlines()[0]}") from None
