"""LightningCLI for ``nmt-lightning fit|validate|test|predict`` with YAML recipes."""

from __future__ import annotations

from typing import Optional, Sequence

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from nmt_lightning.data import TranslationDataModule
from nmt_lightning.module import TranslationModule


class TranslationCLI(LightningCLI):
    """The vocabulary sizes come from the prepared data, so recipes never repeat them."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.src_vocab_size", "model.src_vocab_size", apply_on="instantiate")
        parser.link_arguments("data.tgt_vocab_size", "model.tgt_vocab_size", apply_on="instantiate")


def run_lightning_cli(argv: Optional[Sequence[str]] = None) -> TranslationCLI:
    return TranslationCLI(
        TranslationModule,
        TranslationDataModule,
        args=list(argv) if argv is not None else None,
        save_config_kwargs={"overwrite": True},
    )
