"""Compression callbacks for any LightningModule built from nn.Linear / nn.Embedding leaves.

Each method lives in a file of its own and imports only torch and lightning, never
nmt_lightning, so it works on models that are not ours.
"""

from callbacks.knowledge_distillation import KnowledgeDistillation
from callbacks.lottery_ticket import LotteryTicketPruning
from callbacks.magnitude_pruning import MagnitudePruning
from callbacks.product_quantization import IterativeProductQuantization
from callbacks.progressive_transfer import ProgressiveKnowledgeTransfer
from callbacks.quant_noise import QuantNoise
from callbacks.quantization_aware_training import QuantizationAwareTraining
from callbacks.structured_pruning import StructuredPruning

__all__ = ["IterativeProductQuantization", "KnowledgeDistillation", "LotteryTicketPruning", "MagnitudePruning",
           "ProgressiveKnowledgeTransfer", "QuantNoise", "QuantizationAwareTraining",
           "StructuredPruning"]
