"""A small LightningModule that is not ours, to show callbacks work on any model."""

from types import SimpleNamespace

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class BagOfWordsClassifier(L.LightningModule):
    """Embedding -> mean -> 2 Linear layers -> 3 classes."""

    def __init__(self, vocab_size: int = 30, dim: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.hidden = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(torch.relu(self.hidden(self.embed(tokens).mean(1)))))

    def training_step(self, batch, batch_index):
        tokens, labels = batch
        loss = nn.functional.cross_entropy(self(tokens), labels)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_index):
        tokens, labels = batch
        self.log("val_acc", (self(tokens).argmax(-1) == labels).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class ResumableLoader(DataLoader):
    """A DataLoader Lightning resumes in the middle of an epoch (its state_dict says how many
    batches were served); a plain DataLoader would replay the epoch from its first batch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._served, self._skip = 0, 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._served = skip
        for index, batch in enumerate(super().__iter__()):
            if index >= skip:
                self._served += 1
                yield batch

    def state_dict(self) -> dict:
        return {"served": self._served}

    def load_state_dict(self, state: dict) -> None:
        self._skip = state["served"]


def classification_data(samples: int = 64, batch_size: int = 8, seed: int = 0, vocabulary: int = 30) -> DataLoader:
    """Label = (sum of tokens) mod 3: learnable from a bag of words. Fixed order (no shuffling)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocabulary, (samples, 6), generator=generator)
    return ResumableLoader(TensorDataset(tokens, tokens.sum(1) % 3), batch_size=batch_size, shuffle=False)


class DistillableClassifier(BagOfWordsClassifier):
    """The classifier with the loss-term extension point that distillation callbacks need (the
    protocol of callbacks/knowledge_distillation.py, written by a user who is not us)."""

    def __init__(self, vocab_size: int = 30, dim: int = 16, classes: int = 3) -> None:
        super().__init__(vocab_size, dim, classes)
        self.save_hyperparameters()
        self.terms: dict = {}
        self.task_weight = 1.0

    def register_loss_term(self, name, fn, weight=1.0, features=()) -> None:
        self.terms[name] = [fn, weight]

    def remove_loss_term(self, name) -> None:
        self.terms.pop(name, None)

    def set_loss_weight(self, name, weight) -> None:
        if name == "cross_entropy":
            self.task_weight = weight
        else:
            self.terms[name][1] = weight

    def training_step(self, batch, batch_index):
        tokens, labels = batch
        logits = self(tokens)
        loss = self.task_weight * nn.functional.cross_entropy(logits, labels, reduction="sum")
        context = SimpleNamespace(module=self, batch=batch, logits=logits, features=None,
                                  target_mask=torch.ones_like(labels, dtype=torch.bool), num_tokens=len(labels))
        for name, (fn, weight) in self.terms.items():
            value = fn(context)
            self.log(name, value / len(labels))
            loss = loss + weight * value
        return loss / len(labels)
