"""Quantization-aware training in the style of Q8BERT (Zafrir et al. 2019).

Symmetric linear quantization with ``M = 2**(bits - 1) - 1``::

    Quantize(x, S) = clamp(round(x * S), -M, M),     dequantized: Quantize(x, S) / S

- weights: ``S_W = M / max|W|`` (per tensor, or per output channel / embedding row);
- activations (the inputs of every quantized nn.Linear): ``S_x = M / EMA(max|x|)``, the
  exponential moving average updated after every training step with the maximum over all
  DDP ranks (one reduction for all layers, through the trainer's strategy), and used from
  the next step on;
- the rounding is bypassed in the backward pass (straight-through estimator), so the fp32
  weights keep learning while the forward pass sees their int8 version.

LayerNorm, softmax, the loss and biases stay in floating point, as in Q8BERT (which keeps
biases in int32 at inference; their quantization error is negligible). The rounding always
runs in fp32, also under bf16-mixed or 16-mixed, so the integer codes are the ones the int8
export stores.

This is written out rather than taken from ``torch.ao.quantization.FakeQuantize`` because
Q8BERT's scheme is specific (EMA of max|x| for symmetric ranges, scales recomputed from
max|W| at every step) and the callback must work on any model; the few lines below are the
whole scheme.

How it sits in the model: the weight's fake quantization is a ``FakeQuantizedWeight`` in the
shared transform chain (``callbacks/_transforms.py``: after a pruning mask or Quant-Noise,
whatever the order of the callbacks list); the input's is an ``InputQuantizer`` child of the
nn.Linear, called by a forward pre-hook, whose buffer ``absmax`` is the EMA of max|x|. Both
live in the model, so the ordinary checkpoint carries them and resume restores them. Nothing
in a step reads a tensor back to Python (on a GPU each such read waits for the device): the
on/off switch is a plain attribute set from ``trainer.global_step``, and "no range yet" is
decided with torch.where. The checkpoint also gets a ``compression`` entry per quantized
weight, which ``nmt-lightning export`` reads to write the int8 model.

torch's ``nn.MultiheadAttention`` applies its ``out_proj`` from the weight, never calling it, so
that weight is fake-quantized without an input range (a hook on its input would never fire) and
a loaded export keeps it an nn.Linear of the decoded int8 values; the fused ``in_proj_weight`` is
not an nn.Linear and stays in floating point.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning as L
import torch
from torch import nn

from callbacks._arguments import flag, globs, integer, number
from callbacks._selection import select_modules
from callbacks._transforms import (WeightTransform, add_weight_transform, find_weight_transform,
                                   refuse_optimizer_state_of_untransformed_weights)
from compression_contract.grid import absmax_of as weight_absmax  # the grid the export stores
from compression_contract.grid import round_to_grid
from compression_contract.manifest import QUANTIZE, record_codec
from compression_contract.torch_layers import linears_read_by_weight

OWNER = "QuantizationAwareTraining"

__all__ = ["QuantizationAwareTraining", "FakeQuantizedWeight", "InputQuantizer", "fake_quantize", "round_to_grid", "weight_absmax"]


def fake_quantize(x: torch.Tensor, absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` symmetrically to ``bits`` with range ``absmax`` (broadcastable).

    Forward: ``clamp(round(x * S), -M, M) / S`` with ``S = M / absmax``, computed in fp32 and
    returned in x's dtype. Backward: identity (straight-through estimator).
    """
    return x + (round_to_grid(x, absmax, bits) - x).detach()


class FakeQuantizedWeight(WeightTransform):
    """The weight rounded onto its int8 grid (scale from max|W|), last in the transform chain."""

    stage = QUANTIZE

    def __init__(self, bits: int, per_channel: bool) -> None:
        super().__init__()
        self.bits, self.per_channel = bits, per_channel
        self.enabled = True  # set by the callback from the global step (a plain bool: no device sync)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return fake_quantize(weight, weight_absmax(weight, self.per_channel), self.bits)

    def decides_encoding(self) -> bool:
        return True

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}"


