"""Exporting a trained model to one safetensors file: fp32, or int8 weights with their scales.

The file holds only tensors and string metadata (safetensors never unpickles): the weights,
the sentencepiece models (as uint8 tensors), the model's hyper-parameters and, for int8, the
scales. Tied weights are stored once.

int8 (symmetric, as Q8BERT): every 2-D weight of an nn.Linear or nn.Embedding is stored as
``q = clamp(round(W / scale), -M, M)`` in int8 with ``scale = max|W| / M`` per tensor (or per
row, when the QAT callback used per-channel scales); biases and LayerNorm stay fp32.

- a checkpoint trained with ``callbacks.QuantizationAwareTraining`` exports these int8
  weights by default: they are exactly the weights its forward pass used;
- ``--quantize int8`` on an fp32 checkpoint is post-training quantization of the weights
  (Q8BERT's "DQ" baseline: no training, activations quantized dynamically at run time).

A QAT export also stores each quantized layer's activation range (``{layer}.input_absmax``,
the EMA of max|x| it trained with). At load time the int8 weights become
``nmt_lightning.int8.Int8Linear`` modules (FBGEMM int8 matrix products on CPU) on the very
same integer grid; with a stored range the input is quantized on the training grid too
(static, as Q8BERT deploys), without one (post-training) per batch at run time (dynamic).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from nmt_lightning.atomic import atomic_path
from nmt_lightning.errors import CorpusError
from nmt_lightning.int8 import Int8Weight, quantize_weight, use_int8_linears
from nmt_lightning.module import QAT_BUFFERS, QAT_INPUT_RANGE, TranslationModule, fake_quantized_modules, transformer_weights
from nmt_lightning.tokenization import Tokenization

FORMAT = "nmt-lightning-export/1"


@dataclass
class ExportReport:
    output: Path
    quantization: str
    bytes_on_disk: int
    weight_bytes_fp32: int  # the same weights in fp32 (what a weights-only fp32 export holds)
    activations: str = "fp32"  # int8: "static" (QAT's trained ranges stored) or "dynamic" (measured per batch)


def is_export_file(path: str | os.PathLike) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def qat_settings(checkpoint: dict) -> Optional[dict]:
    """The QuantizationAwareTraining settings saved in the checkpoint, if it was trained with it."""
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith("QuantizationAwareTraining") and isinstance(state, dict) and "bits" in state:
            return state
    if any(key.endswith(QAT_BUFFERS) for key in checkpoint.get("state_dict", {})):
        return {"bits": 8, "per_channel": False}
    return None


def _quantizable(model: nn.Module) -> set[str]:
    """Qualified names of the 2-D weights of nn.Linear / nn.Embedding leaves."""
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Embedding))}


def activation_ranges(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Transformer layer name -> the input range (EMA of max|x|, float32 scalar) QAT learnt for it;
    layers that never saw a training batch (range still 0) are left out and run dynamic."""
    suffix = f".{QAT_INPUT_RANGE}"
    return {name[len("model."): -len(suffix)]: value.detach().float().reshape(())
            for name, value in state_dict.items()
            if name.startswith("model.") and name.endswith(suffix) and float(value) > 0}


