"""Our Transformer as a CTranslate2 ``TransformerSpec``, filled through CTranslate2's converter API.

What makes the conversion exact (each checked by tests/test_ctranslate2.py against our decoder):

- positions: our sinusoidal table puts sin on even and cos on odd dimensions; CTranslate2's
  built-in table is [sin | cos] halves, so the table itself is written into the spec;
- embeddings are multiplied by sqrt(d_model) (``scale_embeddings``, CTranslate2's default);
- the source ends with eos (``add_source_eos``), the target starts with bos;
- self-attention q/k/v and cross-attention k/v are fused into one linear layer each, as
  CTranslate2's attention expects;
- the output projection has no bias and may be tied to the target embedding (CTranslate2's
  ``optimize`` stores a tied tensor once);
- post-norm layers normalise after the residual sum and have no final LayerNorm; pre-norm
  layers normalise before the sublayer and end with one (``pre_norm``); LayerNorm's epsilon
  (torch: 1e-5) is written into the config, as CTranslate2 would otherwise assume its own.

Compressed models convert with the weights they translate with: a QAT-trained checkpoint with
its trained int8 grid (as fp32 values; CTranslate2 then quantizes each row itself), a pruned or
product-quantized one with its decoded dense weights (``runtime_layers=False`` loading). What
does not carry over: static activation ranges (CTranslate2 quantizes activations per row at run
time) and sparsity (stored dense).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from torch import nn

from nmt_lightning.bpe import BOS_ID, EOS_ID, UNK_ID
from nmt_lightning.deploy.ctranslate2_files import (
    QUANTIZATIONS,
    is_ctranslate2_model,
    require_ctranslate2,
    write_settings,
)
from nmt_lightning.errors import ModelFileError
from nmt_lightning.model.attention import MultiHeadAttention
from nmt_lightning.model.layers import DecoderLayer, EncoderLayer, FeedForward
from nmt_lightning.model.transformer import Transformer
from nmt_lightning.shortlist import read_vocabulary_map
from nmt_lightning.tokenization import Tokenization

if TYPE_CHECKING:  # the Lightning module only types the arguments: translating a converted model never imports Lightning
    from nmt_lightning.module import TranslationModule

# The leaves a layer of our standard Transformer has; anything else (a bottleneck student, an
# extra projection) has no place in CTranslate2's TransformerSpec and is refused.
_ENCODER_LEAVES = {"self_attn", "ffn", "attn_block", "ffn_block"}
_DECODER_LEAVES = {"self_attn", "cross_attn", "ffn", "self_block", "cross_block", "ffn_block"}


@dataclass
class ConversionReport:
    output: Path
    quantization: str
    bytes_on_disk: int  # every file of the directory (model.bin, vocabularies, sentencepiece models)
    model_bytes: int  # model.bin alone


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A copy: CTranslate2's int8 quantization rewrites the arrays it is given in place, and a
    view of a CPU parameter would carry that into the model being converted."""
    return tensor.detach().to("cpu", torch.float32).numpy().copy()


def _check_supported(model: nn.Module) -> Transformer:
    if type(model) is not Transformer:
        raise ValueError(f"CTranslate2 conversion supports nmt_lightning's Transformer, not {type(model).__name__}")
    if model.config.embedding_dim not in (None, model.config.d_model):
        raise ValueError(f"CTranslate2 conversion: embeddings of width {model.config.embedding_dim} projected to "
                         f"d_model={model.config.d_model} have no place in CTranslate2's TransformerSpec")
    layer_types = {EncoderLayer: _ENCODER_LEAVES, DecoderLayer: _DECODER_LEAVES}
    for layer in [*model.encoder_layers, *model.decoder_layers]:
        expected = layer_types.get(type(layer))
        children = {name for name, _ in layer.named_children()}
        if expected is None or children != expected:
            raise ValueError(f"CTranslate2 conversion: the layer {type(layer).__name__} ({sorted(children)}) is not a "
                             f"standard Transformer layer; CTranslate2's TransformerSpec cannot hold it")
        for name in ("self_attn", "cross_attn"):
            attention = getattr(layer, name, None)
            if attention is not None and (type(attention) is not MultiHeadAttention
                                          or not all(type(getattr(attention, p)) is nn.Linear
                                                     for p in ("q_proj", "k_proj", "v_proj", "out_proj"))):
                raise ValueError(f"CTranslate2 conversion: {name} of a {type(layer).__name__} is not plain nn.Linear "
                                 f"layers (load the model with runtime_layers=False)")
        if type(layer.ffn) is not FeedForward or not all(type(l) is nn.Linear for l in (layer.ffn.fc1, layer.ffn.fc2)):
            raise ValueError("CTranslate2 conversion: the feed-forward block is not two plain nn.Linear layers")
    if type(model.output_projection) is not nn.Linear or model.output_projection.bias is not None:
        raise ValueError("CTranslate2 conversion: the output projection must be an nn.Linear without bias")
    return model


