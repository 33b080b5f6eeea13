"""Training-time data: memory-mapped parallel datasets, token-count batching, the DataModule.

The names load on first use (PEP 562), so that translation, which only pads batches
(``dataset.pad_batch``), does not import Lightning through the DataModule."""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {"ParallelTokenDataset": "nmt_lightning.data.dataset",
            "TokenBatchSampler": "nmt_lightning.data.sampler",
            "TranslationDataModule": "nmt_lightning.data.datamodule"}

__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name]), name)
