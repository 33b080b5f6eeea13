"""recipes/benchmarks/convergence.py: the references' distance from their plateau."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import import_benchmark


def write_history(folder: Path, run: str, history: list[tuple[int, float]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{run}.csv").write_text("step,val_bleu\n" + "".join(f"{s},{b}\n" for s, b in history), encoding="utf-8")


def test_the_gain_over_the_last_quarter_decides_the_plateau(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    convergence = import_benchmark("convergence")
    # base: at step 8,000 the last quarter (6,000, 8,000] holds 31.0 and 31.2 (mean 31.1), the
    # quarter before (4,000, 6,000] 30.9 and 31.0 (mean 30.95): gain 0.15 < 0.3, on the plateau.
    write_history(tmp_path, "base", [(1000, 10.0), (2000, 20.0), (3000, 25.0), (4000, 28.0), (5000, 30.9),
                                     (6000, 31.0), (7000, 31.0), (8000, 31.2)])
    # teacher: still rising at step 4,000.
    write_history(tmp_path, "teacher", [(500, 5.0), (1000, 10.0), (1500, 14.0), (2000, 16.0), (2500, 19.0),
                                        (3000, 21.0), (3500, 23.0), (4000, 24.0)])
    convergence.main(["--histories", str(tmp_path), "--figure", str(tmp_path / "curves.png")])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny") or line.startswith("| 6+6")]
    assert rows[0] == "| tiny 3+3 (the base) | 8 | 8,000 | 31.20 | 31.20 | 0.15 | yes |"
    # (2,000, 3,000]: 19.0, 21.0 -> 20.0; (3,000, 4,000]: 23.0, 24.0 -> 23.5; gain 3.5.
    assert rows[1] == "| 6+6 (the teacher) | 8 | 4,000 | 24.00 | 24.00 | 3.50 | no |"
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_a_small_gain_before_step_4000_is_not_a_plateau(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    convergence = import_benchmark("convergence")
    flat = [(step, 20.0) for step in range(250, 3001, 250)]
    write_history(tmp_path, "base", flat)
    write_history(tmp_path, "teacher", flat)
    convergence.main(["--histories", str(tmp_path)])
    assert "| tiny 3+3 (the base) | 12 | 3,000 | 20.00 | 20.00 | 0.00 | no |" in capsys.readouterr().out


def test_a_missing_history_names_the_file(tmp_path: Path) -> None:
    convergence = import_benchmark("convergence")
    with pytest.raises(SystemExit, match="teacher.csv does not exist"):
        write_history(tmp_path, "base", [(1000, 1.0)])
        convergence.main(["--histories", str(tmp_path)])
