"""The exported file: encoding a checkpoint into tensors + metadata, writing and reading it."""

from __future__ import annotations

import json
import lzma
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from nmt_lightning.atomic import atomic_path
from nmt_lightning.checkpoint_file import model_weights, read_checkpoint
from nmt_lightning.errors import CorpusError
from nmt_lightning.export.codecs import codec, decode_chain, encode_chain, encoding_spec, runtime_linear
from nmt_lightning.export.plan import export_plan
from nmt_lightning.module import TranslationModule
from nmt_lightning.tokenization import Tokenization

FORMAT = "nmt-lightning-export/3"
FORMAT_2 = "nmt-lightning-export/2"  # the sentencepiece models stored raw; still read
FORMAT_1 = "nmt-lightning-export/1"  # 0.1.0: int8 or fp32 only; still read


@dataclass
class ExportReport:
    output: Path
    quantization: str  # the quantizing codecs of the file ("int8", "int4", "int4+int8"), else "fp32"
    bytes_on_disk: int
    weight_bytes_fp32: int  # the same weights in fp32 (what a weights-only fp32 export holds)
    activations: str = "fp32"  # int8/int4 layers: "static" (QAT's trained ranges stored) or "dynamic" (per batch)


@dataclass
class EncodedModel:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    weight_bytes_fp32: int


def _key(stored: str, part: str) -> str:
    return f"{stored}.{part}" if part else stored


def _state_tensor(state: Mapping[str, torch.Tensor], key: str, name: str, origin: str) -> torch.Tensor:
    if key not in state:
        raise CorpusError(f"{origin}: the compression manifest names {key} for {name}, but the checkpoint has no "
                          f"such tensor")
    return state[key].detach()


def encode_checkpoint(checkpoint: Mapping[str, Any], origin: str, quantize: Optional[str] = None) -> EncodedModel:
    """Encode the Transformer of a TranslationModule checkpoint; ``origin`` names it in errors."""
    if "nmt_lightning_tokenization" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise CorpusError(f"{origin}: not a checkpoint of a translation model")
    hyper_parameters = {k: v for k, v in dict(checkpoint["hyper_parameters"]).items() if not k.startswith("_")}
    model = TranslationModule.from_hyperparameters(hyper_parameters).model
    state = checkpoint["state_dict"]
    weights = model_weights(state, model)
    missing = sorted(set(model.state_dict()) - set(weights))
    if missing:
        raise CorpusError(f"{origin}: the checkpoint lacks {len(missing)} weights of its model, e.g. {missing[0]}")
    try:
        plan = export_plan(checkpoint, model, quantize)
    except KeyError as error:
        raise CorpusError(f"{origin}: a compression step lacks the field {error}") from None
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
            for field in codec(step["codec"]).runtime_options:
                if field in step:
                    if step[field] not in state:
                        raise CorpusError(f"{origin}: the compression manifest names {step[field]} as the {field} of "
                                          f"{name}, but the checkpoint has no such tensor")
                    tensors[_key(name, field)] = state[step[field]].detach().float().contiguous()
                    options.append(field)
        stored = stored_as[identity]
        entries[name] = {"stored": stored, "parts": parts_of[stored], "codecs": encodings, "options": options}
    tokenization = checkpoint["nmt_lightning_tokenization"]
    tensors["tokenization.src_model"] = torch.frombuffer(bytearray(tokenization["src_model"]), dtype=torch.uint8)
    if tokenization["tgt_model"] != tokenization["src_model"]:  # a joint vocabulary is stored once
        tensors["tokenization.tgt_model"] = torch.frombuffer(bytearray(tokenization["tgt_model"]), dtype=torch.uint8)
    grids = sorted({s["codec"] for e in entries.values() for s in e["codecs"] if codec(s["codec"]).quantizes})
    quantized = any(codec(s["codec"]).quantizes_inputs for e in entries.values() for s in e["codecs"])
    static = any(float(tensors[_key(n, "activation_range")]) > 0 for n, e in entries.items() if "activation_range" in e["options"])
    metadata = {
        "format": FORMAT,
        "quantization": "+".join(grids) or "fp32",
        "activations": ("static" if static else "dynamic") if quantized else "fp32",
        "hyper_parameters": json.dumps(hyper_parameters),
        "tokenization": json.dumps({k: tokenization[k] for k in ("src_lang", "tgt_lang", "moses_normalize")}),
        "weights": json.dumps(entries),
        "source_checkpoint": origin,
    }
    return EncodedModel(tensors, metadata, fp32_bytes)


