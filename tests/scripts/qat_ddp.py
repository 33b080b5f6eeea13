"""2 CPU processes (gloo) train the classifier with QAT on different data shards; each rank
writes its QAT buffers (activation ranges), weight scales, its own first-step input maximum
into ``hidden`` and that layer's activation range after the first step to OUT/rank{r}.json.
DDP's buffer broadcast is off, so equal ranges on both ranks can only come from the callback's
reduction, and Q8BERT's range is the max over all the step's data: the larger rank's maximum."""

import json
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import DDPStrategy

from callbacks import QuantizationAwareTraining
from callbacks.quantization_aware_training import weight_absmax
from tests.callbacks.classifier import BagOfWordsClassifier, classification_data


class FirstStepSpy(L.Callback):
    """Listed after QAT, so its batch-end hook sees the range QAT has just updated."""

    def on_train_start(self, trainer, pl_module):
        self.inputs = []
        # prepend: before QAT's own pre-hook replaces the input with its fake-quantized copy
        pl_module.hidden.register_forward_pre_hook(
            lambda module, args: self.inputs.append(float(args[0].detach().abs().max())), prepend=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.inputs.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:  # the first optimiser step has just ended
            self.own = max(self.inputs)
            self.range_after = float(pl_module.hidden.input_quantizer.absmax)


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
    state_rank = dict(state, own_first_step_max=spy.own, range_after_first_step=spy.range_after)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(state_rank))
