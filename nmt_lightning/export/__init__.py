"""Exporting a trained model to one safetensors file, each tensor encoded by its codec chain (the
generic machinery: any module; ``nmt_lightning.translation_file`` writes a TranslationModule's
file with it, adding the sentencepiece models and the hyper-parameters).

The file holds only tensors and string metadata (safetensors never unpickles): the encoded
weights, the sentencepiece models (as uint8 tensors), the model's hyper-parameters and, per
tensor, the codec steps that decode it. A tensor tied to another (the shared embedding and
the output projection) is stored once when both are encoded the same way, and separately
when they are not (an fp32 embedding tied to a QAT-trained int8 projection).

What each tensor becomes comes from the checkpoint itself: every compression callback writes
its steps into the checkpoint's ``compression`` manifest (``compression_contract.manifest``), so
a QAT-trained checkpoint exports its int8 grid by default. ``quantize="int8"`` adds int8 to
every nn.Linear / nn.Embedding weight not quantized yet (post-training quantization, Q8BERT's
"DQ" baseline: dynamic activations); ``quantize="fp32"`` drops the quantizing steps.

Any other module trained with the callbacks exports the same way: ``export_module(checkpoint,
model, output)`` and ``load_module(model, path)`` (``module_file.py``).

Loading decodes every tensor to fp32 and deploys each nn.Linear whose codec offers a faster
form in that form (int8: ``nmt_lightning.export.codecs.int8_kernels.Int8Linear``, static activations on the trained
range where the file has one, dynamic elsewhere).
"""

from nmt_lightning.export.codecs import CODECS, Codec, register
from nmt_lightning.export.module_file import export_module, load_module

__all__ = ["CODECS", "Codec", "export_module", "load_module", "register"]
