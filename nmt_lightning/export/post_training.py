"""Post-training iPQ (``nmt-lightning export --quantize ipq``): k-means codebooks without fine-tuning.

Every stage of the default iPQ schedule (``compression_contract.product_quantization``:
feed-forward, embeddings with the tied output projection, attention; blocks of 8 columns, 4 in
attention; 256 codewords; fp16 codebooks) is quantized at once from the model's trained weights,
through the same k-means as the training callback (``callbacks.IterativeProductQuantization``,
which this package never imports). The result is the checkpoint a trained iPQ run would have
written (codebook and assignments as state tensors, ``ipq`` steps in the manifest), ready for
the encoder.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Mapping

import torch
from torch import nn

from compression_contract.manifest import CODEBOOK, record_codec
from compression_contract.product_quantization import (DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZES, DEFAULT_STAGES,
                                                       learn_codebook)
from nmt_lightning.checkpoint_reading import model_weights
from nmt_lightning.errors import ModelFileError
from nmt_lightning.export.plan import compression_manifest

CODEWORDS, ITERATIONS, SEED = 256, 20, 0


def _block_size(name: str) -> int:
    return next((size for pattern, size in DEFAULT_BLOCK_SIZES.items() if fnmatch.fnmatchcase(name, pattern)),
                DEFAULT_BLOCK_SIZE)


def post_training_ipq(checkpoint: Mapping[str, Any], model: nn.Module, origin: str, prefix: str = "model.") -> dict[str, Any]:
    """``checkpoint`` (uncompressed) with the weights of ``model`` (a plain instance of its
    architecture, found under ``prefix`` in the checkpoint) product-quantized."""
    if compression_manifest(checkpoint):
        raise ModelFileError(f"{origin}: post-training iPQ quantizes an uncompressed model, but this checkpoint was "
                          f"trained with compression callbacks; export it as trained (no --quantize)")
    try:
        model.load_state_dict(model_weights(checkpoint["state_dict"], model, prefix))
    except RuntimeError as error:
        first = str(error).strip().splitlines()[1:2] or [""]
        raise ModelFileError(f"{origin}: its weights do not fit its own hyper-parameters ({first[0].strip()})") from None
    state = dict(checkpoint["state_dict"])
    entries: dict[str, Any] = {}
    # The callback's order and seeds: per stage, the modules its globs select (each once, with all
    # its names, in named_modules order, not taken by an earlier stage); one codebook per tensor.
    modules: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, layer in model.named_modules(remove_duplicate=False):
        if isinstance(layer, (nn.Linear, nn.Embedding)):
            modules.setdefault(id(layer), (layer, []))[1].append(name)
    taken: set[int] = set()
    codebooks: dict[int, str] = {}  # id(weight) -> the state_dict prefix of its codebook
    for index, globs in enumerate(DEFAULT_STAGES):
        targets = [(key, layer, names) for key, (layer, names) in modules.items() if key not in taken
                   and any(fnmatch.fnmatchcase(names[0], pattern) for pattern in globs)]
        for position, (key, layer, names) in enumerate(targets):
            taken.add(key)
            size = _block_size(names[0])
            if id(layer.weight) not in codebooks:
                generator = torch.Generator().manual_seed(SEED * 1_000_003 + index * 1009 + position)
                centroids, assignments = learn_codebook(layer.weight.detach(), size, CODEWORDS, ITERATIONS, generator)
                key = codebooks[id(layer.weight)] = f"{prefix}{names[0]}.post_training_ipq"
                state[f"{key}.centroids"], state[f"{key}.assignments"] = centroids, assignments
            key = codebooks[id(layer.weight)]
            for name in names:
                record_codec(entries, f"{prefix}{name}.weight", "ipq", CODEBOOK, block_size=size, centroid_bits=16,
                             centroids=f"{key}.centroids", assignments=f"{key}.assignments")
    return {**checkpoint, "state_dict": state, **entries}