def _compress_sentencepiece(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` as the file stores them: the sentencepiece models xz-compressed (a 369 KB model
    of 8,000 pieces takes 128 KB: its vocabulary is text, and it is a fifth of an iPQ file).
    Only the file needs this; a module built in memory takes the raw models."""
    stored = dict(tensors)
    for side in ("src", "tgt"):
        raw = stored.pop(f"tokenization.{side}_model", None)
        if raw is not None:
            stored[f"tokenization.{side}_model.xz"] = torch.frombuffer(
                bytearray(lzma.compress(raw.numpy().tobytes())), dtype=torch.uint8)
    return stored


def _pop_sentencepiece(tensors: dict[str, torch.Tensor], side: str) -> Optional[bytes]:
    """The ``side`` ("src"/"tgt") sentencepiece model, compressed (a file of this format) or raw
    (formats 1 and 2, and ``encode_checkpoint``'s tensors in memory); None where there is none."""
    compressed = tensors.pop(f"tokenization.{side}_model.xz", None)
    if compressed is not None:
        try:
            return lzma.decompress(compressed.numpy().tobytes())
        except lzma.LZMAError as error:
            raise CorpusError(f"the exported file's sentencepiece model (tokenization.{side}_model.xz) is damaged: "
                              f"{error}") from None
    raw = tensors.pop(f"tokenization.{side}_model", None)
    return None if raw is None else raw.numpy().tobytes()


def export_checkpoint(checkpoint_path: str | os.PathLike, output: str | os.PathLike,
                      quantize: Optional[str] = None) -> ExportReport:
    """Write ``output`` (safetensors) from a Lightning checkpoint of a TranslationModule.
    ``quantize``: None (as trained), "fp32", "int8", "int4" or "ipq" (post-training)."""
    path = Path(checkpoint_path)
    checkpoint = read_checkpoint(path)
    if quantize == "ipq":
        from nmt_lightning.export.post_training import post_training_ipq

        checkpoint, quantize = post_training_ipq(checkpoint, str(path)), None
    encoded = encode_checkpoint(checkpoint, str(path), quantize)
    output = Path(output)
    with atomic_path(output) as tmp:
        save_file(_compress_sentencepiece(encoded.tensors), str(tmp), metadata=encoded.metadata)
    return ExportReport(output, encoded.metadata["quantization"], output.stat().st_size, encoded.weight_bytes_fp32,
                        encoded.metadata["activations"])


def _set_attribute(root: nn.Module, dotted: str, value: Any) -> None:
    parent, _, attribute = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attribute, value)


def _untie_where_encodings_differ(model: nn.Module, entries: Mapping[str, dict]) -> None:
    """One parameter under several names whose files entries differ (an fp32 embedding and an
    int8 output projection) becomes one parameter per encoding, each loaded with its own values."""
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
                raise CorpusError(f"{group[0]} and {first[0]} are one module but encoded differently")
            replacement = nn.Parameter(model.get_parameter(group[0]).detach().clone())
            for name in group:
                _set_attribute(model, name, replacement)


def build_module(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                 runtime_layers: bool = True) -> TranslationModule:
    """A TranslationModule (eval mode, CPU) from encoded tensors and their metadata.

    Every weight is decoded to fp32 (an int8 grid becomes its dequantized values). With
    ``runtime_layers`` each nn.Linear whose codec has a faster form is then replaced by it
    (``Int8Linear``); without, the model stays plain nn.Linear layers holding the decoded
    weights (what another runtime, such as CTranslate2, converts)."""
    tensors = dict(tensors)
    module = TranslationModule.from_hyperparameters(json.loads(metadata["hyper_parameters"]))
    token_info = json.loads(metadata["tokenization"])
    src_model = _pop_sentencepiece(tensors, "src")
    if src_model is None:
        raise CorpusError("the exported file has no sentencepiece model (tokenization.src_model)")
    tgt_model = _pop_sentencepiece(tensors, "tgt") or src_model
    module.tokenization = Tokenization(src_model=src_model, tgt_model=tgt_model, **token_info)
    entries = json.loads(metadata["weights"])

    def parts(entry: dict) -> dict[str, torch.Tensor]:
        return {part: tensors[_key(entry["stored"], part)] for part in entry["parts"]}

    model = module.model
    _untie_where_encodings_differ(model, entries)
    model.load_state_dict({name: decode_chain(parts(e), e["codecs"]) for name, e in entries.items()}, strict=True)
    if not runtime_layers:
        return module.eval()
    deployed: dict[int, nn.Module] = {}
    for name, linear in list(model.named_modules(remove_duplicate=False)):
        entry = entries.get(f"{name}.weight")
        if not isinstance(linear, nn.Linear) or not entry or not entry["codecs"]:
            continue
        if id(linear) not in deployed:
            options = {field: tensors[_key(f"{name}.weight", field)] for field in entry["options"]}
            deployed[id(linear)] = runtime_linear(parts(entry), entry["codecs"], linear.bias, options) or linear
        _set_attribute(model, name, deployed[id(linear)])
    return module.eval()


def is_export_file(path: str | os.PathLike) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _from_format_1(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """Entries of a 0.1.0 file (``W``, ``W.scale``, ``<layer>.input_absmax``, a tied map) in this format."""
    bits = int(metadata.get("bits", 8))
    entries = {}
    for name in list(tensors):
        if name.startswith("tokenization.") or name.endswith((".scale", ".input_absmax")):
            continue
        scale = tensors.get(f"{name}.scale")
        codecs = [] if scale is None else [{"codec": "int8", "bits": bits, "per_channel": scale.dim() > 0}]
        entries[name] = {"stored": name, "parts": [""] if scale is None else ["", "scale"], "codecs": codecs, "options": []}
    for alias, original in json.loads(metadata.get("tied", "{}")).items():
        entries[alias] = dict(entries[original], options=[])
    for name, entry in entries.items():
        layer_range = f"{name.rpartition('.')[0]}.input_absmax"
        if entry["codecs"] and layer_range in tensors:
            tensors[f"{name}.activation_range"] = tensors[layer_range]
            entry["options"] = ["activation_range"]
    return {**metadata, "format": FORMAT, "weights": json.dumps(entries)}


def load_exported(path: str | os.PathLike, runtime_layers: bool = True) -> TranslationModule:
    """A TranslationModule (eval mode, CPU) from a file written by ``nmt-lightning export``
    (``runtime_layers``: see ``build_module``)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except Exception as error:
        raise CorpusError(f"{path}: not a readable safetensors file ({type(error).__name__})") from None
    if metadata.get("format") == FORMAT_1:
        metadata = _from_format_1(tensors, metadata)
    if metadata.get("format") not in (FORMAT, FORMAT_2):
        raise CorpusError(f"{path}: a safetensors file, but not one written by 'nmt-lightning export'")
    try:
        return build_module(tensors, metadata, runtime_layers)
    except CorpusError as error:
        raise CorpusError(f"{path}: {error}") from None