def _set_linear(spec: Any, linear: nn.Linear) -> None:
    spec.weight = _array(linear.weight)
    if linear.bias is not None:
        spec.bias = _array(linear.bias)


def _set_fused(spec: Any, linears: list[nn.Linear]) -> None:
    """One linear layer computing several (rows stacked in order): q/k/v or k/v."""
    common_spec, utils = _ct2_modules()
    parts = []
    for linear in linears:
        part = common_spec.LinearSpec()
        _set_linear(part, linear)
        parts.append(part)
    utils.fuse_linear(spec, parts)


def _set_layer_norm(spec: Any, norm: nn.LayerNorm) -> None:
    spec.gamma, spec.beta = _array(norm.weight), _array(norm.bias)


def _set_attention(spec: Any, attention: MultiHeadAttention, self_attention: bool) -> None:
    if self_attention:  # linear[0] = [q; k; v], linear[1] = out
        _set_fused(spec.linear[0], [attention.q_proj, attention.k_proj, attention.v_proj])
    else:  # linear[0] = q (from the decoder), linear[1] = [k; v] (from the encoder output), linear[2] = out
        _set_linear(spec.linear[0], attention.q_proj)
        _set_fused(spec.linear[1], [attention.k_proj, attention.v_proj])
    _set_linear(spec.linear[-1], attention.out_proj)


def _set_ffn(spec: Any, block: nn.Module, ffn: FeedForward) -> None:
    _set_layer_norm(spec.layer_norm, block.norm)
    _set_linear(spec.linear_0, ffn.fc1)
    _set_linear(spec.linear_1, ffn.fc2)


def _stack_heads(stack: str, attentions: list[MultiHeadAttention]) -> tuple[int, int]:
    """(heads, head_dim) shared by every attention of a stack. CTranslate2 holds one head count
    for the encoder and one for the decoder (its self- and cross-attention alike), each head
    ``head_dim`` wide; a model whose structured pruning left uneven counts cannot be held."""
    shapes = sorted({(attention.heads, attention.head_dim) for attention in attentions})
    if len(shapes) > 1:
        raise ValueError(f"CTranslate2 conversion: the {stack}'s attention modules have {[h for h, _ in shapes]} heads; "
                         f"CTranslate2 holds one number of heads per stack (encoder; decoder self- and "
                         f"cross-attention). Prune heads with StructuredPruning(scope='layer') to keep them even")
    return shapes[0]


def _head_dim_option(heads: tuple[int, int], d_model: int) -> Optional[int]:
    """CTranslate2's ``head_dim``, needed only where heads were removed (else it is d_model / heads)."""
    count, head_dim = heads
    return None if count * head_dim == d_model else head_dim


def _ct2_modules() -> tuple[Any, Any]:
    require_ctranslate2()
    from ctranslate2.converters import utils
    from ctranslate2.specs import common_spec

    return common_spec, utils


def _vocabulary(processor: Any, rows: int, side: str) -> list[str]:
    """The embedding's rows as sentencepiece pieces (CTranslate2 maps tokens to rows by position)."""
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    if rows < len(pieces):
        raise ValueError(f"the {side} embedding has {rows} rows but its sentencepiece model {len(pieces)} pieces")
    return pieces + [f"<nmt_lightning_unused_{i}>" for i in range(rows - len(pieces))]


