"""A trained model ready to translate, without Lightning.

``nmt-lightning translate`` and the benchmarks' timing workers load an exported file into a
``Translator``: the Transformer, its tokenization and its decoding settings, the parts of a
``TranslationModule`` that translation uses. Lightning's import alone takes several seconds
(most of a short translation job's start); a ``Translator`` never imports it.
``translate_lines`` takes either.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Mapping, Optional

import torch
from torch import nn

from nmt_lightning.bpe import PAD_ID
from nmt_lightning.model import Transformer, config_from_hyperparameters
from nmt_lightning.tokenization import Tokenization

# TranslationModule's decoding hyper-parameters and their defaults there.
DECODING_DEFAULTS: dict[str, Any] = dict(beam_size=4, length_penalty=1.0, max_len_a=1.2, max_len_b=10)


class Translator(nn.Module):
    """``model`` (a Transformer), ``tokenization`` (set by the loader) and ``hparams`` (the
    decoding settings, read as ``module.hparams.max_len_a`` as on a TranslationModule)."""

    def __init__(self, model: Transformer, hyper_parameters: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.tokenization: Optional[Tokenization] = None
        self.hparams = SimpleNamespace(**{name: hyper_parameters.get(name, default)
                                          for name, default in DECODING_DEFAULTS.items()})

    @classmethod
    def from_hyperparameters(cls, hyper_parameters: Mapping[str, Any]) -> "Translator":
        """The untrained Transformer that a TranslationModule's hyper-parameters describe."""
        return cls(Transformer(config_from_hyperparameters(hyper_parameters, pad_id=PAD_ID)), hyper_parameters)

    @property
    def device(self) -> torch.device:
        return self.model.positions.device  # a buffer every Transformer has, whatever its layers' encodings
