import gzip
from pathlib import Path

import pytest

from nmt_lightning.corpora import find_side, read_parallel
from nmt_lightning.errors import CorpusError


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_reads_plain_and_gzip(tmp_path: Path) -> None:
    src = write(tmp_path / "a.en", b"Hello\r\nWorld\n")
    tgt = tmp_path / "a.cs.gz"
    with gzip.open(tgt, "wb") as handle:
        handle.write("Ahoj\nSvět\n".encode())
    assert find_side(tmp_path / "a", "cs") == tgt
    assert list(read_parallel(src, tgt)) == [(1, "Hello", "Ahoj"), (2, "World", "Svět")]


def test_line_count_mismatch_names_both_counts(tmp_path: Path) -> None:
    src = write(tmp_path / "a.en", b"1\n2\n3\n")
    tgt = write(tmp_path / "a.cs", b"1\n2\n3\n4\n5\n")
    with pytest.raises(CorpusError, match=r"a\.en has 3 lines, .*a\.cs has 5 lines"):
        list(read_parallel(src, tgt))


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    src = write(tmp_path / "a.en", b"ok\nok\n")
    tgt = write(tmp_path / "a.cs", "ok\n".encode() + "špatně\n".encode("latin2"))
    with pytest.raises(CorpusError, match=r"a\.cs:2: invalid UTF-8"):
        list(read_parallel(src, tgt))


def test_empty_file(tmp_path: Path) -> None:
    src = write(tmp_path / "a.en", b"")
    tgt = write(tmp_path / "a.cs", b"x\n")
    with pytest.raises(CorpusError, match=r"a\.en: file is empty"):
        list(read_parallel(src, tgt))
    with pytest.raises(CorpusError, match="file is empty"):
        list(read_parallel(src, write(tmp_path / "b.cs", b"")))


def test_missing_side(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"no file .*x\.de"):
        find_side(tmp_path / "x", "de")
