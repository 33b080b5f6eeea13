"""2 CPU processes (gloo): the classifier pruned in 2 rounds of 3 steps (late rewinding to
step 1); each rank writes its masks, weights and round to OUT/rank{r}.json."""

import json
import sys
from pathlib import Path

import lightning as L

from callbacks import LotteryTicketPruning
from tests.callbacks.classifier import BagOfWordsClassifier, classification_data

if __name__ == "__main__":
    out = Path(sys.argv[1])
    L.seed_everything(0)
    model = BagOfWordsClassifier()
    pruning = LotteryTicketPruning(sparsity=0.75, rounds=2, round_steps=3, rewind_step=1, include=["hidden", "out"])
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=8, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[pruning])
    trainer.fit(model, classification_data())
    facts = {"masks": [mask.flatten().tolist() for _, _, mask in pruning.weights.masks()],
             "weights": [round(v, 6) for p in model.parameters() for v in p.detach().flatten().tolist()],
             "round": pruning.round}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(facts))
