"""2 CPU processes (gloo): the classifier pruned with METHOD, each rank on its own batches:
``ticket`` (a lottery ticket, 2 rounds of 3 steps, late rewinding to step 1, 75% sparse) or
``gradual`` (magnitude pruning to 75% on Zhu & Gupta's schedule, steps 1 to 5). Each rank
writes its masks, weights, round and sparsity to OUT/rank{r}.json."""

import json
import sys
from pathlib import Path

import lightning as L

from callbacks import LotteryTicketPruning, MagnitudePruning
from tests.callbacks.classifier import BagOfWordsClassifier, classification_data

if __name__ == "__main__":
    method, out = sys.argv[1], Path(sys.argv[2])
    L.seed_everything(0)
    model = BagOfWordsClassifier()
    pruning = (LotteryTicketPruning(sparsity=0.75, rounds=2, round_steps=3, rewind_step=1, include=["hidden", "out"])
               if method == "ticket" else
               MagnitudePruning(sparsity=0.75, start_step=1, end_step=5, frequency=1, include=["hidden", "out"]))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=8 if method == "ticket" else 7,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[pruning])
    trainer.fit(model, classification_data())
    facts = {"masks": [mask.flatten().tolist() for _, _, mask in pruning.weights.masks()],
             "weights": [round(v, 6) for p in model.parameters() for v in p.detach().flatten().tolist()],
             "round": getattr(pruning, "round", None), "sparsity": pruning.weights.sparsity()}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(facts))
