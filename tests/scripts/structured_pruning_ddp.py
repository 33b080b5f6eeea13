"""2 CPU processes (gloo): the attention block of tests/callbacks/test_structured_pruning.py
pruned by StructuredPruning with Taylor importance (prunings at steps 2 and 4 of a schedule to step 6;
the run stops after step 5), each rank on its
own sentences (Lightning's DistributedSampler). Each rank writes its keep masks, the importances
gathered since the last pruning and its weights to OUT/rank{r}.json. With a second argument
``torch``, the model is the two stock nn.TransformerEncoderLayer of
tests/callbacks/test_structured_pruning_torch_layers.py (nn.MultiheadAttention heads)."""

import json
import sys
from pathlib import Path

import lightning as L

from callbacks import StructuredPruning
from tests.callbacks.test_structured_pruning import AttentionBlock, block_data
from tests.callbacks.test_structured_pruning_torch_layers import TorchEncoder, data

if __name__ == "__main__":
    out = Path(sys.argv[1])
    L.seed_everything(0)
    stock = sys.argv[2:] == ["torch"]
    model = TorchEncoder() if stock else AttentionBlock()
    pruning = StructuredPruning(prune_heads=0.5, prune_neurons=0.5, start_step=2, end_step=6, frequency=2)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[pruning])
    trainer.fit(model, (data if stock else block_data)(sentences=64, batch_size=4))
    facts = {"keep": [group.keep.tolist() for group in pruning.groups], "scores": pruning.scores.tolist(),
             "weights": [round(v, 6) for p in model.parameters() for v in p.detach().flatten().tolist()]}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(facts))
