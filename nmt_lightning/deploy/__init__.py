"""Deployment to other inference engines. Today: CTranslate2 (OpenNMT's C++ engine for CPU and GPU).

- ``convert_to_ctranslate2(checkpoint, output_dir, quantization)``: a CTranslate2 model
  directory, written by CTranslate2's own converter API, plus the sentencepiece models and
  decoding settings that make it translate on its own;
- ``CTranslate2Model(directory).translate_lines(lines, beam=4)``: translation with it, with
  the same options, batching and output as ``nmt_lightning.translate.translate_lines``.

``ctranslate2`` is an optional dependency: ``pip install -e .[ctranslate2]``.
"""

from nmt_lightning.deploy.ctranslate2_converter import ConversionReport, convert_to_ctranslate2, transformer_spec
from nmt_lightning.deploy.ctranslate2_files import QUANTIZATIONS, is_ctranslate2_model, require_ctranslate2
from nmt_lightning.deploy.ctranslate2_translator import CTranslate2Model

__all__ = ["QUANTIZATIONS", "CTranslate2Model", "ConversionReport", "convert_to_ctranslate2", "is_ctranslate2_model",
           "require_ctranslate2", "transformer_spec"]
