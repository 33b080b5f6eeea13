"""nmt_lightning.checkpointing.ModelCheckpoint: last.ckpt is the model at the end of training."""

from pathlib import Path

import lightning as L
import torch

from nmt_lightning.checkpointing import ModelCheckpoint
from tests.callbacks.classifier import BagOfWordsClassifier, classification_data


class Validated(BagOfWordsClassifier):
    def validation_step(self, batch, batch_index):
        self.log("val/acc", 0.5)


def test_last_is_written_when_training_stops_in_the_middle_of_an_epoch(tmp_path: Path) -> None:
    """8 batches an epoch, max_steps 12: Lightning's own leaves last.ckpt at step 8."""
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=1, monitor="val/acc", mode="max")
    trainer = L.Trainer(max_steps=12, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[saver], num_sanity_val_steps=0)
    trainer.fit(Validated(), classification_data(), classification_data())
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 12
