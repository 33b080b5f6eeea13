"""DDP on 2 CPU processes (gloo): a short fit, then validate and test a given checkpoint.

Rank 0 writes OUT/ddp.json with the validation BLEU/chrF (torchmetrics, synced across ranks)
and the test BLEU/chrF (hypotheses gathered from both ranks, scored with sacrebleu).
usage: translation_ddp.py DATA_DIR CHECKPOINT OUT
"""

import json
import sys
from pathlib import Path

import lightning as L

from nmt_lightning.loading import load_translation_module
from nmt_lightning.data import TranslationDataModule

if __name__ == "__main__":
    data_dir, checkpoint, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    common = dict(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False)
    module = load_translation_module(checkpoint)
    module.hparams.test_output = str(out / "ddp.hyp")
    datamodule = TranslationDataModule(data_dir, max_tokens=256)
    trainer = L.Trainer(max_steps=3, num_sanity_val_steps=0, limit_val_batches=0, **common)
    trainer.fit(load_translation_module(checkpoint), datamodule=datamodule)
    trainer = L.Trainer(**common)
    (validated,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    (tested,) = trainer.test(module, datamodule=datamodule, verbose=False)
    if trainer.is_global_zero:
        (out / "ddp.json").write_text(json.dumps({**validated, **tested}))
