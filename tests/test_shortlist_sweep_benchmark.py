"""recipes/benchmarks/shortlist_sweep.py on a tiny model: the maps of each setting, the gains as
ratios to the same model without a map in the same round, the BLEU change (no timing is asserted)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sacrebleu

from tests.conftest import import_benchmark

pytest.importorskip("ctranslate2", reason="ctranslate2 is an optional extra")


@pytest.mark.parametrize("text, expected", [("10:100", (10, 100)), ("1:0", (1, 0))])
def test_a_setting_is_best_and_frequent(text: str, expected: tuple[int, int]) -> None:
    assert import_benchmark("shortlist_sweep").parse_setting(text) == expected


@pytest.mark.parametrize("text", ["10", "a:100", "0:100", "5:-1", "5:1.5"])
def test_an_impossible_setting_is_refused_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match=f"--setting {text!r}"):
        import_benchmark("shortlist_sweep").parse_setting(text)


def test_the_sweep_measures_each_map_against_no_map_and_caches(trained_checkpoint: Path, prepared_dir: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The maps and translations are real; the timing is replaced by designed rounds in which the
    median of the per-round ratios differs from the ratio of the medians, so the gains pin how they
    are computed (a row against the same model without a map, round by round)."""
    sweep = import_benchmark("shortlist_sweep")
    efficiency = import_benchmark("efficiency")
    # sentences/s and a one-sentence latency (ms) per round, for the rows without a map and with the 1/0 map
    designed = {"tiny, CTranslate2 int8": ([10, 20, 40], [10, 20, 40]),
                "tiny, CTranslate2 int8 + shortlist 1/0": ([15, 22, 100], [20, 5, 30]),
                "tiny, CTranslate2 int8 + shortlist 2/5": ([9, 30, 30], [10, 20, 40])}
    measured: dict[str, int] = {}

    def measure(row) -> dict:
        index = measured[row.name] = measured.get(row.name, -1) + 1  # this row's round
        throughput, latency = designed[row.name]
        return {"sentences_per_second": throughput[index], "milliseconds": [latency[index]], "peak_rss_bytes": 1}

    monkeypatch.setattr(sweep, "speed_rounds", lambda args, rows: efficiency.speed_rounds(args, rows, measure))
    out = tmp_path / "out"
    arguments = ["--out", str(out), "--data-dir", str(prepared_dir), "--model", f"tiny={trained_checkpoint}",
                 "--setting", "1:0", "--setting", "2:5", "--beam", "2", "--threads", "1", "--rounds", "3"]
    sweep.main(arguments)
    table = json.loads((out / "shortlist_sweep.json").read_text())
    assert [(e["model"], e["shortlist"]) for e in table] == [("tiny", "none"), ("tiny", "1/0"), ("tiny", "2/5")]
    # medians of the per-round ratios: throughput 1.5, 1.1, 2.5 -> 1.5 (the ratio of medians: 1.1); latency
    # 0.5, 4, 4/3 -> 4/3 (ratio of medians: 1.0). The 2/5 map: 0.9, 1.5, 0.75 -> 0.9; latency 1, 1, 1.
    expected = {"none": (1.0, 1.0), "1/0": (1.5, 4 / 3), "2/5": (0.9, 1.0)}
    for entry in table:
        assert (entry["throughput_gain"], entry["latency_gain"]) == pytest.approx(expected[entry["shortlist"]])

    # The maps: BEST candidates per source piece at most, FREQUENT pieces always (the line with no source).
    for name, best, frequent in (("best1_frequent0", 1, 0), ("best2_frequent5", 2, 5)):
        lines = (out / "maps" / f"{name}.txt").read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("\t") and len(lines[0].split()) == frequent
        assert len(lines) > 1 and all(1 <= len(line.split("\t")[1].split()) <= best for line in lines[1:])
        deployed = out / "deployed" / f"tiny.{sweep.file_slug(sweep.engine_name((best, frequent)))}"
        assert (deployed / "vmap.txt").read_text(encoding="utf-8") == (out / "maps" / f"{name}.txt").read_text(
            encoding="utf-8")
    assert not (out / "deployed" / "tiny.CTranslate2_int8" / "vmap.txt").exists()  # the row without a map

    # The BLEU change: sacrebleu on the two rows' translations of the test split.
    references = (prepared_dir / "test.cs").read_text(encoding="utf-8").splitlines()

    def bleu(engine: str) -> float:
        path = out / "translations" / f"{sweep.file_slug(f'tiny, {engine}')}.cs"
        return sacrebleu.corpus_bleu(path.read_text(encoding="utf-8").splitlines(), [references]).score

    for entry in table[1:]:
        change = bleu(f"{sweep.ENGINE} + shortlist {entry['shortlist']}") - bleu(sweep.ENGINE)
        assert entry["bleu_change"] == pytest.approx(change, abs=1e-9) and 0 <= entry["p_value"] <= 1
        assert entry["meets_target"] == (entry["throughput_gain"] >= sweep.TARGET_GAIN and change >= -sweep.TARGET_LOSS)
    assert table[0]["bleu_change"] == 0 and table[0]["p_value"] is None and not table[0]["meets_target"]
    assert (out / "shortlist_sweep.png").stat().st_size > 0

    text = (out / "shortlist_sweep.md").read_text()
    rounds = (out / "speed_rounds.json").read_text()
    sweep.main(arguments)  # everything cached: nothing measured again, the same table
    assert (out / "speed_rounds.json").read_text() == rounds and measured == {name: 2 for name in designed}
    assert (out / "shortlist_sweep.md").read_text().split("Measured")[0] == text.split("Measured")[0]

    # The same name for another checkpoint under this --out is refused: its rows are cached by name.
    other = tmp_path / "other.ckpt"
    shutil.copy(trained_checkpoint, other)
    with pytest.raises(SystemExit):
        sweep.main(["--out", str(out), "--data-dir", str(prepared_dir), "--model", f"tiny={other}"])


def test_a_setting_given_twice_a_missing_model_and_no_rounds_are_refused(prepared_dir: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    sweep = import_benchmark("shortlist_sweep")
    with pytest.raises(SystemExit):
        sweep.main(["--out", str(tmp_path), "--data-dir", str(prepared_dir), "--model", f"x={tmp_path / 'no.ckpt'}"])
    assert "--model x=" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["--out", str(tmp_path), "--model", f"x={tmp_path}", "--setting", "5:10", "--setting", "5:10"])
    assert "given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["--out", str(tmp_path), "--model", f"x={tmp_path}", "--rounds", "0"])
    assert "--rounds must be >= 1" in capsys.readouterr().err
