"""Post-training iPQ for ``nmt-lightning export --quantize ipq``: k-means codebooks without fine-tuning.

Product quantization's codebooks are learnt by the compression callback
(``callbacks.IterativeProductQuantization``). The core never imports the callbacks package
(it must work without it, and a callback must work on models that are not ours), so, like a
YAML recipe's ``class_path``, the callback is resolved here by its dotted name when this
option is used, and applied to the checkpoint's model: every stage quantized at once, with its
default settings (256 codewords; blocks of 8 columns, 4 in attention; fp16 codebooks).
The result is the checkpoint a trained iPQ run would have written, ready for the encoder.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from nmt_lightning.errors import CorpusError
from nmt_lightning.export.plan import compression_manifest
from nmt_lightning.module import TranslationModule

IPQ_CALLBACK = "callbacks.IterativeProductQuantization"


def post_training_ipq(checkpoint: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """``checkpoint`` (an uncompressed TranslationModule checkpoint) with its weights product-quantized."""
    if compression_manifest(checkpoint):
        raise CorpusError(f"{origin}: post-training iPQ quantizes an uncompressed model, but this checkpoint was "
                          f"trained with compression callbacks; export it as trained (no --quantize)")
    module_name, _, class_name = IPQ_CALLBACK.rpartition(".")
    try:
        callback_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise CorpusError(f"--quantize ipq needs {IPQ_CALLBACK} (the callbacks package of this repository) "
                          f"on the Python path") from None
    hyper_parameters = {k: v for k, v in dict(checkpoint["hyper_parameters"]).items() if not k.startswith("_")}
    module = TranslationModule.from_hyperparameters(hyper_parameters)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[1:2] or [""]
        raise CorpusError(f"{origin}: its weights do not fit its own hyper-parameters ({first[0].strip()})") from None
    entries = callback_class().quantize_post_training(module)
    return {**checkpoint, "state_dict": module.state_dict(), **entries}