def transformer_spec(module: TranslationModule) -> Any:
    """A ``ctranslate2.specs.TransformerSpec`` holding ``module``'s Transformer and vocabularies
    (``module.model`` must consist of plain nn.Linear / nn.Embedding / nn.LayerNorm leaves)."""
    require_ctranslate2()
    from ctranslate2.specs import transformer_spec as ts

    model = _check_supported(module.model)
    if module.tokenization is None:
        raise ValueError("CTranslate2 conversion needs the model's sentencepiece models (module.tokenization)")
    config = model.config
    encoder_heads = _stack_heads("encoder", [layer.self_attn for layer in model.encoder_layers])
    decoder_heads = _stack_heads("decoder", [attention for layer in model.decoder_layers
                                             for attention in (layer.self_attn, layer.cross_attn)])
    spec = ts.TransformerSpec(
        ts.TransformerEncoderSpec(config.encoder_layers, encoder_heads[0], pre_norm=config.pre_norm,
                                  head_dim=_head_dim_option(encoder_heads, config.d_model)),
        ts.TransformerDecoderSpec(config.decoder_layers, decoder_heads[0], pre_norm=config.pre_norm,
                                  head_dim=_head_dim_option(decoder_heads, config.d_model)),
    )
    positions = _array(model.positions)  # (max_positions, d_model): sin at even, cos at odd dimensions
    for side, embedding in ((spec.encoder, model.src_embed), (spec.decoder, model.tgt_embed)):
        embeddings = side.embeddings[0] if isinstance(side.embeddings, list) else side.embeddings
        embeddings.weight = _array(embedding.weight)
        side.scale_embeddings = True  # * sqrt(d_model)
        side.position_encodings.encodings = positions
    spec.decoder.projection.weight = _array(model.output_projection.weight)  # tied or not; no bias
    for layer_spec, layer in zip(spec.encoder.layer, model.encoder_layers):
        _set_attention(layer_spec.self_attention, layer.self_attn, self_attention=True)
        _set_layer_norm(layer_spec.self_attention.layer_norm, layer.attn_block.norm)
        _set_ffn(layer_spec.ffn, layer.ffn_block, layer.ffn)
    for layer_spec, layer in zip(spec.decoder.layer, model.decoder_layers):
        _set_attention(layer_spec.self_attention, layer.self_attn, self_attention=True)
        _set_layer_norm(layer_spec.self_attention.layer_norm, layer.self_block.norm)
        _set_attention(layer_spec.attention, layer.cross_attn, self_attention=False)
        _set_layer_norm(layer_spec.attention.layer_norm, layer.cross_block.norm)
        _set_ffn(layer_spec.ffn, layer.ffn_block, layer.ffn)
    if config.pre_norm:  # post-norm stacks have no final LayerNorm (our encoder_norm is nn.Identity)
        _set_layer_norm(spec.encoder.layer_norm, model.encoder_norm)
        _set_layer_norm(spec.decoder.layer_norm, model.decoder_norm)

    tokenization = module.tokenization
    source = tokenization._processor("src")
    target = tokenization._processor("tgt")
    spec.register_source_vocabulary(_vocabulary(source, config.src_vocab_size, "source"))
    spec.register_target_vocabulary(_vocabulary(target, config.tgt_vocab_size, "target"))
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    epsilons = {m.eps for m in norms}
    if len(epsilons) > 1:
        raise ValueError(f"CTranslate2 conversion: LayerNorms with different epsilons {sorted(epsilons)}")
    spec.config.layer_norm_epsilon = epsilons.pop() if epsilons else 1e-5
    spec.config.unk_token = target.id_to_piece(UNK_ID)
    spec.config.bos_token = target.id_to_piece(BOS_ID)
    spec.config.eos_token = target.id_to_piece(EOS_ID)
    spec.config.decoder_start_token = target.id_to_piece(BOS_ID)
    spec.config.add_source_eos = True  # our encoder was trained on sources ending with eos
    if source.id_to_piece(EOS_ID) != spec.config.eos_token:
        raise ValueError(f"the source and target sentencepiece models name eos differently "
                         f"({source.id_to_piece(EOS_ID)!r} and {spec.config.eos_token!r})")
    return spec


