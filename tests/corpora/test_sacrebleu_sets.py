import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import synthetic_pairs, write_parallel


def run_prepare(args: list[str], sacrebleu_dir: Path) -> subprocess.CompletedProcess:
    # SACREBLEU is read when sacrebleu is imported, so the command runs in a fresh process.
    # The proxy variables make any download attempt fail at once instead of waiting on the network.
    env = dict(os.environ, SACREBLEU=str(sacrebleu_dir), http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    return subprocess.run([sys.executable, "-m", "nmt_lightning.cli", "prepare", *args], env=env, capture_output=True, text=True)


def populate_cache(cache: Path, name: str, pairs: list[tuple[str, str]]) -> None:
    """What sacrebleu leaves in its cache after a download: DATASET/DATASET.en-cs.{src,ref,...}."""
    directory = cache / name
    directory.mkdir(parents=True)
    fields = {"src": [s for s, _ in pairs], "ref": [t for _, t in pairs], "docid": ["d"] * len(pairs),
              "genre": ["news"] * len(pairs), "origlang": ["en"] * len(pairs)}
    for field, lines in fields.items():
        (directory / f"{name}.en-cs.{field}").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_wmt_sets_from_a_populated_cache(tmp_path: Path) -> None:
    pairs = synthetic_pairs(360)
    train = write_parallel(tmp_path / "train", pairs[:300])
    populate_cache(tmp_path / "cache", "wmt18", pairs[300:320])
    populate_cache(tmp_path / "cache", "wmt19", pairs[320:])
    result = run_prepare(["--train", str(train), "--valid", "sacrebleu:wmt18", "--test", "sacrebleu:wmt19",
                          "--vocab-size", "64", "--out", str(tmp_path / "out")], tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "test.en").read_text().splitlines() == [s for s, _ in pairs[320:]]
    # wmt19 has no cs-en set: the reverse direction reads en-cs with its sides swapped.
    valid = write_parallel(tmp_path / "valid", pairs[300:320])
    result = run_prepare(["--src", "cs", "--tgt", "en", "--train", str(train), "--valid", str(valid),
                          "--test", "sacrebleu:wmt19", "--vocab-size", "64", "--out", str(tmp_path / "rev")], tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "rev" / "test.cs").read_text().splitlines() == [t for _, t in pairs[320:]]


def test_offline_without_cache_is_a_one_line_error(tmp_path: Path) -> None:
    train = write_parallel(tmp_path / "train", synthetic_pairs(50))
    result = run_prepare(["--train", str(train), "--valid", str(train), "--test", "sacrebleu:wmt19",
                          "--out", str(tmp_path / "out")], tmp_path / "empty-cache")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "wmt19 en-cs is not in the sacrebleu cache" in lines[0]


def test_unknown_test_set(tmp_path: Path) -> None:
    train = write_parallel(tmp_path / "train", synthetic_pairs(50))
    result = run_prepare(["--train", str(train), "--valid", str(train), "--test", "sacrebleu:nosuchset",
                          "--out", str(tmp_path / "out")], tmp_path / "cache")
    assert result.returncode == 2 and "unknown sacrebleu test set 'nosuchset'" in result.stderr
