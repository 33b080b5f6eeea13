"""nmt-lightning: Transformer machine translation with PyTorch Lightning.

The core package (data, model, training, evaluation, CLI). Compression methods live in the
separate top-level ``callbacks`` package and never import from here.
"""

from nmt_lightning.errors import CorpusError, ModelFileError

__all__ = ["CorpusError", "ModelFileError"]
__version__ = "0.1.0"
