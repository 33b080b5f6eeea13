"""Loading a trained model for translation, and averaging the weights of several checkpoints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from nmt_lightning.errors import CorpusError
from nmt_lightning.module import QAT_BUFFERS, TranslationModule


def load_translation_module(path: str | os.PathLike, map_location: str = "cpu") -> TranslationModule:
    """A TranslationModule (eval mode) with its tokenization, from a Lightning checkpoint or a
    file written by ``nmt-lightning export`` (fp32 or int8)."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: no such checkpoint")
    from nmt_lightning.export import is_export_file, load_exported

    if is_export_file(path):
        return load_exported(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # a truncated or foreign file: say which, in one line
        raise CorpusError(f"{path}: not a readable checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise CorpusError(f"{path}: not a Lightning checkpoint of a translation model")
    if "nmt_lightning_tokenization" not in checkpoint:
        raise CorpusError(f"{path}: not a translation model checkpoint (no sentencepiece models inside)")
    if any(name.endswith(QAT_BUFFERS) for name in checkpoint["state_dict"]):
        raise CorpusError(
            f"{path}: trained with QuantizationAwareTraining; export it to the int8 model first "
            f"(nmt-lightning export --checkpoint {path} --output model.int8.safetensors)"
        )
    module = TranslationModule.from_hyperparameters(checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)
    return module.eval()


def average_checkpoints(paths: Sequence[str | os.PathLike], output: str | os.PathLike) -> Path:
    """Write a checkpoint whose weights are the mean of ``paths`` (the last one supplies the rest).

    Averaging the last few checkpoints of a run smooths out the noise of the final updates
    (Vaswani et al. average the last 5 or 20). Integer buffers are taken from the last file.
    """
    if len(paths) < 1:
        raise ValueError("average needs at least one checkpoint")
    sums: dict[str, torch.Tensor] = {}
    last: dict = {}
    for path in paths:
        if not Path(path).is_file():
            raise CorpusError(f"{path}: no such checkpoint")
        last = torch.load(path, map_location="cpu", weights_only=False)
        state = last["state_dict"]
        if sums and state.keys() != sums.keys():
            raise CorpusError(f"{path}: its weights do not match the first checkpoint's (different model?)")
        for name, tensor in state.items():
            if tensor.is_floating_point():
                sums[name] = sums.get(name, 0) + tensor.double()
            else:
                sums[name] = tensor
    last["state_dict"] = {
        name: (value / len(paths)).to(last["state_dict"][name].dtype) if value.is_floating_point() else value
        for name, value in sums.items()
    }
    last.pop("optimizer_states", None)  # averaged weights do not match any optimiser state
    last["averaged_from"] = [str(p) for p in paths]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    from nmt_lightning.atomic import atomic_path

    with atomic_path(output) as tmp:
        torch.save(last, tmp)
    return output