class InputQuantizer(nn.Module):
    """Fake quantization of an nn.Linear's input on the range ``absmax`` (EMA of max|x|).

    In training it also records max|x| of the step (``pending``); the callback folds the maximum
    over ranks into the EMA after the step, so every rank keeps the same scale.
    """

    def __init__(self, bits: int, ema_decay: float) -> None:
        super().__init__()
        self.bits, self.ema_decay = bits, ema_decay
        self.register_buffer("absmax", torch.zeros(()))  # 0 means "no batch seen yet"
        self.enabled = True
        self.pending: Optional[torch.Tensor] = None  # max|x| since the last EMA update (not saved)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        current = None
        if self.training:
            current = x.detach().abs().max().float()
            self.pending = current if self.pending is None else torch.maximum(self.pending, current)
        if not self.enabled:
            return x
        if current is None:
            current = x.detach().abs().max().float()
        # The EMA of the steps so far; only the very first batch has none and uses its own range.
        absmax = torch.where(self.absmax > 0, self.absmax, current)
        return fake_quantize(x, absmax, self.bits)

    @torch.no_grad()
    def update_range(self, batch_absmax: torch.Tensor) -> None:
        """Fold one step's max|x| into the EMA (the first value, while the range is 0, initialises it)."""
        average = self.absmax * self.ema_decay + (1.0 - self.ema_decay) * batch_absmax
        self.absmax.copy_(torch.where(self.absmax > 0, average, batch_absmax))
        self.pending = None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, ema_decay={self.ema_decay}"


def _has_input_quantizer(module: nn.Module) -> bool:
    """Whether the activations into ``module`` are fake-quantized: an nn.Linear that is called (not
    an embedding, not nn.MultiheadAttention's out_proj, whose weight is fake-quantized alone)."""
    return isinstance(getattr(module, "input_quantizer", None), InputQuantizer)


def _quantize_input_hook(module: nn.Module, args: tuple) -> tuple:
    return (module.input_quantizer(args[0]), *args[1:])


