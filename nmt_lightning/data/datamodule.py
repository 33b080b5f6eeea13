"""``TranslationDataModule``: a prepared data directory as Lightning train/val/test loaders."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import lightning as L
from torch.utils.data import DataLoader

from nmt_lightning.bpe import PAD_ID, load_sentencepiece
from nmt_lightning.data.dataset import ParallelTokenDataset
from nmt_lightning.data.sampler import TokenBatchSampler
from nmt_lightning.prepare import MANIFEST

log = logging.getLogger(__name__)


class ResumableLoader(DataLoader):
    """A DataLoader over a TokenBatchSampler that Lightning can resume in the middle of an epoch.

    Lightning saves ``state_dict()`` of a loader that has one in the checkpoint, and hands it
    back before the resumed epoch: the sampler then starts after the batches already trained
    on, instead of replaying the epoch from its first batch (which a plain DataLoader does).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0

    def __iter__(self):
        iterator = super().__iter__()  # the sampler decides where this epoch starts when it is iterated
        self._served = None
        for batch in iterator:
            if self._served is None:
                self._served = self.sampler.start
            self._served += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches": self._served or 0}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.resume_at(int(state["epoch"]), int(state["batches"]))


class TranslationDataModule(L.LightningDataModule):
    """Token-batched loaders over a directory written by ``nmt-lightning prepare``.

    Args:
        data_dir: the prepared directory (holds ``prepare.json``).
        src_lang, tgt_lang: the direction; either works from the same directory.
        max_tokens: tokens per training batch and per rank, padding included (fairseq's --max-tokens).
        max_sentences: optional cap on sentences per batch.
        eval_max_tokens: tokens per validation/test batch (defaults to max_tokens).
        max_source_positions, max_target_positions: longer training pairs are skipped (and
            counted); longer valid/test sentences are truncated so no line is lost.
        seed: shuffling seed; epoch ``e`` uses ``(seed, e)``, identical on every rank.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        data_dir: str,
        src_lang: str = "en",
        tgt_lang: str = "cs",
        max_tokens: int = 4096,
        max_sentences: Optional[int] = None,
        eval_max_tokens: Optional[int] = None,
        max_source_positions: int = 256,
        max_target_positions: int = 256,
        seed: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        manifest_path = self.data_dir / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{self.data_dir}: not a prepared data directory (no {MANIFEST}); run "
                f"'nmt-lightning prepare ... --out {self.data_dir}' first"
            )
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("stages", {}).get("binary") is None:
            raise FileNotFoundError(f"{self.data_dir}: prepare did not finish; run it again")
        languages = self.manifest["languages"]
        for name, lang in (("src_lang", src_lang), ("tgt_lang", tgt_lang)):
            if lang not in languages:
                raise ValueError(f"{name}='{lang}' but {self.data_dir} holds only {languages}")
        if src_lang == tgt_lang:
            raise ValueError(f"src_lang and tgt_lang are both '{src_lang}'")
        if max_tokens < max(max_source_positions, max_target_positions):
            raise ValueError(
                f"max_tokens={max_tokens} is smaller than the longest allowed sentence "
                f"({max(max_source_positions, max_target_positions)} positions)"
            )
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        self.datasets: dict[str, ParallelTokenDataset] = {}

    # ------------------------------------------------------------------ vocabulary
    @property
    def src_vocab_size(self) -> int:
        return int(self.manifest["vocab_size"][self.src_lang])

    @property
    def tgt_vocab_size(self) -> int:
        return int(self.manifest["vocab_size"][self.tgt_lang])

    @property
    def shared_vocabulary(self) -> bool:
        models = self.manifest["spm_models"]
        return models[self.src_lang] == models[self.tgt_lang]

    @property
    def pad_id(self) -> int:
        return PAD_ID

    def spm_model_path(self, lang: str) -> Path:
        return self.data_dir / self.manifest["spm_models"][lang]

    def tokenizer(self, lang: str):
        """The sentencepiece processor of ``lang`` (encode/decode)."""
        return load_sentencepiece(self.spm_model_path(lang))

    def text_path(self, split: str, lang: str) -> Path:
        """The plain-text file of a split (e.g. the test references)."""
        return self.data_dir / f"{split}.{lang}"

    # ------------------------------------------------------------------ datasets
    def dataset(self, split: str) -> ParallelTokenDataset:
        if split not in self.datasets:
            self.datasets[split] = ParallelTokenDataset(
                self.data_dir,
                split,
                self.src_lang,
                self.tgt_lang,
                self.src_vocab_size,
                self.tgt_vocab_size,
                self.hparams.max_source_positions,
                self.hparams.max_target_positions,
            )
        return self.datasets[split]

    def setup(self, stage: Optional[str] = None) -> None:
        splits = {"fit": ["train", "valid"], "validate": ["valid"], "test": ["test"], "predict": ["test"]}
        for split in splits.get(stage, ["train", "valid", "test"]):
            self.dataset(split)

    def _distribution(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def batch_sampler(self, split: str, shuffle: bool) -> TokenBatchSampler:
        dataset = self.dataset(split)
        num_replicas, rank = self._distribution()
        source_lengths, target_lengths = dataset.lengths()
        training = split == "train"
        sampler = TokenBatchSampler(
            source_lengths,
            target_lengths,
            max_tokens=self.hparams.max_tokens if training else (self.hparams.eval_max_tokens or self.hparams.max_tokens),
            max_sentences=self.hparams.max_sentences,
            shuffle=shuffle,
            seed=self.hparams.seed,
            num_replicas=num_replicas,
            rank=rank,
            # Training skips overlong pairs; evaluation truncates them (the dataset does) and
            # batches every line, however long, so none is lost.
            max_source_positions=self.hparams.max_source_positions,
            max_target_positions=self.hparams.max_target_positions,
            dataset=dataset,
            evaluation=not training,
        )
        if sampler.num_skipped:
            log.warning("%s: skipped %d of %d pairs longer than the position limits", split, sampler.num_skipped, len(dataset))
        return sampler

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return (ResumableLoader if split == "train" else DataLoader)(
            self.dataset(split),
            sampler=self.batch_sampler(split, shuffle),
            batch_size=None,  # the sampler yields whole batches; the dataset collates them
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            pin_memory=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
