"""2 CPU processes (gloo): the classifier trains 3 steps, restarts its optimiser with hidden.*
frozen, trains 3 more; each rank writes its weights and Adam's step count to OUT/rank{r}.json."""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from tests.callbacks.classifier import classification_data
from tests.callbacks.staged import StagedTraining, WarmupClassifier


class AfterRestart(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            self.hidden = pl_module.hidden.weight.detach().clone()


if __name__ == "__main__":
    out = Path(sys.argv[1])
    L.seed_everything(0)
    model, spy = WarmupClassifier(), AfterRestart()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[StagedTraining(restart_at=3), spy])
    trainer.fit(model, classification_data())
    result = {name: [round(v, 6) for v in p.detach().flatten().tolist()] for name, p in model.named_parameters()}
    result["hidden_unchanged_after_restart"] = bool(torch.equal(spy.hidden, model.hidden.weight.detach()))
    result["adam_step"] = int(trainer.optimizers[0].state[model.out.weight]["step"])
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
