"""Writing files so that an interrupted run never leaves a half-written file behind.

Every output is written to a temporary file in the destination directory and moved into
place with ``os.replace`` (atomic on POSIX) only once it is complete. A Ctrl-C or a kill
leaves at worst a ``.tmp-*`` file that no reader looks at.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``destination``; move it there if the block succeeds.

    Use this when a library (sentencepiece, numpy) wants to write to a path itself.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{destination.name}.", dir=destination.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files, and some writers (safetensors) recreate the file 0600 too:
        # give the result the permissions an ordinary open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, destination)
    finally:
        # BaseException too: KeyboardInterrupt must not leave the temporary file around.
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(destination: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file for writing; it replaces ``destination`` only on success."""
    if "w" not in mode:
        raise ValueError(f"atomic_open writes files; mode {mode!r} has no 'w'")
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(destination) as tmp:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