def _tokenization_files(directory: Path, tokenization: Tokenization) -> dict[str, str]:
    if tokenization.src_model == tokenization.tgt_model:
        (directory / "spm.model").write_bytes(tokenization.src_model)
        return {"src_model": "spm.model", "tgt_model": "spm.model"}
    (directory / "source.spm.model").write_bytes(tokenization.src_model)
    (directory / "target.spm.model").write_bytes(tokenization.tgt_model)
    return {"src_model": "source.spm.model", "tgt_model": "target.spm.model"}


def _check_output(output: Path, force: bool) -> None:
    if output.is_file():
        raise ValueError(f"--output {output} is a file; a CTranslate2 model is a directory")
    if output.is_dir() and any(output.iterdir()):
        if not force:
            raise ValueError(f"--output {output} exists and is not empty; --force replaces it")
        if not is_ctranslate2_model(output):
            raise ValueError(f"--output {output} is a non-empty directory that is not a CTranslate2 model; "
                             f"refusing to replace it even with --force")


def convert_module(module: TranslationModule, output: str | os.PathLike, quantization: Optional[str] = None,
                   force: bool = False, origin: str = "", vocabulary_map: Optional[str | os.PathLike] = None
                   ) -> ConversionReport:
    """Write ``module`` to the CTranslate2 directory ``output`` (weights stored as ``quantization``,
    default float32). The directory appears complete or not at all: it is written beside
    ``output`` and renamed into place. ``vocabulary_map``: a target-vocabulary shortlist
    (``nmt-lightning shortlist``), checked against the model's target vocabulary and stored as
    the directory's ``vmap.txt``; translation then uses it unless told not to."""
    ctranslate2 = require_ctranslate2()
    from ctranslate2.converters.converter import Converter

    quantization = quantization or "float32"
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    output = Path(output)
    _check_output(output, force)
    spec = transformer_spec(module)
    if vocabulary_map is not None:
        target = module.tokenization._processor("tgt")
        read_vocabulary_map(vocabulary_map, {target.id_to_piece(i) for i in range(target.get_piece_size())})
        spec.register_vocabulary_mapping(str(vocabulary_map))

    class _SpecConverter(Converter):  # CTranslate2's converter: validate, optimize (quantize, alias), save
        def _load(self) -> Any:
            return spec

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        _SpecConverter().convert(str(staging), quantization=quantization, force=True)
        hp = module.hparams
        tokenization = module.tokenization
        write_settings(staging, {
            "source_checkpoint": origin,
            "quantization": quantization,
            "ctranslate2_version": ctranslate2.__version__,
            "tokenization": {"src_lang": tokenization.src_lang, "tgt_lang": tokenization.tgt_lang,
                             "moses_normalize": tokenization.moses_normalize,
                             **_tokenization_files(staging, tokenization)},
            "decoding": {"length_penalty": float(hp.get("length_penalty", 1.0)),
                         "max_len_a": float(hp.get("max_len_a", 1.2)), "max_len_b": int(hp.get("max_len_b", 10)),
                         "max_positions": int(module.model.config.max_positions)},
        })
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = [p for p in output.iterdir() if p.is_file()]
    return ConversionReport(output, quantization, sum(p.stat().st_size for p in files),
                            (output / "model.bin").stat().st_size)


def convert_to_ctranslate2(checkpoint: str | os.PathLike, output: str | os.PathLike,
                           quantization: Optional[str] = None, force: bool = False,
                           vocabulary_map: Optional[str | os.PathLike] = None) -> ConversionReport:
    """Convert a Lightning checkpoint or an ``nmt-lightning export`` file to a CTranslate2 directory.

    Compressed checkpoints convert with the weights they translate with (decoded by their export
    codecs: a QAT model's int8 grid, a pruned model's zeros), as dense tensors."""
    from nmt_lightning.loading import load_translation_module

    path = Path(checkpoint)
    if is_ctranslate2_model(path):
        raise ModelFileError(f"{path} is already a CTranslate2 model; convert the checkpoint it came from")
    module = load_translation_module(path, runtime_layers=False)
    return convert_module(module, output, quantization, force, origin=str(path), vocabulary_map=vocabulary_map)
