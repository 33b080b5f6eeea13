import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nmt_lightning.loading import load_translation_module
from nmt_lightning.data import TranslationDataModule
from tests.conftest import tiny_trainer

SCRIPT = Path(__file__).parent / "scripts" / "translation_ddp.py"


def test_two_process_ddp_scores_equal_one_process(prepared_dir: Path, trained_checkpoint: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    result = subprocess.run([sys.executable, str(SCRIPT), str(prepared_dir), str(trained_checkpoint), str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp.json").read_text())

    module = load_translation_module(trained_checkpoint)
    module.hparams.test_output = str(tmp_path / "single.hyp")
    datamodule = TranslationDataModule(str(prepared_dir), max_tokens=256)
    trainer = tiny_trainer(tmp_path, limit_val_batches=None)
    (validated,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    (tested,) = trainer.test(module, datamodule=datamodule, verbose=False)
    single = {**validated, **tested}
    for key in ("val/bleu", "val/chrf", "val/nll", "test/bleu", "test/bleu_uncased", "test/chrf"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-4), key
    assert (tmp_path / "ddp.hyp").read_text() == (tmp_path / "single.hyp").read_text()
