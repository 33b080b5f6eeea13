"""Reading checkpoint files safely, and the plain model weights inside them.

A checkpoint is untrusted input: ``torch.load`` without ``weights_only=True`` unpickles it,
and unpickling runs whatever code the file names. Every checkpoint this package reads goes
through ``read_checkpoint``, which loads tensors and plain data only (what a Lightning
checkpoint holds) and refuses anything else with a one-line error naming the file, before
any of it runs.
"""

from __future__ import annotations

import os
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmt_lightning.errors import CorpusError

# Plain data that a checkpoint may legitimately hold beyond torch's default allow-list:
# paths given as hyper-parameters (they are rebuilt from strings, nothing runs).
SAFE_GLOBALS = [pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]

PARAMETRIZED = ".parametrizations."  # torch.nn.utils.parametrize's state_dict layout


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint's contents (tensors and plain data only), or a CorpusError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: no such checkpoint")
    with open(path, "rb") as handle:
        start = handle.read(4)
    if not start.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip format, or its legacy pickle
        raise CorpusError(f"{path}: not a checkpoint: it does not start as a file torch.save writes "
                          f"(first bytes {start!r})")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        unsafe = next((line.strip() for line in text.splitlines() if "Unsupported global" in line or "GLOBAL" in line), "")
        if unsafe:
            raise CorpusError(f"{path}: refused to load: it holds Python objects that unpickling would run, not only "
                              f"tensors and plain data ({unsafe})") from None
        # Not a pickle torch.save wrote at all (random bytes, a text file): say so, not "Python objects".
        detail = next((line.strip() for line in text.splitlines() if "Unsupported operand" in line
                       or "invalid load key" in line), text.strip().splitlines()[0] if text.strip() else "")
        raise CorpusError(f"{path}: not a checkpoint: torch.load cannot read it ({detail})") from None
    except Exception as error:  # a truncated or foreign file: say which, in one line
        raise CorpusError(f"{path}: not a readable checkpoint ({type(error).__name__}: "
                          f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})") from None
    if not isinstance(checkpoint, dict):
        raise CorpusError(f"{path}: not a checkpoint (a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


def logical_name(key: str) -> str:
    """``a.parametrizations.weight.original`` -> ``a.weight``; other keys unchanged."""
    if PARAMETRIZED in key and key.endswith(".original"):
        head, _, tail = key.partition(PARAMETRIZED)
        return f"{head}.{tail[: -len('.original')]}"
    return key


def model_weights(state_dict: dict[str, torch.Tensor], model: nn.Module, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The tensors of ``model``'s own state_dict (names without ``prefix``), taken from a
    checkpoint's state_dict: trainable tensors under a weight-transform chain are read from
    their ``.original``; what compression callbacks added (masks, ranges, codebooks) is left out."""
    wanted = set(model.state_dict())
    weights = {}
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = logical_name(key[len(prefix):])
        if name in wanted:
            weights[name] = tensor
    return weights


def is_parametrized(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether a state_dict was saved with weight transforms (compression callbacks) in place."""
    return any(PARAMETRIZED in key for key in state_dict)
