"""Loading a trained model for translation, and averaging the weights of several checkpoints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from nmt_lightning.checkpoint_reading import is_parametrized, model_weights, read_checkpoint
from nmt_lightning.errors import ModelFileError
from nmt_lightning.translator import Translator

if TYPE_CHECKING:  # imported where a Lightning checkpoint is loaded: translating an export never needs it
    from nmt_lightning.module import TranslationModule


def load_for_translation(path: str | os.PathLike, device: str | torch.device) -> Union[TranslationModule, Translator]:
    """What ``translate_lines`` needs, on ``device``: an export file as a ``Translator`` (without
    importing Lightning), a checkpoint as ``load_for_device`` loads it."""
    from nmt_lightning.translation_file import is_export_file, load_translator

    path = Path(path)
    if not (path.is_file() and is_export_file(path)):
        return load_for_device(path, device)
    return load_translator(path, runtime_layers=torch.device(device).type == "cpu").to(device)


def load_for_device(path: str | os.PathLike, device: str | torch.device) -> TranslationModule:
    """``load_translation_module`` moved to ``device``. The int8 and int4 layers of a compressed
    model run FBGEMM kernels, which exist on CPU only; on any other device the model keeps plain
    nn.Linear layers holding the decoded weights (the same integer grid as fp32 values; static
    activation ranges are not applied), so it translates there instead of failing."""
    runtime_layers = torch.device(device).type == "cpu"
    return load_translation_module(path, runtime_layers=runtime_layers).to(device)


def load_translation_module(path: str | os.PathLike, map_location: str = "cpu",
                            quantize: Optional[str] = None, runtime_layers: bool = True) -> TranslationModule:
    """A TranslationModule (eval mode) with its tokenization, from a Lightning checkpoint or a
    file written by ``nmt-lightning export``.

    A checkpoint trained with compression callbacks (or any checkpoint, when ``quantize`` is
    given) is deployed as ``export`` would write it, without writing a file: a QAT-trained model
    translates with its int8 layers. ``quantize="fp32"`` keeps dense fp32 weights instead.
    ``runtime_layers=False`` keeps plain nn.Linear layers holding the decoded weights (a
    QAT-trained model's int8 grid as fp32 values), for conversion to another runtime.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such checkpoint")
    from nmt_lightning.export.plan import compression_manifest
    from nmt_lightning.translation_file import build_module, encode_checkpoint, is_export_file, load_exported

    if is_export_file(path):
        return load_exported(path, runtime_layers)
    checkpoint = read_checkpoint(path, map_location)
    if "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ModelFileError(f"{path}: not a Lightning checkpoint of a translation model")
    if "nmt_lightning_tokenization" not in checkpoint:
        raise ModelFileError(f"{path}: not a translation model checkpoint (no sentencepiece models inside)")
    if quantize is not None or compression_manifest(checkpoint) or is_parametrized(checkpoint["state_dict"]):
        encoded = encode_checkpoint(checkpoint, str(path), quantize)
        return build_module(encoded.tensors, encoded.metadata, runtime_layers)
    from nmt_lightning.module import TranslationModule

    module = TranslationModule.from_hyperparameters(checkpoint["hyper_parameters"])
    # The Transformer's weights only: what a training callback added to the module beside the
    # model (a distillation projection) is not part of the translation model.
    module.model.load_state_dict(model_weights(checkpoint["state_dict"], module.model))
    module.on_load_checkpoint(checkpoint)
    return module.eval()


def _model_identity(checkpoint: dict) -> dict:
    """The hyper-parameters that decide the architecture and vocabulary (what averaging must keep equal)."""
    ignored = {"init_from", "test_output", "val_bleu", "val_bleu_sentences"}
    return {k: v for k, v in dict(checkpoint.get("hyper_parameters", {})).items()
            if not k.startswith("_") and k not in ignored}


def average_checkpoints(paths: Sequence[str | os.PathLike], output: str | os.PathLike) -> Path:
    """Write a checkpoint whose weights are the mean of ``paths`` (the last one supplies the rest).

    Averaging the last few checkpoints of a run smooths out the noise of the final updates
    (Vaswani et al. average the last 5 or 20). Integer and boolean tensors are taken from the
    last file. Checkpoints of different models (hyper-parameters, tensor names or shapes) are
    refused, naming both files.
    """
    if len(paths) < 1:
        raise ValueError("average needs at least one checkpoint")
    sums: dict[str, torch.Tensor] = {}
    first_path, first = None, None
    last: dict = {}
    for path in paths:
        last = read_checkpoint(path)
        if "state_dict" not in last:
            raise ModelFileError(f"{path}: not a Lightning checkpoint")
        state = last["state_dict"]
        if first is None:
            first_path, first = path, last
        else:
            mine, theirs = _model_identity(last), _model_identity(first)
            if mine != theirs:
                differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                raise ModelFileError(f"{path} and {first_path} are different models (hyper-parameters differ: "
                                  + ", ".join(f"{k}={mine.get(k)!r} vs {theirs.get(k)!r}" for k in differing) + ")")
            if state.keys() != sums.keys():
                only = sorted(set(state) ^ set(sums))
                raise ModelFileError(f"{path} and {first_path} hold different tensors (e.g. {only[0]})")
            for name, tensor in state.items():
                if tensor.shape != sums[name].shape:
                    raise ModelFileError(f"{path} and {first_path} differ in the shape of {name}: "
                                      f"{tuple(tensor.shape)} vs {tuple(sums[name].shape)}")
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


def last_checkpoints_by_step(directory: str | os.PathLike, count: int) -> list[Path]:
    """The ``count`` checkpoints of ``directory`` with the highest training steps, oldest first.

    ModelCheckpoint names and keeps files by a metric (the best 3 by BLEU), and ``last.ckpt``
    repeats one of them; so files are ordered by the ``global_step`` stored inside, and of
    several files of one step the first by name is taken.
    """
    if count < 1:
        raise ValueError(f"--last must be >= 1, got {count}")
    by_step: dict[int, Path] = {}
    for path in sorted(Path(directory).glob("*.ckpt")):
        step = read_checkpoint(path).get("global_step")
        if not isinstance(step, int):
            raise ModelFileError(f"{path}: no global_step inside: not a Lightning checkpoint")
        by_step.setdefault(step, path)
    if not by_step:
        raise ModelFileError(f"{directory}: no .ckpt files")
    return [by_step[step] for step in sorted(by_step)[-count:]]
