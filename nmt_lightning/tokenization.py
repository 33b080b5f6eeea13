"""The text <-> ids mapping a trained model depends on, small enough to ride in a checkpoint.

Holds the serialised sentencepiece models (bytes) and whether Moses punctuation
normalisation runs before encoding, so a checkpoint translates without the data directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import sentencepiece as spm

from nmt_lightning.bpe import TextNormalizer


@dataclass
class Tokenization:
    src_lang: str
    tgt_lang: str
    src_model: bytes
    tgt_model: bytes
    moses_normalize: bool = False
    _processors: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_datamodule(cls, datamodule: Any) -> "Tokenization":
        return cls(
            src_lang=datamodule.src_lang,
            tgt_lang=datamodule.tgt_lang,
            src_model=datamodule.spm_model_path(datamodule.src_lang).read_bytes(),
            tgt_model=datamodule.spm_model_path(datamodule.tgt_lang).read_bytes(),
            moses_normalize=bool(datamodule.manifest.get("moses_normalize", False)),
        )

    def state_dict(self) -> dict:
        return {"src_lang": self.src_lang, "tgt_lang": self.tgt_lang, "src_model": self.src_model,
                "tgt_model": self.tgt_model, "moses_normalize": self.moses_normalize}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Tokenization":
        return cls(**state)

    def _processor(self, side: str) -> spm.SentencePieceProcessor:
        if side not in self._processors:
            model = self.src_model if side == "src" else self.tgt_model
            self._processors[side] = spm.SentencePieceProcessor(model_proto=model)
        return self._processors[side]

    def _encode(self, side: str, lang: str, lines: Sequence[str]) -> list[list[int]]:
        normalizer = TextNormalizer(lang, self.moses_normalize)
        return self._processor(side).encode([normalizer(line) for line in lines], out_type=int)

    def encode_source(self, lines: Sequence[str]) -> list[list[int]]:
        return self._encode("src", self.src_lang, lines)

    def encode_target(self, lines: Sequence[str]) -> list[list[int]]:
        """Target-side text -> token ids, as the training data was encoded (e.g. to count output tokens)."""
        return self._encode("tgt", self.tgt_lang, lines)

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Detokenized target text (sentencepiece's decode restores spaces)."""
        return self._processor("tgt").decode([list(i) for i in ids])
