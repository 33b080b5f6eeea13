import json
from pathlib import Path

import pytest

from nmt_lightning.cli import main
from nmt_lightning.errors import CorpusError
from nmt_lightning.prepare import prepare
from tests.conftest import prepare_config, write_parallel


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_prepare_writes_text_bpe_and_binary(parallel_files: dict, tmp_path: Path) -> None:
    data = prepare(prepare_config(parallel_files, tmp_path / "out"))
    out = tmp_path / "out"
    for split, pairs in (("train", 400), ("valid", 30), ("test", 40)):
        assert data["text_stats"][split]["pairs"] == pairs
        for lang in ("en", "cs"):
            assert len((out / f"{split}.{lang}").read_text().splitlines()) == pairs
            assert (out / f"{split}.{lang}.bin").is_file() and (out / f"{split}.{lang}.idx").is_file()
    assert (out / "spm.model").is_file()
    assert set(data["stages"]) == {"text", "bpe", "binary"}


def test_rerun_reuses_everything(parallel_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = prepare_config(parallel_files, tmp_path / "out")
    prepare(config)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir() if p.name != "prepare.json"}
    capsys.readouterr()
    prepare(config)
    assert capsys.readouterr().out.count("up to date") == 3
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir() if p.name != "prepare.json"}
    # A changed option redoes only what depends on it.
    prepare(prepare_config(parallel_files, tmp_path / "out", vocab_size=80))
    assert "[text] up to date" in capsys.readouterr().out


def test_too_small_vocabulary_is_a_clear_error(parallel_files: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"vocab_size=40 is too small: the training text has 55 distinct"):
        prepare(prepare_config(parallel_files, tmp_path / "out", vocab_size=40))


def test_drops_empty_and_overlong_training_lines_and_counts_them(tmp_path: Path, parallel_files: dict) -> None:
    train = write_parallel(tmp_path / "dirty", [("a b c", "x y z"), ("", "prázdný"), ("one", "")] +
                           [(" ".join(["w"] * 30), "slovo")] + [("ok then", "dobře tedy")] * 3)
    data = prepare(prepare_config({**parallel_files, "train": train}, tmp_path / "out", max_words=20))
    stats = data["text_stats"]["train"]
    assert stats["read"] == 7 and stats["pairs"] == 4
    assert stats["dropped"] == {"empty line": 2, "longer than 20 words": 1}


def test_no_test_source_in_train(tmp_path: Path, parallel_files: dict) -> None:
    leaked = (tmp_path / "raw" / "test.en").read_text().splitlines()[:5]
    train_pairs = list(zip(tmp_path.joinpath("raw/train.en").read_text().splitlines(),
                           tmp_path.joinpath("raw/train.cs").read_text().splitlines()))
    train = write_parallel(tmp_path / "leaky", train_pairs + [(s, " ".join(["něco"] * len(s.split()))) for s in leaked])
    data = prepare(prepare_config({**parallel_files, "train": train}, tmp_path / "out"))
    assert data["text_stats"]["train"]["dropped"] == {"source also in valid/test": 5}
    assert not set(leaked) & set((tmp_path / "out" / "train.en").read_text().splitlines())


def test_bad_input_keeps_what_was_prepared(tmp_path: Path, parallel_files: dict) -> None:
    out = tmp_path / "out"
    prepare(prepare_config(parallel_files, out))
    before = snapshot(out)
    bad = tmp_path / "bad"
    bad.with_suffix(".en").write_text("a\nb\nc\n")
    bad.with_suffix(".cs").write_bytes(b"a\n\xff\xfe\nc\n")
    with pytest.raises(CorpusError, match=r"bad\.cs:2: invalid UTF-8"):
        prepare(prepare_config({**parallel_files, "train": bad}, out))
    assert snapshot(out) == before
    # The old data is still recognised as complete.
    prepare(prepare_config(parallel_files, out))
    assert json.loads((out / "prepare.json").read_text())["stages"].keys() == {"text", "bpe", "binary"}


def test_interrupted_stage_is_redone(tmp_path: Path, parallel_files: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    import nmt_lightning.prepare as prepare_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_write_binary_stage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(prepare_config(parallel_files, out))
    manifest = json.loads((out / "prepare.json").read_text())
    assert set(manifest["stages"]) == {"text", "bpe"}
    assert not list(out.glob("*.bin")) and not list(out.glob(".tmp-*"))
    monkeypatch.undo()
    prepare(prepare_config(parallel_files, out))
    assert set(json.loads((out / "prepare.json").read_text())["stages"]) == {"text", "bpe", "binary"}


def test_cli_errors_are_one_line(tmp_path: Path, parallel_files: dict, capsys: pytest.CaptureFixture) -> None:
    short = tmp_path / "short"
    short.with_suffix(".en").write_text("a\nb\n")
    short.with_suffix(".cs").write_text("a\n")
    code = main(["prepare", "--train", str(short), "--valid", str(parallel_files["valid"]),
                 "--test", str(parallel_files["test"]), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "line counts differ" in err and "short.en has 2 lines" in err and "short.cs has 1 lines" in err
    assert main(["prepare", "--corpus", "libreoffice", "--train", "x", "--out", str(tmp_path / "o")]) == 2
    assert "either --corpus or --train" in capsys.readouterr().err
    assert main(["prepare", "--corpus", "libreoffice", "--src", "en", "--tgt", "en", "--out", str(tmp_path / "o")]) == 2


def test_separate_vocabularies_and_moses(tmp_path: Path, parallel_files: dict) -> None:
    data = prepare(prepare_config(parallel_files, tmp_path / "out", joint_vocab=False, moses_normalize=True))
    assert data["spm_models"] == {"en": "spm.en.model", "cs": "spm.cs.model"}
    assert data["moses_normalize"] is True
