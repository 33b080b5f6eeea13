"""recipes/benchmarks/encoder_share.py on a tiny converted model (no timing is asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import import_benchmark

pytest.importorskip("ctranslate2", reason="ctranslate2 is an optional extra")


def test_the_cut_search_stops_after_one_token_and_the_table_is_written(
        trained_checkpoint: Path, prepared_dir: Path, tmp_path: Path) -> None:
    """The whole search is the deployed translator's (efficiency.py's throughput), the cut one the
    same cut after one output token."""
    from nmt_lightning.deploy import CTranslate2Model, convert_to_ctranslate2
    from nmt_lightning.evaluation import read_lines

    encoder_share = import_benchmark("encoder_share")
    convert_to_ctranslate2(trained_checkpoint, tmp_path / "ct2")
    model = CTranslate2Model(tmp_path / "ct2", threads=1)
    lines = read_lines(prepared_dir / "test.en")[:40]
    _, cut = encoder_share.search(model, lines, 2, one_token=True)
    _, whole = encoder_share.search(model, lines, 2, one_token=False)
    # what max_output_tokens does is pinned in tests/test_ctranslate2.py
    assert whole == model.translate_lines(lines, beam=2, batch_size=32, progress=False)
    assert cut == model.translate_lines(lines, beam=2, batch_size=32, progress=False, max_output_tokens=1) != whole
    encoder_share.main(["--out", str(tmp_path / "out"), "--data-dir", str(prepared_dir), "--model",
                        f"tiny={tmp_path / 'ct2'}", "--sentences", "40", "--threads", "1", "--beam", "2", "--rounds", "1"])
    table = (tmp_path / "out" / "encoder_share.md").read_text()
    assert table.startswith("| model | sentences/s, whole search |") and "| tiny |" in table


def test_a_directory_that_is_not_a_ctranslate2_model_and_a_missing_corpus_are_refused(
        trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from nmt_lightning.deploy import convert_to_ctranslate2

    encoder_share = import_benchmark("encoder_share")
    with pytest.raises(SystemExit):
        encoder_share.main(["--out", str(tmp_path), "--model", f"x={tmp_path}"])
    assert f"--model x={tmp_path}: give NAME=DIRECTORY of a CTranslate2 model" in capsys.readouterr().err
    convert_to_ctranslate2(trained_checkpoint, tmp_path / "ct2")
    with pytest.raises(SystemExit):
        encoder_share.main(["--out", str(tmp_path), "--data-dir", str(tmp_path / "none"), "--model", f"x={tmp_path / 'ct2'}"])
    assert "not a prepared corpus (no test.en" in capsys.readouterr().err
