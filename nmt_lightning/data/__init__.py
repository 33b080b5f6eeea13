"""Training-time data: memory-mapped parallel datasets, token-count batching, the DataModule."""

from nmt_lightning.data.dataset import ParallelTokenDataset
from nmt_lightning.data.datamodule import TranslationDataModule
from nmt_lightning.data.sampler import TokenBatchSampler

__all__ = ["ParallelTokenDataset", "TokenBatchSampler", "TranslationDataModule"]
