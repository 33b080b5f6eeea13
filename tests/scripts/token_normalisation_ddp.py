"""2 CPU processes (gloo): rank 0 trains one SGD step on 2 sentences, rank 1 on 12; each writes
its weights after the step to OUT/rank{r}.pt. Usage: token_normalisation_ddp.py DATA_DIR OUT"""

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from tests.conftest import TINY_MODEL
from tests.test_module import SGDModule, unequal_batches


class ShardedModule(SGDModule):
    def train_dataloader(self):
        return DataLoader([unequal_batches(Path(sys.argv[1]))[self.trainer.global_rank]], batch_size=None)


if __name__ == "__main__":
    out = Path(sys.argv[2])
    L.seed_everything(0)
    module = ShardedModule(64, 64, **TINY_MODEL)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module)
    torch.save({name: p.detach().clone() for name, p in module.named_parameters()}, out / f"rank{trainer.global_rank}.pt")
