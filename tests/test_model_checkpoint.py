"""nmt_lightning.model_checkpoint.ModelCheckpoint: last.ckpt is the model at the end of training."""

from pathlib import Path

import lightning as L
import torch

from nmt_lightning.model_checkpoint import ModelCheckpoint
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


def test_last_is_written_at_every_epoch_end_with_save_top_k_zero(tmp_path: Path) -> None:
    """Lightning's writes last.ckpt at an epoch end only after a top-k save: with save_top_k 0, never
    before the end of training, so an interrupted run had nothing to resume from."""
    written: list[int] = []

    class Watch(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if (tmp_path / "last.ckpt").is_file():
                written.append(torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"])

    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = L.Trainer(max_steps=20, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[saver, Watch()], num_sanity_val_steps=0)
    trainer.fit(Validated(), classification_data(), classification_data())
    assert written == [8, 16]  # 8 batches an epoch: at the start of epochs 2 and 3
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 20
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt"]


def test_an_old_last_checkpoint_is_replaced_not_kept_beside_a_versioned_one(tmp_path: Path) -> None:
    """Lightning writes last-v1.ckpt when it finds a last.ckpt it did not write (a rerun, a copied run
    directory); what reads last.ckpt then gets the old model."""
    (tmp_path / "last.ckpt").write_bytes(b"an older run's checkpoint")
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = L.Trainer(max_steps=12, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[saver], num_sanity_val_steps=0)
    trainer.fit(Validated(), classification_data(), classification_data())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 12
