"""The compression study's driver (recipes/benchmarks/study.py) on the tests' tiny corpus.

A smoke run of one table (2 steps a run, a small model): it trains the references and the QAT
table's runs, scores them, runs the paired tests and writes the page; run again, it trains
nothing and writes the same page from its caches."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import import_benchmark


@pytest.fixture(scope="module")
def smoke(prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    study = import_benchmark("study")
    out = tmp_path_factory.mktemp("study")
    study.main(["--out", str(out), "--data-dir", str(prepared_dir), "--smoke", "2", "--smoke-seeds", "1", "--jobs", "1",
                "--only", "qat", "--test-sentences", "8", "--page", str(out / "results.md")])
    return out


def test_the_smoke_study_writes_its_page(smoke: Path) -> None:
    page = (smoke / "results.md").read_text(encoding="utf-8")
    assert "**Smoke run**" in page and "## The compute plan" in page
    # The QAT table: trained and scored; the tables not asked for: planned, not trained.
    qat = page.split("## Q8BERT", 1)[1].split("\n## ", 1)[0]
    assert "| QAT int8 | 1 of 1 |" in qat and "| fp32 fine-tuning (control) | 1 of 1 |" in qat
    assert "not trained yet" in page.split("## Lottery tickets", 1)[1]
    assert "| Q8BERT: QAT int8 within 1% of fp32 (here: 0.3 BLEU) | QAT int8 | fp32 fine-tuning (control) |" in qat
    assert (smoke / "tables" / "qat.csv").is_file()
    # Every row starts from the base and trains the control's steps.
    for run in ("fp32_s1", "qat8_s1"):
        settings = (smoke / "runs" / run / "run.json").read_text(encoding="utf-8")
        assert "base/runs/converged/checkpoints/last.ckpt" in settings and '"steps": 2' in settings


def test_the_page_is_rewritten_from_the_caches(smoke: Path, prepared_dir: Path) -> None:
    study = import_benchmark("study")
    before = (smoke / "results.md").read_text(encoding="utf-8")
    runs = sorted(path.name for path in (smoke / "runs").iterdir())
    study.main(["--out", str(smoke), "--data-dir", str(prepared_dir), "--smoke", "2", "--smoke-seeds", "1",
                "--only", "page", "--test-sentences", "8", "--page", str(smoke / "again.md")])
    assert (smoke / "again.md").read_text(encoding="utf-8") == before.replace("(results.md", "(again.md")
    assert sorted(path.name for path in (smoke / "runs").iterdir()) == runs  # nothing trained again
