"""2 CPU processes (gloo) train the classifier with QAT on different data shards; each rank
writes its QAT buffers (activation ranges), weight scales and its own first-step input
maximum to OUT/rank{r}.json. DDP's buffer broadcast is off, so equal ranges on both ranks
can only come from the callback's reduction."""

import json
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import DDPStrategy

from callbacks import QuantizationAwareTraining
from callbacks.quantization_aware_training import weight_absmax
from tests.callbacks.classifier import BagOfWordsClassifier, classification_data


class FirstStepSpy(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            self.own = float(pl_module.embed(batch[0]).mean(1).detach().abs().max())


if __name__ == "__main__":
    out = Path(sys.argv[1])
    L.seed_everything(0)
    model = BagOfWordsClassifier()
    spy = FirstStepSpy()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(broadcast_buffers=False), max_steps=6,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[QuantizationAwareTraining(), spy])
    trainer.fit(model, classification_data())
    state = {k: v.tolist() for k, v in model.state_dict().items() if "absmax" in k}
    state["hidden.weight_scale"] = float(127 / weight_absmax(model.hidden.parametrizations.weight.original, False))
    state_rank = dict(state, own_first_step_max=spy.own)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(state_rank))
