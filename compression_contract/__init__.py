"""The contract between the compression callbacks (``callbacks/``) and whatever trains, exports
or loads their models (``nmt_lightning/``, or your own code): one copy of what both sides must
agree on, owned by neither, depending on torch only.

- ``manifest``: the checkpoint entries in which a callback records how each tensor is encoded
  and which units (heads, neurons) structured pruning removed, and the order of the
  weight-transform stages;
- ``grid``: the symmetric integer grid that QAT trains on, Quant-Noise noises towards and the
  int8/int4 codecs store (one rounding, so the export holds the very codes training used);
- ``product_quantization``: k-means codebooks, the default iPQ stages and block sizes;
- ``names``: a parameter's logical name under a weight-transform chain;
- ``checkpoints``: reading an untrusted checkpoint safely, with one-line errors;
- ``protocols``: what a LightningModule offers the distillation callbacks (loss terms, the
  task-loss name, per-layer features), as ``typing.Protocol``s;
- ``torch_layers``: the nn.Linear children torch's own layers use without calling them
  (nn.MultiheadAttention's out_proj).
"""

from compression_contract.checkpoints import CheckpointError, checkpoint_problem, describe_load_error, read_checkpoint
from compression_contract.grid import absmax_of, integer_codes, quantize_weight, round_to_grid
from compression_contract.manifest import (CODEBOOK, COMPRESSION_KEY, MASK, PERTURB, QUANTIZE, SPARSE_ORDER, STRUCTURE_KEY,
                                          record_codec, record_structure)
from compression_contract.names import PARAMETRIZED, logical_name
from compression_contract.product_quantization import (DEFAULT_BLOCK_SIZES, DEFAULT_STAGES, kmeans, learn_codebook,
                                                       nearest_centroids)
from compression_contract.protocols import (TASK_LOSS, FeatureRecorder, LossContext, LossTermHost,
                                            missing_members)
from compression_contract.torch_layers import linears_read_by_weight

__all__ = ["CODEBOOK", "COMPRESSION_KEY", "CheckpointError", "DEFAULT_BLOCK_SIZES", "DEFAULT_STAGES", "FeatureRecorder",
           "LossContext", "LossTermHost", "MASK", "PARAMETRIZED", "PERTURB", "QUANTIZE", "SPARSE_ORDER", "STRUCTURE_KEY", "TASK_LOSS",
           "absmax_of", "checkpoint_problem", "describe_load_error", "integer_codes", "kmeans", "learn_codebook",
           "linears_read_by_weight", "logical_name", "missing_members", "nearest_centroids", "quantize_weight",
           "read_checkpoint", "record_codec", "record_structure", "round_to_grid"]
