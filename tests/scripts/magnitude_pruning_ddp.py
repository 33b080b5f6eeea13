"""2 CPU processes (gloo): the classifier pruned gradually to 75% (Zhu & Gupta's cubic schedule,
steps 1 to 5), each rank on its own batches; each rank writes its masks, weights and sparsity
to OUT/rank{r}.json."""

import json
import sys
from pathlib import Path

import lightning as L

from callbacks import MagnitudePruning
from tests.callbacks.classifier import BagOfWordsClassifier, classification_data

if __name__ == "__main__":
    out = Path(sys.argv[1])
    L.seed_everything(0)
    model = BagOfWordsClassifier()
    pruning = MagnitudePruning(sparsity=0.75, start_step=1, end_step=5, frequency=1, include=["hidden", "out"])
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=7, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[pruning])
    trainer.fit(model, classification_data())
    facts = {"masks": [mask.flatten().tolist() for _, _, mask in pruning.weights.masks()],
             "weights": [round(v, 6) for p in model.parameters() for v in p.detach().flatten().tolist()],
             "sparsity": pruning.weights.sparsity()}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(facts))
