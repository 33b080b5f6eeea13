"""Reading checkpoint files safely, and the plain model weights inside them.

A checkpoint is untrusted input: ``torch.load`` without ``weights_only=True`` unpickles it,
and unpickling runs whatever code the file names. Every checkpoint this package reads goes
through ``read_checkpoint``, which loads tensors and plain data only (what a Lightning
checkpoint holds) and refuses anything else with a one-line error naming the file, before
any of it runs.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from compression_contract.checkpoints import CheckpointError
from compression_contract.checkpoints import read_checkpoint as contract_read_checkpoint
from compression_contract.names import PARAMETRIZED, logical_name
from nmt_lightning.errors import ModelFileError

__all__ = ["PARAMETRIZED", "is_parametrized", "logical_name", "model_weights", "read_checkpoint"]


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint's contents (tensors and plain data only), or a ModelFileError naming the file
    (the contract's safe reading: compression_contract.checkpoints)."""
    try:
        return contract_read_checkpoint(path, map_location=map_location)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such checkpoint") from None
    except CheckpointError as error:
        raise ModelFileError(str(error)) from None


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
