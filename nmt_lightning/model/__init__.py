"""The Transformer of Vaswani et al. (2017) in plain nn.Modules (no Lightning import)."""

from nmt_lightning.model.features import FEATURE_NAMES, TransformerFeatures
from nmt_lightning.model.transformer import PRESETS, Transformer, TransformerConfig, config_from_hyperparameters

__all__ = ["FEATURE_NAMES", "PRESETS", "Transformer", "TransformerConfig", "TransformerFeatures",
           "config_from_hyperparameters"]
