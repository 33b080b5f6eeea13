"""recipes/benchmarks/efficiency.py runs end to end on a tiny model (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nmt_lightning.loading import load_translation_module
from nmt_lightning.translate import translate_lines
from tests.conftest import import_benchmark

pytest.importorskip("ctranslate2", reason="ctranslate2 is an optional extra")


def test_the_benchmark_writes_its_table_plot_and_caches(trained_checkpoint: Path, prepared_dir: Path,
                                                        tmp_path: Path) -> None:
    efficiency = import_benchmark("efficiency")
    arguments = ["--out", str(tmp_path / "out"), "--data-dir", str(prepared_dir), "--model", f"tiny={trained_checkpoint}",
                 "--engines", "ours fp32 + shortlist", "CTranslate2 float32", "CTranslate2 int8 + shortlist", "--beam", "2",
                 "--threads", "1", "--sentences", "4", "--latency-sentences", "3", "--rounds", "1"]
    efficiency.main(arguments)
    table = json.loads((tmp_path / "out" / "efficiency.json").read_text())
    assert [entry["name"] for entry in table] == ["tiny, ours fp32 + shortlist", "tiny, CTranslate2 float32",
                                                  "tiny, CTranslate2 int8 + shortlist"]
    assert all(entry["peak_rss_bytes"] > 0 and entry["latency_p90_ms"] >= entry["latency_median_ms"] > 0
               for entry in table)
    text = (tmp_path / "out" / "efficiency.md").read_text()
    assert "| tiny | CTranslate2 float32 |" in text and "1.00x" in text
    assert (tmp_path / "out" / "efficiency.png").stat().st_size > 0
    assert (tmp_path / "out" / "deployed" / "tiny.CTranslate2_int8___shortlist" / "vmap.txt").is_file()
    # exactness: both sides decoded the whole test split greedily; the count is recounted from their files
    greedy = tmp_path / "out" / "greedy"
    ours = (greedy / "tiny__ours_fp32.cs").read_text(encoding="utf-8").splitlines()
    converted = (greedy / "tiny__CTranslate2_float32.cs").read_text(encoding="utf-8").splitlines()
    test_lines = (prepared_dir / "test.en").read_text(encoding="utf-8").splitlines()
    assert len(ours) == len(converted) == len(test_lines)
    exported = load_translation_module(tmp_path / "out" / "deployed" / "tiny.trained.safetensors")
    # greedy, whatever --beam
    assert ours == translate_lines(exported, test_lines, beam=1, batch_size=efficiency.THROUGHPUT_BATCH,
                                  progress=False)
    found = json.loads((greedy / "tiny.json").read_text())
    assert found == {"identical": sum(a == b for a, b in zip(ours, converted)), "sentences": len(test_lines)}
    assert f"tiny {found['identical']}/{len(test_lines)}." in text
    rounds = (tmp_path / "out" / "speed_rounds.json").read_text()
    efficiency.main(arguments)  # everything cached: the same table again, nothing measured again
    assert (tmp_path / "out" / "efficiency.md").read_text().split("Measured")[0] == text.split("Measured")[0]
    assert (tmp_path / "out" / "speed_rounds.json").read_text() == rounds


def test_a_missing_model_is_refused(tmp_path: Path) -> None:
    efficiency = import_benchmark("efficiency")
    with pytest.raises(SystemExit):
        efficiency.main(["--out", str(tmp_path), "--model", f"x={tmp_path / 'missing.ckpt'}"])


def test_a_worker_reports_its_own_peak_memory_not_its_parents(trained_checkpoint: Path, prepared_dir: Path,
                                                               tmp_path: Path) -> None:
    """Linux keeps getrusage's ru_maxrss across exec: a worker started by a process that once held
    1.5 GB would report at least that. The worker's own peak (a tiny model and torch) is far less."""
    from nmt_lightning.translation_file import export_checkpoint

    efficiency = import_benchmark("efficiency")
    exported = tmp_path / "tiny.safetensors"
    export_checkpoint(trained_checkpoint, exported, None)
    held = b"\x01" * 1_500_000_000  # resident: every page written
    row = efficiency.Row("tiny", "ours fp32", exported)
    report = efficiency.run_worker(row, "throughput", prepared_dir / "test.en", tmp_path / "out.cs", 1, 1)
    del held
    assert 0 < report["peak_rss_bytes"] < 1_000_000_000


def test_the_shortlist_settings_reach_the_map_and_another_setting_needs_another_out(
        trained_checkpoint: Path, prepared_dir: Path, tmp_path: Path) -> None:
    """--shortlist-best 1 --shortlist-frequent 0: every line of the map holds one candidate and no
    piece is always allowed (the default would allow 100). The same --out with another setting is
    refused: its shortlist rows were measured with the first map."""
    efficiency = import_benchmark("efficiency")
    arguments = ["--out", str(tmp_path / "out"), "--data-dir", str(prepared_dir), "--model", f"tiny={trained_checkpoint}",
                 "--engines", "CTranslate2 int8 + shortlist", "--beam", "1", "--quality-only"]
    efficiency.main(arguments + ["--shortlist-best", "1", "--shortlist-frequent", "0"])
    lines = (tmp_path / "out" / "deployed" / "vmap.txt").read_text(encoding="utf-8").splitlines()
    always, rules = lines[0], lines[1:]
    assert always == "\t" and rules and all(len(line.split("\t")[1].split()) == 1 for line in rules)
    with pytest.raises(SystemExit, match="built with --shortlist-best 1 --shortlist-frequent 0"):
        efficiency.main(arguments + ["--shortlist-best", "2", "--shortlist-frequent", "0"])