def export_checkpoint(checkpoint_path: str | os.PathLike, output: str | os.PathLike,
                      quantize: Optional[str] = None) -> ExportReport:
    """Write ``output`` (safetensors) from a Lightning checkpoint of a TranslationModule."""
    if quantize not in (None, "int8", "fp32"):
        raise ValueError(f"quantize must be 'int8' or 'fp32', got {quantize!r}")
    path = Path(checkpoint_path)
    if not path.is_file():
        raise CorpusError(f"{path}: no such checkpoint")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if "nmt_lightning_tokenization" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise CorpusError(f"{path}: not a checkpoint of a translation model")
    qat = qat_settings(checkpoint)
    mode = quantize or ("int8" if qat else "fp32")
    bits, per_channel = (qat["bits"], qat["per_channel"]) if qat else (8, False)

    hyper_parameters = checkpoint["hyper_parameters"]
    state = transformer_weights(checkpoint["state_dict"])
    if mode == "fp32":
        quantizable: set[str] = set()
    elif qat:  # exactly the modules the callback quantized (its include/exclude)
        quantizable = {f"{name[len('model.'):]}.weight" for name in fake_quantized_modules(checkpoint["state_dict"])
                       if name.startswith("model.")}
    else:  # post-training: every nn.Linear / nn.Embedding weight of the architecture
        quantizable = _quantizable(TranslationModule.from_hyperparameters(hyper_parameters).model)
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[int, str] = {}
    fp32_bytes = 0
    for name, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:  # a tied weight: store once, remember the alias
            tied[name] = seen[pointer]
            continue
        seen[pointer] = name
        fp32_bytes += tensor.numel() * 4
        if name in quantizable:
            values, scale = quantize_weight(tensor.float(), bits, per_channel)
            tensors[name] = values
            tensors[f"{name}.scale"] = scale
        else:
            tensors[name] = tensor.float().contiguous()
    ranges = activation_ranges(checkpoint["state_dict"]) if mode == "int8" and qat else {}
    tensors.update({f"{name}.{QAT_INPUT_RANGE}": value for name, value in ranges.items()})
    tokenization = checkpoint["nmt_lightning_tokenization"]
    tensors["tokenization.src_model"] = torch.frombuffer(bytearray(tokenization["src_model"]), dtype=torch.uint8)
    if tokenization["tgt_model"] != tokenization["src_model"]:  # a joint vocabulary is stored once
        tensors["tokenization.tgt_model"] = torch.frombuffer(bytearray(tokenization["tgt_model"]), dtype=torch.uint8)
    metadata = {
        "format": FORMAT,
        "quantization": mode,
        "bits": str(bits),
        "per_channel": json.dumps(per_channel),
        "activations": ("static" if ranges else "dynamic") if mode == "int8" else "fp32",
        "hyper_parameters": json.dumps({k: v for k, v in dict(hyper_parameters).items() if not k.startswith("_")}),
        "tokenization": json.dumps({k: tokenization[k] for k in ("src_lang", "tgt_lang", "moses_normalize")}),
        "tied": json.dumps(tied),
        "source_checkpoint": str(path),
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return ExportReport(output, mode, output.stat().st_size, fp32_bytes, metadata["activations"])


def load_exported(path: str | os.PathLike) -> TranslationModule:
    """A TranslationModule (eval mode, CPU) from an exported file; Int8Linear layers when int8
    (static activation ranges where the file has them, dynamic elsewhere)."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise CorpusError(f"{path}: a safetensors file, but not one written by 'nmt-lightning export'")
    tensors = load_file(str(path))
    module = TranslationModule.from_hyperparameters(json.loads(metadata["hyper_parameters"]))
    token_info = json.loads(metadata["tokenization"])
    src_model = tensors.pop("tokenization.src_model").numpy().tobytes()
    tgt_model = tensors.pop("tokenization.tgt_model").numpy().tobytes() if "tokenization.tgt_model" in tensors else src_model
    module.tokenization = Tokenization(src_model=src_model, tgt_model=tgt_model, **token_info)
    scales = {name[: -len(".scale")]: tensors.pop(name) for name in list(tensors) if name.endswith(".scale")}
    suffix = f".{QAT_INPUT_RANGE}"
    ranges = {name[: -len(suffix)]: float(tensors.pop(name)) for name in list(tensors) if name.endswith(suffix)}
    # fp32 (dequantized) values for every parameter: embeddings look rows up from them.
    state = {name: (tensor.float() * scales[name]) if name in scales else tensor for name, tensor in tensors.items()}
    for alias, original in json.loads(metadata["tied"]).items():
        state[alias] = state[original]
    module.model.load_state_dict(state, strict=True)
    if metadata["quantization"] == "int8":
        tied = json.loads(metadata["tied"])
        bits = int(metadata.get("bits", 8))
        int8_weights = {}
        for name, linear in module.model.named_modules():
            source = tied.get(f"{name}.weight", f"{name}.weight")
            if isinstance(linear, nn.Linear) and source in scales:
                int8_weights[name] = Int8Weight(tensors[source], scales[source], ranges.get(name), bits)
        use_int8_linears(module.model, int8_weights)
    return module.eval()
