"""2 CPU processes (gloo): the classifier with a lottery ticket (rounds of 3 steps, late
rewinding to step 1) and QAT (activation ranges reduced over the ranks), 8 steps. MODE is
``straight`` (8 steps), ``first`` (STOP steps, then a checkpoint OUT/mid.ckpt) or ``resumed``
(from OUT/mid.ckpt to step 8). Each rank writes its final state to OUT/MODE.rank{r}.json."""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import LotteryTicketPruning, QuantizationAwareTraining
from tests.callbacks.classifier import BagOfWordsClassifier, classification_data

STOP = 5  # inside the second round (prunings at steps 3 and 6) and inside the second epoch

if __name__ == "__main__":
    out, mode = Path(sys.argv[1]), sys.argv[2]
    L.seed_everything(0)  # also the seed of the DistributedSampler's shuffling (PL_GLOBAL_SEED)
    if mode == "resumed":
        torch.manual_seed(1)  # other initial weights: the resumed run must take everything from the checkpoint
    model = BagOfWordsClassifier()
    callbacks = [LotteryTicketPruning(sparsity=0.75, rounds=2, round_steps=3, rewind_step=1, include=["hidden", "out"]),
                 QuantizationAwareTraining(include=["hidden", "out"], quantize_embeddings=False)]
    if mode == "first":
        callbacks.append(ModelCheckpoint(dirpath=out, filename="mid", every_n_train_steps=STOP, save_top_k=-1))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=STOP if mode == "first" else 8,
                        logger=False, enable_checkpointing=mode == "first", enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, deterministic=True)
    trainer.fit(model, classification_data(), ckpt_path=str(out / "mid.ckpt") if mode == "resumed" else None)
    state = {name: [round(v, 7) for v in tensor.detach().flatten().tolist()] for name, tensor in model.state_dict().items()}
    (out / f"{mode}.rank{trainer.global_rank}.json").write_text(json.dumps(state))
