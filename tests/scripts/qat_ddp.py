"""2 CPU processes (gloo) train the classifier with QAT on different data shards; each rank
writes its QAT buffers (activation ranges) and weight scales to OUT/rank{r}.json."""

import json
import sys
from pathlib import Path

import lightning as L

from callbacks import QuantizationAwareTraining
from callbacks.quantization_aware_training import weight_absmax
from tests.callbacks.classifier import BagOfWordsClassifier, classification_data

if __name__ == "__main__":
    out = Path(sys.argv[1])
    L.seed_everything(0)
    model = BagOfWordsClassifier()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[QuantizationAwareTraining()])
    trainer.fit(model, classification_data())
    state = {k: v.tolist() for k, v in model.state_dict().items() if "absmax" in k or "enabled" in k}
    state["hidden.weight_scale"] = float(127 / weight_absmax(model.hidden.weight, False))
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(state))
