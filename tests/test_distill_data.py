"""nmt-lightning distill-data: the teacher's translations as a corpus, resumable and atomic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nmt_lightning.loading import load_translation_module
from nmt_lightning.cli import main
from nmt_lightning.distill_data import STATE_SUFFIX, distill_corpus
from nmt_lightning.errors import CorpusError
from nmt_lightning.prepare import prepare
from nmt_lightning.translate import translate_lines
from tests.conftest import prepare_config, write_parallel


@pytest.fixture(scope="module")
def source_prefix(prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """25 source lines (5 chunks of 5)."""
    root = tmp_path_factory.mktemp("distill_input")
    lines = (prepared_dir / "valid.en").read_text(encoding="utf-8").splitlines()[:25]
    (root / "corpus.en").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return root / "corpus"


class Interrupt(Exception):
    pass


def teacher(checkpoint: Path, fail_on_call: int = 0):
    module = load_translation_module(checkpoint)
    calls = []

    def translate(lines: list[str]) -> list[str]:
        calls.append(len(lines))
        if len(calls) == fail_on_call:
            raise Interrupt  # as a Ctrl-C in the middle of the third chunk would
        return translate_lines(module, lines, beam=2, batch_size=4, progress=False)

    return translate, calls


def test_an_interrupted_run_resumes_to_the_same_file(trained_checkpoint: Path, source_prefix: Path,
                                                     tmp_path: Path) -> None:
    translate, _ = teacher(trained_checkpoint)
    distill_corpus(translate, trained_checkpoint, str(source_prefix), str(tmp_path / "straight" / "train"), "en", "cs",
                   beam=2, batch_size=4, chunk_lines=5, progress=False)

    interrupted, _ = teacher(trained_checkpoint, fail_on_call=3)
    output = tmp_path / "resumed" / "train"
    with pytest.raises(Interrupt):
        distill_corpus(interrupted, trained_checkpoint, str(source_prefix), str(output), "en", "cs",
                       beam=2, batch_size=4, chunk_lines=5, progress=False)
    assert not Path(f"{output}.cs").exists() and not Path(f"{output}.en").exists()  # nothing final yet
    assert len(Path(f"{output}.cs.partial").read_text(encoding="utf-8").splitlines()) == 10
    resumed, calls = teacher(trained_checkpoint)
    distill_corpus(resumed, trained_checkpoint, str(source_prefix), str(output), "en", "cs",
                   beam=2, batch_size=4, chunk_lines=5, progress=False)
    assert calls == [5, 5, 5]  # only the chunks not done before
    straight = tmp_path / "straight" / "train"
    assert Path(f"{output}.cs").read_bytes() == Path(f"{straight}.cs").read_bytes()
    assert Path(f"{output}.en").read_bytes() == Path(f"{source_prefix}.en").read_bytes()
    assert not Path(f"{output}.cs.partial").exists() and not Path(f"{output}.cs{STATE_SUFFIX}").exists()


def test_a_resume_with_other_settings_starts_over(trained_checkpoint: Path, source_prefix: Path, tmp_path: Path) -> None:
    interrupted, _ = teacher(trained_checkpoint, fail_on_call=2)
    with pytest.raises(Interrupt):
        distill_corpus(interrupted, trained_checkpoint, str(source_prefix), str(tmp_path / "out"), "en", "cs",
                       beam=2, batch_size=4, chunk_lines=5, progress=False)
    again, calls = teacher(trained_checkpoint)
    distill_corpus(again, trained_checkpoint, str(source_prefix), str(tmp_path / "out"), "en", "cs",
                   beam=3, batch_size=4, chunk_lines=5, progress=False)
    assert calls == [5] * 5
    assert len((tmp_path / "out.cs").read_text(encoding="utf-8").splitlines()) == 25


def test_the_command_writes_the_teachers_beam_search_translations(
        trained_checkpoint: Path, source_prefix: Path, tmp_path: Path, capsys) -> None:
    assert main(["distill-data", "--checkpoint", str(trained_checkpoint), "--input", str(source_prefix),
                 "--output", str(tmp_path / "kd" / "train"), "--beam", "2", "--chunk-lines", "10"]) == 0
    err = capsys.readouterr().err
    assert "wrote" in err
    hypotheses = (tmp_path / "kd" / "train.cs").read_text(encoding="utf-8").splitlines()
    module = load_translation_module(trained_checkpoint)
    lines = (Path(f"{source_prefix}.en")).read_text(encoding="utf-8").splitlines()
    assert hypotheses == [" ".join(t.split()) for t in translate_lines(module, lines, beam=2, batch_size=64, progress=False)]
    assert "translations are empty" in err or all(hypotheses)


def test_prepare_bpe_from_keeps_the_teachers_sentencepiece_models(prepared_dir: Path, tmp_path: Path) -> None:
    """So the token ids of a distilled corpus mean the same words as the teacher's."""
    config = prepare_config({"train": prepared_dir / "train", "valid": prepared_dir / "valid",
                             "test": prepared_dir / "test"}, tmp_path / "kd_data", bpe_from=str(prepared_dir))
    manifest = prepare(config)
    assert manifest["vocab_size"] == json.loads((prepared_dir / "prepare.json").read_text())["vocab_size"]
    for name in set(manifest["spm_models"].values()):
        assert (tmp_path / "kd_data" / name).read_bytes() == (prepared_dir / name).read_bytes()


@pytest.mark.parametrize(("case", "message"), [
    ("empty line", r"corpus.en:2: empty line"),
    ("not utf-8", r"corpus.en:1: invalid UTF-8"),
    ("no file", r"no file .*missing.en"),
    ("same file", "would overwrite the input"),
])
def test_bad_input_is_named(trained_checkpoint: Path, tmp_path: Path, case: str, message: str) -> None:
    (tmp_path / "corpus.en").write_bytes(b"\xff\xfe bad\n" if case == "not utf-8" else b"one\n\nthree\n")
    prefix = tmp_path / ("missing" if case == "no file" else "corpus")
    output = prefix if case == "same file" else tmp_path / "out"
    translate, _ = teacher(trained_checkpoint)
    with pytest.raises((CorpusError, ValueError), match=message):
        distill_corpus(translate, trained_checkpoint, str(prefix), str(output), "en", "cs", 1, 4, progress=False)


def test_bpe_from_a_directory_that_is_not_prepared(tmp_path: Path, prepared_dir: Path) -> None:
    pairs = [("a b", "c d")] * 3
    files = {split: write_parallel(tmp_path / split, pairs) for split in ("train", "valid", "test")}
    with pytest.raises(CorpusError, match=r"--bpe-from .*: not a prepared data directory"):
        prepare(prepare_config(files, tmp_path / "out", bpe_from=str(tmp_path)))
    with pytest.raises(CorpusError, match=r"its sentencepiece models are for \['cs', 'en'\], this corpus is en-de"):
        prepare(prepare_config(files, tmp_path / "out", bpe_from=str(prepared_dir), tgt="de"))
