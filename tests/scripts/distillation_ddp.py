"""2 CPU processes (gloo): a classifier distilled from a frozen teacher for 3 steps; each rank
writes its weights, what DDP wraps and whether the KD term was logged to OUT/rank{r}.json."""

import json
import sys
from pathlib import Path

import lightning as L

from callbacks import KnowledgeDistillation
from tests.callbacks.classifier import DistillableClassifier, classification_data

if __name__ == "__main__":
    checkpoint, out = sys.argv[1], Path(sys.argv[2])
    L.seed_everything(0)
    model = DistillableClassifier()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[KnowledgeDistillation(checkpoint, teacher_inputs=[0])])
    trainer.fit(model, classification_data())
    facts = {"weights": [round(v, 6) for p in model.parameters() for v in p.detach().flatten().tolist()],
             "wrapped_parameters": sum(p.numel() for p in trainer.strategy.model.parameters()),
             "student_parameters": sum(p.numel() for p in model.parameters()),
             "distill_soft_logged": "distill_soft" in trainer.logged_metrics}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(facts))
