"""Two CPU processes (gloo) fit a do-nothing model on a TranslationDataModule for 2 epochs;
each rank writes the sentence indices of every batch it saw to OUT/rank{r}.json."""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from nmt_lightning.data import TranslationDataModule


class RecordBatches(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.epochs: list[dict] = []

    def on_train_epoch_start(self) -> None:
        self.epochs.append({"epoch": self.current_epoch, "batches": []})

    def training_step(self, batch, batch_index):
        self.epochs[-1]["batches"].append(batch["indices"].tolist())
        return (self.weight * batch["source"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


if __name__ == "__main__":
    data_dir, out = sys.argv[1], Path(sys.argv[2])
    model = RecordBatches()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=TranslationDataModule(data_dir, max_tokens=300, seed=5))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(model.epochs))
