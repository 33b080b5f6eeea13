"""2 CPU processes (gloo): the classifier trains 3 steps with a frozen teacher; each rank writes
how many parameters DDP wraps (the student's only) to OUT/rank{r}.json."""

import json
import sys
from pathlib import Path

import lightning as L

from tests.callbacks.classifier import BagOfWordsClassifier, classification_data
from tests.callbacks.staged import TeacherOutputs

if __name__ == "__main__":
    checkpoint, out = sys.argv[1], Path(sys.argv[2])
    L.seed_everything(0)
    model, user = BagOfWordsClassifier(), TeacherOutputs(checkpoint)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[user])
    trainer.fit(model, classification_data())
    facts = {"wrapped_parameters": sum(p.numel() for p in trainer.strategy.model.parameters()),
             "student_parameters": sum(p.numel() for p in model.parameters()),
             "teacher_calls": len(user.outputs), "teacher_training": user.teacher.module.training}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(facts))
