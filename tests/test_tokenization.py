"""Tokenization: the sentencepiece models a checkpoint carries, encoding and decoding text."""

from pathlib import Path

from nmt_lightning.data import TranslationDataModule
from nmt_lightning.tokenization import Tokenization


def test_target_text_round_trips_through_its_ids(prepared_dir: Path) -> None:
    tokenization = Tokenization.from_datamodule(TranslationDataModule(str(prepared_dir), max_tokens=256))
    lines = (prepared_dir / "test.cs").read_text(encoding="utf-8").splitlines()[:5]
    ids = tokenization.encode_target(lines)
    assert all(ids) and tokenization.decode(ids) == lines
    restored = Tokenization.from_state_dict(tokenization.state_dict())
    assert restored.encode_target(lines) == ids and restored.encode_source(lines) != []
