"""2 CPU processes (gloo), plain strategy="ddp": a bottleneck student through every PKT stage
(stage_steps 1: encoder layers 1-2, decoder layers 1-2, then distillation; 6 steps). DDP's
reducer raises if a parameter gets no gradient, so finishing shows the zero-weighted task loss
reaches them all. Each rank writes its weights and the last stage to OUT/rank{r}.json.
usage: progressive_transfer_ddp.py DATA_DIR TEACHER OUT
"""

import json
import sys
from pathlib import Path

import lightning as L

from callbacks import ProgressiveKnowledgeTransfer
from tests.callbacks.test_progressive_transfer import student

if __name__ == "__main__":
    data_dir, teacher, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    L.seed_everything(0)
    module, datamodule = student(Path(data_dir))
    transfer = ProgressiveKnowledgeTransfer(teacher, stage_steps=1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[transfer])
    trainer.fit(module, datamodule=datamodule)
    facts = {"weights": [round(v, 6) for p in module.parameters() for v in p.detach().flatten().tolist()],
             "stage": transfer.stage}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(facts))
