import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nmt_lightning.bpe import BOS_ID, EOS_ID, PAD_ID
from nmt_lightning.data import TranslationDataModule

SCRIPTS = Path(__file__).parent.parent / "scripts"


def test_batch_layout(prepared_dir: Path) -> None:
    dm = TranslationDataModule(str(prepared_dir), max_tokens=256)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    source, decoder_input, target = batch["source"], batch["decoder_input"], batch["target"]
    assert source.shape[0] * source.shape[1] <= 256 and target.shape == decoder_input.shape
    for row in range(source.shape[0]):
        s_len, t_len = batch["source_lengths"][row], batch["target_lengths"][row]
        assert source[row, s_len - 1] == EOS_ID and (source[row, s_len:] == PAD_ID).all()
        assert decoder_input[row, 0] == BOS_ID and target[row, t_len - 1] == EOS_ID
        assert torch.equal(decoder_input[row, 1:t_len], target[row, : t_len - 1])
    # The ids decode back to the sentence in the text file.
    index = int(batch["indices"][0])
    line = (prepared_dir / "train.en").read_text().splitlines()[index]
    assert dm.tokenizer("en").decode(source[0, : batch["source_lengths"][0] - 1].tolist()) == line


def test_both_directions_from_one_directory(prepared_dir: Path) -> None:
    forward = TranslationDataModule(str(prepared_dir), "en", "cs", max_tokens=256)
    backward = TranslationDataModule(str(prepared_dir), "cs", "en", max_tokens=256)
    a, b = forward.dataset("test")[[0]], backward.dataset("test")[[0]]
    assert torch.equal(a["source"][0, :-1], b["target"][0, :-1])


def test_evaluation_loaders_keep_every_line_in_order(prepared_dir: Path) -> None:
    dm = TranslationDataModule(str(prepared_dir), max_tokens=256, max_source_positions=8, max_target_positions=8)
    indices = sorted(int(i) for batch in dm.test_dataloader() for i in batch["indices"])
    assert indices == list(range(len(dm.dataset("test"))))


def test_workers(prepared_dir: Path) -> None:
    dm = TranslationDataModule(str(prepared_dir), max_tokens=256, num_workers=2)
    seen = sorted(int(i) for batch in dm.train_dataloader() for i in batch["indices"])
    assert seen == list(range(len(dm.dataset("train"))))


def test_misconfiguration(prepared_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a prepared data directory"):
        TranslationDataModule(str(tmp_path))
    with pytest.raises(ValueError, match="tgt_lang='de' but .* holds only"):
        TranslationDataModule(str(prepared_dir), "en", "de")
    with pytest.raises(ValueError, match="max_tokens=100 is smaller"):
        TranslationDataModule(str(prepared_dir), max_tokens=100)


def test_two_process_ddp_gets_disjoint_batches_of_equal_count(prepared_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ranks"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    result = subprocess.run([sys.executable, str(SCRIPTS / "datamodule_ddp.py"), str(prepared_dir), str(out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        first, second = ranks[0][epoch], ranks[1][epoch]
        assert len(first["batches"]) == len(second["batches"]) > 0
        seen0 = [i for b in first["batches"] for i in b]
        seen1 = [i for b in second["batches"] for i in b]
        assert not set(seen0) & set(seen1)
        assert sorted(seen0 + seen1) == list(range(600))
    assert ranks[0][0]["batches"] != ranks[0][1]["batches"]  # reshuffled between epochs
