"""The exported file: encoding a checkpoint into tensors + metadata, writing and reading it."""

from __future__ import annotations

from dataclasses import dataclass
import json
import lzma
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Union

from safetensors.torch import save_file
import torch
from torch import nn

from nmt_lightning.atomic import atomic_path
from nmt_lightning.checkpoint_reading import read_checkpoint
from nmt_lightning.errors import ModelFileError
from nmt_lightning.export.module_file import encode_module_checkpoint, fill_module, read_file
from nmt_lightning.export.post_training import post_training_ipq
from nmt_lightning.model import Transformer, config_from_hyperparameters
from nmt_lightning.tokenization import Tokenization
from nmt_lightning.translator import Translator

if TYPE_CHECKING:  # loading for translation only (load_translator) never imports Lightning
    from nmt_lightning.module import TranslationModule

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


def encode_checkpoint(checkpoint: Mapping[str, Any], origin: str, quantize: Optional[str] = None) -> EncodedModel:
    """Encode the Transformer of a TranslationModule checkpoint; ``origin`` names it in errors."""
    if "nmt_lightning_tokenization" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ModelFileError(f"{origin}: not a checkpoint of a translation model")
    hyper_parameters = {k: v for k, v in dict(checkpoint["hyper_parameters"]).items() if not k.startswith("_")}
    model = Transformer(config_from_hyperparameters(hyper_parameters))
    encoded = encode_module_checkpoint(checkpoint, model, origin, quantize, prefix="model.")
    tensors = dict(encoded.tensors)
    tokenization = checkpoint["nmt_lightning_tokenization"]
    tensors["tokenization.src_model"] = torch.frombuffer(bytearray(tokenization["src_model"]), dtype=torch.uint8)
    if tokenization["tgt_model"] != tokenization["src_model"]:  # a joint vocabulary is stored once
        tensors["tokenization.tgt_model"] = torch.frombuffer(bytearray(tokenization["tgt_model"]), dtype=torch.uint8)
    metadata = {
        "format": FORMAT,
        "quantization": encoded.quantization(),
        "activations": encoded.activations(),
        "hyper_parameters": json.dumps(hyper_parameters),
        "tokenization": json.dumps({k: tokenization[k] for k in ("src_lang", "tgt_lang", "moses_normalize")}),
        "weights": json.dumps(encoded.entries),
        "source_checkpoint": origin,
        "structure": json.dumps(encoded.structure),
    }
    return EncodedModel(tensors, metadata, encoded.weight_bytes_fp32)


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
            raise ModelFileError(f"the exported file's sentencepiece model (tokenization.{side}_model.xz) is damaged: "
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
        if "hyper_parameters" not in checkpoint:
            raise ModelFileError(f"{path}: not a checkpoint of a translation model")
        architecture = Transformer(config_from_hyperparameters(checkpoint["hyper_parameters"]))
        checkpoint, quantize = post_training_ipq(checkpoint, architecture, str(path)), None
    encoded = encode_checkpoint(checkpoint, str(path), quantize)
    output = Path(output)
    with atomic_path(output) as tmp:
        save_file(_compress_sentencepiece(encoded.tensors), str(tmp), metadata=encoded.metadata)
    return ExportReport(output, encoded.metadata["quantization"], output.stat().st_size, encoded.weight_bytes_fp32,
                        encoded.metadata["activations"])


def build_module(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                 runtime_layers: bool = True) -> TranslationModule:
    """A TranslationModule (eval mode, CPU) from encoded tensors and their metadata.

    Every weight is decoded to fp32 (an int8 grid becomes its dequantized values). With
    ``runtime_layers`` each nn.Linear whose codec has a faster form is then replaced by it
    (``Int8Linear``); without, the model stays plain nn.Linear layers holding the decoded
    weights (what another runtime, such as CTranslate2, converts)."""
    from nmt_lightning.module import TranslationModule

    module = TranslationModule.from_hyperparameters(json.loads(metadata["hyper_parameters"]))
    return _fill(module, tensors, metadata, runtime_layers)


def _fill(module: Union[TranslationModule, Translator], tensors: Mapping[str, torch.Tensor],
          metadata: Mapping[str, str], runtime_layers: bool) -> Union[TranslationModule, Translator]:
    """``module`` (its Transformer untrained) given the weights and tokenization of an export, in eval mode."""
    tensors = dict(tensors)
    token_info = json.loads(metadata["tokenization"])
    src_model = _pop_sentencepiece(tensors, "src")
    if src_model is None:
        raise ModelFileError("the exported file has no sentencepiece model (tokenization.src_model)")
    tgt_model = _pop_sentencepiece(tensors, "tgt") or src_model
    module.tokenization = Tokenization(src_model=src_model, tgt_model=tgt_model, **token_info)
    fill_module(module.model, tensors, json.loads(metadata["weights"]), runtime_layers,
                json.loads(metadata.get("structure", "{}")))
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


def _read_export(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata in this format) of a file written by ``nmt-lightning export``."""
    tensors, metadata = read_file(path)
    if metadata.get("format") == FORMAT_1:
        metadata = _from_format_1(tensors, metadata)
    if metadata.get("format") not in (FORMAT, FORMAT_2):
        raise ModelFileError(f"{path}: a safetensors file, but not one written by 'nmt-lightning export'")
    return tensors, metadata


def load_exported(path: str | os.PathLike, runtime_layers: bool = True) -> TranslationModule:
    """A TranslationModule (eval mode, CPU) from a file written by ``nmt-lightning export``
    (``runtime_layers``: see ``build_module``)."""
    from nmt_lightning.module import TranslationModule

    return _load(path, TranslationModule.from_hyperparameters, runtime_layers)


def load_translator(path: str | os.PathLike, runtime_layers: bool = True) -> Translator:
    """``load_exported`` for translation only: a Translator (eval mode, CPU), Lightning not imported."""
    return _load(path, Translator.from_hyperparameters, runtime_layers)


def _load(path: str | os.PathLike, untrained: Callable[[dict], Any], runtime_layers: bool) -> Any:
    """``untrained(hyper-parameters)`` of the file at ``path``, filled by ``_fill``; errors name the file."""
    path = Path(path)
    tensors, metadata = _read_export(path)
    try:
        return _fill(untrained(json.loads(metadata["hyper_parameters"])), tensors, metadata, runtime_layers)
    except ModelFileError as error:
        raise ModelFileError(f"{path}: {error}") from None