def _fresh_range_for_checkpoints_without_one(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """A checkpoint saved before quantization was added (it has the layer's weight but no range)
    loads with the range at 0: "no batch seen yet"."""
    key = f"{prefix}input_quantizer.absmax"
    has_weight = f"{prefix}weight" in state_dict or f"{prefix}parametrizations.weight.original" in state_dict
    if key not in state_dict and has_weight:
        state_dict[key] = torch.zeros_like(module.input_quantizer.absmax)


class QuantizationAwareTraining(L.Callback):
    """Fake-quantize the selected nn.Linear / nn.Embedding modules during training.

    Args:
        bits: 2..8 (8 is Q8BERT; 4 is allowed).
        per_channel: one weight scale per output channel (embedding row) instead of per tensor.
        include: globs over qualified module names (``model.encoder_layers.*.ffn.*``); a module is
            quantized when it matches one of them and none of ``exclude``.
        exclude: globs of modules to leave in floating point.
        quantize_embeddings: also quantize nn.Embedding tables.
        ema_decay: decay of the moving average of max|x| (Q8BERT's activation range).
        start_step: global step from which fake quantization is on; before it the activation
            ranges are only collected (a delayed start, e.g. after fp32 convergence).
    """

    def __init__(
        self,
        bits: int = 8,
        per_channel: bool = False,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        quantize_embeddings: bool = True,
        ema_decay: float = 0.99,
        start_step: int = 0,
    ) -> None:
        super().__init__()
        self.bits = integer(OWNER, "bits", bits, 2, 8)
        self.per_channel = flag(OWNER, "per_channel", per_channel)
        self.include, self.exclude = globs(OWNER, "include", include, allow_empty=False), globs(OWNER, "exclude", exclude)
        self.quantize_embeddings = flag(OWNER, "quantize_embeddings", quantize_embeddings)
        self.ema_decay = number(OWNER, "ema_decay", ema_decay, 0.0, 1.0, low_open=True, high_open=True)
        self.start_step = integer(OWNER, "start_step", start_step, minimum=0)
        self.quantized_names: list[str] = []
        self._quantized_modules: list[nn.Module] = []

    def quantize_modules(self, root: nn.Module) -> list[str]:
        """Add fake quantization to the selected modules of ``root``; returns their qualified names.

        Idempotent (``setup`` may run more than once). A module shared under several names (a
        source/target embedding) is quantized once, under all of them.
        """
        targets = [(names, module) for module, names in select_modules(
            root, OWNER, self.include, self.exclude, self.quantize_embeddings)]
        weight_only = linears_read_by_weight(root)  # never called: no input to observe
        self._quantized_modules = []
        for _, module in targets:
            transform = add_weight_transform(module, FakeQuantizedWeight(self.bits, self.per_channel))
            if (transform.bits, transform.per_channel) != (self.bits, self.per_channel):
                raise ValueError(f"QuantizationAwareTraining: the model is already fake-quantized with bits="
                                 f"{transform.bits}, per_channel={transform.per_channel}; this callback has "
                                 f"bits={self.bits}, per_channel={self.per_channel}")
            self._quantized_modules.append(module)
            if isinstance(module, nn.Linear) and id(module) not in weight_only and not _has_input_quantizer(module):
                module.input_quantizer = InputQuantizer(self.bits, self.ema_decay).to(module.weight.device)
                module.register_forward_pre_hook(_quantize_input_hook)
                module.register_load_state_dict_pre_hook(_fresh_range_for_checkpoints_without_one)
        return [name for module_names, _ in targets for name in module_names]

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        # The integer grid the model trained on; a resume with another one is refused.
        return {"bits": self.bits, "per_channel": self.per_channel, "start_step": self.start_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {key: state_dict.get(key) for key in ("bits", "per_channel")}
        mine = {"bits": self.bits, "per_channel": self.per_channel}
        if saved != mine:
            raise ValueError(f"QuantizationAwareTraining: the checkpoint trained with {saved} but this callback has "
                             f"{mine}; resuming would mix two integer grids (start a new run with init_from instead)")

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        refuse_optimizer_state_of_untransformed_weights(checkpoint, pl_module, "QuantizationAwareTraining")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Tell the exporter what each quantized weight is: an int8 grid, and for nn.Linear the
        # activation range it trained with (the state_dict key of the EMA buffer).
        for name in self.quantized_names:
            module = pl_module.get_submodule(name)
            spec = {"bits": self.bits, "per_channel": self.per_channel}
            if _has_input_quantizer(module):
                spec["activation_range"] = f"{name}.input_quantizer.absmax"
            # Grids of 4 bits or fewer are stored two weights a byte.
            record_codec(checkpoint, f"{name}.weight", "int4" if self.bits <= 4 else "int8", QUANTIZE, **spec)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before weights are restored and before optimizers exist: both see the final structure.
        self.quantized_names = self.quantize_modules(pl_module)

    def _set_enabled(self, trainer: L.Trainer) -> None:
        enabled = trainer.global_step >= self.start_step
        for module in self._quantized_modules:
            find_weight_transform(module, FakeQuantizedWeight).enabled = enabled
            if _has_input_quantizer(module):
                module.input_quantizer.enabled = enabled

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._set_enabled(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        quantizers = [m.input_quantizer for m in self._quantized_modules
                      if _has_input_quantizer(m) and m.input_quantizer.pending is not None]
        if not quantizers:
            return
        # One reduction for all layers: the maximum over ranks of every layer's input range.
        maxima = trainer.strategy.reduce(torch.stack([q.pending for q in quantizers]), reduce_op="max")
        for quantizer, value in zip(quantizers, maxima):
            quantizer.update_range(value)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Evaluate the model as it will be deployed once quantization has started.
        self._set_enabled(trainer)

    on_test_start = on_validation_start
    on_predict_start = on_validation_start
