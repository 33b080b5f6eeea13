from pathlib import Path

import numpy as np
import pytest

from nmt_lightning.binarized import TokenArray, TokenArrayWriter, write_token_array


@pytest.mark.parametrize("vocab_size, dtype", [(100, np.uint16), (65536, np.uint16), (70000, np.int32)])
def test_round_trip(tmp_path: Path, vocab_size: int, dtype: type) -> None:
    sentences = [[1, 2, 3], [], [vocab_size - 1], list(range(4, 40))]
    assert write_token_array(tmp_path / "x", sentences, vocab_size, chunk=2) == 4
    array = TokenArray(tmp_path / "x", vocab_size)
    assert array.tokens.dtype == dtype
    assert len(array) == 4
    assert [a.tolist() for a in array] == sentences
    assert array.lengths().tolist() == [3, 0, 1, 36]


def test_out_of_range_id_is_refused_and_nothing_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="out of range"):
        with TokenArrayWriter(tmp_path / "x", 10) as writer:
            writer.add([[1, 2], [10]])
    assert list(tmp_path.iterdir()) == []


def test_truncated_index_is_detected(tmp_path: Path) -> None:
    write_token_array(tmp_path / "x", [[1, 2], [3]], 10)
    (tmp_path / "x.bin").write_bytes(b"\x01\x00")
    with pytest.raises(ValueError, match="does not match"):
        TokenArray(tmp_path / "x", 10)
