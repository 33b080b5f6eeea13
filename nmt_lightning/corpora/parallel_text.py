"""Reading line-aligned parallel files (``PREFIX.en`` / ``PREFIX.cs``, plain or gzip).

Reading is streaming (one pair at a time) so a corpus of CzEng size never sits in memory,
and strict: every problem is reported with the file and the 1-based line number.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import BinaryIO, Iterator

from nmt_lightning.errors import CorpusError


def find_side(prefix: str | os.PathLike, lang: str) -> Path:
    """Return ``PREFIX.lang`` or ``PREFIX.lang.gz``, whichever exists."""
    for candidate in (Path(f"{prefix}.{lang}"), Path(f"{prefix}.{lang}.gz")):
        if candidate.is_file():
            return candidate
    raise CorpusError(f"no file {prefix}.{lang} (or {prefix}.{lang}.gz) for language '{lang}'")


def open_text(path: str | os.PathLike) -> BinaryIO:
    """Open a plain or gzip-compressed file as bytes (decoding is done per line, strictly)."""
    path = Path(path)
    with open(path, "rb") as probe:
        is_gzip = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if is_gzip else open(path, "rb")


def _decode(raw: bytes, path: Path, line_number: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CorpusError(
            f"{path}:{line_number}: invalid UTF-8 at byte {error.start} of the line "
            f"({raw[max(0, error.start - 10):error.end + 10]!r}); convert the file with iconv"
        ) from None
    return text.rstrip("\r\n")


def _count_remaining(handle: BinaryIO) -> int:
    return sum(1 for _ in handle)


def read_parallel(source: str | os.PathLike, target: str | os.PathLike) -> Iterator[tuple[int, str, str]]:
    """Yield ``(line_number, source_line, target_line)`` with newlines stripped.

    Raises CorpusError for an empty file, a line that is not UTF-8, and files whose line
    counts differ (both counts are given). Lines are not otherwise changed: empty lines are
    yielded so the caller can count what it drops.
    """
    source, target = Path(source), Path(target)
    for path in (source, target):
        if not path.is_file():
            raise CorpusError(f"{path}: no such file")
    with open_text(source) as src_handle, open_text(target) as tgt_handle:
        line_number = 0
        while True:
            src_raw, tgt_raw = src_handle.readline(), tgt_handle.readline()
            if not src_raw and not tgt_raw:
                break
            line_number += 1
            if not src_raw or not tgt_raw:
                shorter, longer, longer_handle = (
                    (source, target, tgt_handle) if not src_raw else (target, source, src_handle)
                )
                longer_count = line_number + _count_remaining(longer_handle)
                if line_number == 1:
                    raise CorpusError(f"{shorter}: file is empty (while {longer} has {longer_count} lines)")
                raise CorpusError(
                    f"line counts differ: {shorter} has {line_number - 1} lines, "
                    f"{longer} has {longer_count} lines"
                )
            yield line_number, _decode(src_raw, source, line_number), _decode(tgt_raw, target, line_number)
        if line_number == 0:
            raise CorpusError(f"{source}: file is empty (and so is {target})")


def read_side(path: str | os.PathLike) -> list[str]:
    """The lines of one side of a corpus (plain or .gz), newlines stripped; CorpusError naming
    the file and line for bytes that are not UTF-8, and for an empty file."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    with open_text(path) as handle:
        lines = [_decode(raw, path, number) for number, raw in enumerate(handle, 1)]
    if not lines:
        raise CorpusError(f"{path}: file is empty")
    return lines
