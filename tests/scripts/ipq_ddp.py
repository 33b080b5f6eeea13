"""2 CPU processes (gloo) train the classifier through all iPQ stages on different data shards;
each rank writes its final state (codebooks, assignments, weights) to OUT/rank{r}.json. The
latent weights of quantized layers get no gradient, hence find_unused_parameters."""

import json
import sys
from pathlib import Path

import lightning as L

from callbacks import IterativeProductQuantization
from tests.callbacks.classifier import BagOfWordsClassifier, classification_data

if __name__ == "__main__":
    out = Path(sys.argv[1])
    L.seed_everything(0)
    model = BagOfWordsClassifier()
    callback = IterativeProductQuantization(steps_per_stage=2, stages=[["hidden"], ["embed"], ["out"]], centroids=8,
                                            block_size=4, block_sizes={})
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", max_steps=8,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])
    trainer.fit(model, classification_data())
    state = {k: v.tolist() for k, v in model.state_dict().items()}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(state))
