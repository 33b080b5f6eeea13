"""side_by_side.sequence_kd_data, the sequence-level KD corpus that study.py, distillation.py and
fast_students.py build from a teacher: ``nmt-lightning distill-data`` (tested on its own in
tests/test_distill_data.py) translates the training source with the teacher at beam 4, and the
translations are prepared with the corpus' own BPE model and valid/test splits, once.

The tests' tiny teacher translates most sentences to nothing (prepare would drop them all), so
distill-data's command is recorded and its output stood in for by the references; prepare runs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import import_benchmark


def test_the_teachers_translations_are_prepared_with_the_corpus_bpe_and_reused(
        prepared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    side_by_side = import_benchmark("side_by_side")
    source = tmp_path / "sample" / "train"
    source.parent.mkdir()
    pairs = list(zip(*((prepared_dir / f"train.{side}").read_text(encoding="utf-8").splitlines()[:40]
                       for side in ("en", "cs"))))
    Path(f"{source}.en").write_text("".join(f"{en}\n" for en, _ in pairs), encoding="utf-8")
    data_out, corpus, teacher = tmp_path / "data", tmp_path / "corpus" / "train", tmp_path / "teacher.ckpt"
    commands: list[list[str]] = []
    real_run = subprocess.run

    def run(command: list[str], **options):
        commands.append(command)
        if "distill-data" in command:  # what distill-data writes: the source and its translation
            output = Path(command[command.index("--output") + 1])
            output.parent.mkdir(parents=True, exist_ok=True)
            Path(f"{output}.en").write_text("".join(f"{en}\n" for en, _ in pairs), encoding="utf-8")
            Path(f"{output}.cs").write_text("".join(f"{cs}\n" for _, cs in pairs), encoding="utf-8")
            return subprocess.CompletedProcess(command, 0)
        return real_run(command, **options)

    monkeypatch.setattr(side_by_side.subprocess, "run", run)
    assert side_by_side.sequence_kd_data(data_out, corpus, teacher, prepared_dir, source) == data_out
    distill = next(command for command in commands if "distill-data" in command)
    assert [distill[distill.index(flag) + 1] for flag in ("--checkpoint", "--input", "--output", "--beam")] == [
        str(teacher), str(source), str(corpus), "4"]
    assert (data_out / "train.en").read_text(encoding="utf-8").splitlines() == [en for en, _ in pairs]
    assert (data_out / "spm.model").read_bytes() == (prepared_dir / "spm.model").read_bytes()  # the corpus' BPE
    for split in ("valid", "test"):
        assert (data_out / f"{split}.cs").read_text() == (prepared_dir / f"{split}.cs").read_text()

    commands.clear()  # a second call finds the prepared directory: nothing is translated or prepared again
    side_by_side.sequence_kd_data(data_out, corpus, teacher, prepared_dir, source)
    assert commands == []
