"""recipes/benchmarks/encoder_share.py on a tiny converted model (no timing is asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import import_benchmark

pytest.importorskip("ctranslate2", reason="ctranslate2 is an optional extra")


def test_the_cut_search_stops_after_one_token_and_the_table_is_written(
        trained_checkpoint: Path, prepared_dir: Path, tmp_path: Path) -> None:
    """The batches are the throughput's (sorted by length, 32 each), the whole search translates
    as the deployed translator does, the cut one returns one token per sentence."""
    from nmt_lightning.bpe import EOS_ID
    from nmt_lightning.deploy import CTranslate2Model, convert_to_ctranslate2
    from nmt_lightning.evaluation import read_lines

    encoder_share = import_benchmark("encoder_share")
    convert_to_ctranslate2(trained_checkpoint, tmp_path / "ct2")
    model = CTranslate2Model(tmp_path / "ct2", threads=1)
    lines = read_lines(prepared_dir / "test.en")[:40]
    batches = encoder_share.batches_of_pieces(model, lines)
    assert [len(batch) for batch in batches] == [32, 8]
    lengths = [len(pieces) for batch in batches for pieces in batch]
    assert lengths == sorted(lengths)

    _, cut = encoder_share.search(model, batches, 2, one_token=True)
    _, whole = encoder_share.search(model, batches, 2, one_token=False)
    assert all(len(h) <= 1 for h in cut) and any(len(h) > 1 for h in whole)
    # the whole search is the translator's: its hypotheses, cut at eos and at each sentence's own
    # cap as translate_lines does, are translate_lines' translations
    target = model.tokenization._processor("tgt")
    ids = [[target.piece_to_id(piece) for piece in h] for h in whole]
    ids = [h[: h.index(EOS_ID)] if EOS_ID in h else h for h in ids]
    ids = [h[: model._cap(len(pieces) + 1)] for h, pieces in zip(ids, (p for batch in batches for p in batch))]
    by_length = sorted(range(len(lines)), key=lambda i: len(model.tokenization.encode_source([lines[i]])[0]))
    expected = model.translate_lines(lines, beam=2, batch_size=32, progress=False)
    assert model.tokenization.decode(ids) == [expected[i] for i in by_length]
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
