"""2 CPU processes (gloo) train the classifier with Quant-Noise on different data shards; each
rank writes every step's noise masks and its final weights to OUT/rank{r}.json: the masks must
be the same on both ranks (one generator, seeded alike, drawn in lockstep)."""

import json
import sys
from pathlib import Path

import lightning as L

from callbacks import QuantNoise
from callbacks._transforms import weight_transforms
from tests.callbacks.classifier import BagOfWordsClassifier, classification_data


class MaskSpy(L.Callback):
    def __init__(self) -> None:
        self.masks = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.masks.append(weight_transforms(pl_module.hidden)[0].mask.int().tolist())


if __name__ == "__main__":
    out = Path(sys.argv[1])
    L.seed_everything(0)
    model = BagOfWordsClassifier()
    spy = MaskSpy()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=5, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[QuantNoise(p=0.3, scheme="int4", block_size=4), spy])
    trainer.fit(model, classification_data())
    weights = {k: v.tolist() for k, v in model.state_dict().items()}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"masks": spy.masks, "weights": weights}))
