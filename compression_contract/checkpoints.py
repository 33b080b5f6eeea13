"""Reading a checkpoint, which is untrusted input, safely and with one-line errors.

``torch.load(weights_only=True)`` loads tensors and plain data only (paths given as
hyper-parameters too), so unpickling runs no code. A file that ``torch.save`` did not write, a
truncated one, or one holding Python objects is refused in one line naming it: a
``FileNotFoundError`` for a missing file, else a ``CheckpointError`` (a ``ValueError``).
"""

from __future__ import annotations

import os
import pathlib
import pickle
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["CheckpointError", "checkpoint_problem", "describe_load_error", "read_checkpoint"]

TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip format; the legacy format is a pickle
SAFE_GLOBALS = [pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or may not be: its message is one line naming the file."""


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why ``path`` cannot be a file ``torch.save`` wrote (None if its first bytes fit one)."""
    with open(path, "rb") as handle:
        start = handle.read(4)
    if not start:
        return "it is empty"
    if not any(start.startswith(magic) for magic in TORCH_SAVE_MAGIC):
        return f"it does not start as a file torch.save writes (first bytes {start!r})"
    return None


# pragma: no mutate start  (wording of messages only: docs/mutation_testing.md)
def describe_load_error(error: BaseException) -> str:
    """The reason a load failed, on one line (unsafe contents said as such)."""
    text = str(error).strip()
    if isinstance(error, pickle.UnpicklingError) and ("Unsupported global" in text or "GLOBAL" in text):
        detail = next((line.strip() for line in text.splitlines() if "Unsupported global" in line or "GLOBAL" in line), "")
        return f"it holds Python objects that unpickling would run, not only tensors and plain data ({detail})"
    if isinstance(error, pickle.UnpicklingError):  # not a pickle torch.save wrote at all
        detail = next((line.strip() for line in text.splitlines() if "Unsupported operand" in line
                       or "invalid load key" in line), "")
        if detail:
            return f"torch.load cannot read it ({detail})"
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {line}" if line else type(error).__name__
# pragma: no mutate end


def read_checkpoint(path: str | os.PathLike, what: Optional[str] = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The contents of the checkpoint ``path`` (a dict); ``what`` prefixes every error (e.g.
    ``"LotteryTicketPruning: masks_from"``, giving "LotteryTicketPruning: masks_from <path>: not a
    checkpoint: ...", "...: refused to load: it holds Python objects ...")."""
    path = Path(path)
    named = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{named}: no such file")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{named}: not a checkpoint: {problem}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            contents = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        reason = describe_load_error(error)
        if reason.startswith("it holds Python objects"):
            raise CheckpointError(f"{named}: refused to load: {reason}") from None
        if reason.startswith("torch.load cannot read it"):
            raise CheckpointError(f"{named}: not a checkpoint: {reason}") from None
        raise CheckpointError(f"{named}: not a readable checkpoint ({reason})") from None
    if not isinstance(contents, dict):
        raise CheckpointError(f"{named}: not a checkpoint (it holds a {type(contents).__name__})")
    return contents
