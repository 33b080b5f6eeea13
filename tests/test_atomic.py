from pathlib import Path

import pytest

from nmt_lightning.atomic import atomic_open


def test_success_replaces_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_open(target) as handle:
        handle.write("new")
        assert target.read_text() == "old"  # nothing visible until the block ends
    assert target.read_text() == "new"
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interruption_keeps_old_file_and_leaves_no_temporary(tmp_path: Path, error: type) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(error):
        with atomic_open(target) as handle:
            handle.write("half")
            raise error()
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_result_has_ordinary_permissions_even_if_the_writer_recreates_the_file(tmp_path: Path) -> None:
    import os

    from nmt_lightning.atomic import atomic_path

    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "out.bin") as tmp:
            tmp.unlink()  # as safetensors does: a new file, created 0600
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
    finally:
        os.umask(umask)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o644
