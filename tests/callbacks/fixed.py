"""A model whose weights the tests choose, trained with a learning rate of 0.

With lr = 0 the optimiser leaves every parameter's value as set, so whatever a callback does
to the weights (prune them, noise them, quantize them) is all that changes, and the expected
result can be written down by hand.
"""

from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# Chosen so that a global and a per-layer magnitude round keep different weights, and ranking
# by signed value keeps others again (see tests/callbacks/test_lottery_ticket.py).
A = [[-9.0, 0.1, 5.0, -4.0], [0.3, -7.0, 0.4, 6.0]]
B = [[0.5, -0.6], [0.8, -0.05]]


class TwoLinears(L.LightningModule):
    """x (batch, 4) -> a: Linear(4, 2) -> b: Linear(2, 2), no biases; loss = sum of squares."""

    def __init__(self, lr: float = 0.0) -> None:
        super().__init__()
        self.lr = lr
        self.a = nn.Linear(4, 2, bias=False)
        self.b = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor(A))
            self.b.weight.copy_(torch.tensor(B))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))

    def training_step(self, batch, batch_index):
        (x,) = batch
        return self(x).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def batches(rows: Sequence[Sequence[float]]) -> DataLoader:
    """One batch of one row per entry of ``rows``, in order."""
    return DataLoader(TensorDataset(torch.tensor(rows, dtype=torch.float32)), batch_size=1, shuffle=False)
