"""Quantization-aware training in the style of Q8BERT (Zafrir et al. 2019).

Symmetric linear quantization with ``M = 2**(bits - 1) - 1``::

    Quantize(x, S) = clamp(round(x * S), -M, M),     dequantized: Quantize(x, S) / S

- weights: ``S_W = M / max|W|`` (per tensor, or per output channel / embedding row);
- activations (the inputs of every quantized nn.Linear): ``S_x = M / EMA(max|x|)``, the
  exponential moving average updated after every training step with the maximum over all
  DDP ranks (one all-reduce for all layers), and used from the next step on;
- the rounding is bypassed in the backward pass (straight-through estimator), so the fp32
  weights keep learning while the forward pass sees their int8 version.

LayerNorm, softmax, the loss and biases stay in floating point, as in Q8BERT (which keeps
biases in int32 at inference; their quantization error is negligible).

This is written out rather than taken from ``torch.ao.quantization.FakeQuantize`` because
Q8BERT's scheme is specific (EMA of max|x| for symmetric ranges, scales recomputed from
max|W| at every step) and the callback must work on any model; the few lines below are the
whole scheme.

The callback swaps selected ``nn.Linear`` / ``nn.Embedding`` modules for subclasses that
share the very same parameters (tied weights stay tied) and add two buffers: the activation
range ``input_absmax`` and the switch ``fake_quant_enabled``. Being buffers, they are in the
model's state_dict: the ordinary checkpoint carries them and resume restores them. Ranges
are reduced across DDP ranks before they enter the EMA, so every rank holds the same scales.
Nothing in a step reads a buffer back to Python, since on a GPU every such read waits for the
device and a model has dozens of these layers: the switch is mirrored in a plain attribute
(refreshed whenever a state_dict is loaded), and "no range yet" is decided with torch.where.
"""

from __future__ import annotations

import fnmatch
from typing import Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QuantizationAwareTraining", "QATLinear", "QATEmbedding", "fake_quantize", "weight_absmax"]


def fake_quantize(x: torch.Tensor, absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` symmetrically to ``bits`` with range ``absmax`` (broadcastable).

    Forward: ``clamp(round(x * S), -M, M) / S`` with ``S = M / absmax``. Backward: identity
    (straight-through estimator).
    """
    limit = 2 ** (bits - 1) - 1
    scale = limit / absmax.clamp(min=1e-8)
    quantized = torch.clamp(torch.round(x * scale), -limit, limit) / scale
    return x + (quantized - x).detach()


def weight_absmax(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """max|W| over the whole tensor, or per row (output channel / embedding entry) as (rows, 1)."""
    weight = weight.detach()
    return weight.abs().amax(dim=1, keepdim=True) if per_channel else weight.abs().max()


class _QuantState:
    """Settings and buffers shared by the quantized module types."""

    bits: int
    per_channel: bool
    ema_decay: float

    def _init_quant_state(self, bits: int, per_channel: bool, ema_decay: float) -> None:
        self.bits, self.per_channel, self.ema_decay = bits, per_channel, ema_decay
        self.register_buffer("fake_quant_enabled", torch.tensor(False))
        self.fake_quant_on = False  # mirror of the buffer, read without a device sync

    def set_fake_quant(self, enabled: bool) -> None:
        self.fake_quant_enabled.fill_(enabled)
        self.fake_quant_on = enabled

    def _refresh_mirrors(self) -> None:
        self.fake_quant_on = bool(self.fake_quant_enabled)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh_mirrors()

    def quantized_weight(self) -> torch.Tensor:
        if not self.fake_quant_on:
            return self.weight
        return fake_quantize(self.weight, weight_absmax(self.weight, self.per_channel), self.bits)


class QATLinear(_QuantState, nn.Linear):
    """nn.Linear whose input and weight are fake-quantized (shares the original's parameters)."""

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, per_channel: bool, ema_decay: float) -> "QATLinear":
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight, module.bias = linear.weight, linear.bias
        module._init_quant_state(bits, per_channel, ema_decay)
        # EMA(max|x|) of this layer's input; 0 means "no batch seen yet".
        module.register_buffer("input_absmax", torch.zeros((), device=linear.weight.device))
        module.pending_absmax = None  # max|x| seen since the last EMA update (not saved)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        current = None
        if self.training:
            # The range is folded into the EMA after the step, by the callback, with the
            # maximum over all DDP ranks, so every rank keeps the same scale.
            current = x.detach().abs().max().float()
            self.pending_absmax = current if self.pending_absmax is None else torch.maximum(self.pending_absmax, current)
        if self.fake_quant_on:
            # The EMA of the steps so far; only the very first batch has none and uses its own
            # range (chosen on the device: no sync).
            if current is None:
                current = x.detach().abs().max().float()
            absmax = torch.where(self.input_absmax > 0, self.input_absmax, current)
            x = fake_quantize(x, absmax.to(x.dtype), self.bits)
        return F.linear(x, self.quantized_weight(), self.bias)

    @torch.no_grad()
    def update_input_range(self, batch_absmax: torch.Tensor) -> None:
        """Fold one step's max|x| into the EMA (the first value, while the range is 0, initialises it)."""
        average = self.input_absmax * self.ema_decay + (1.0 - self.ema_decay) * batch_absmax
        self.input_absmax.copy_(torch.where(self.input_absmax > 0, average, batch_absmax))
        self.pending_absmax = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, per_channel={self.per_channel}"


class QATEmbedding(_QuantState, nn.Embedding):
    """nn.Embedding whose table is fake-quantized (shares the original's weight)."""

    @classmethod
    def from_float(cls, embedding: nn.Embedding, bits: int, per_channel: bool, ema_decay: float) -> "QATEmbedding":
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for name in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(module, name, getattr(embedding, name))
        module.weight = embedding.weight
        module._init_quant_state(bits, per_channel, ema_decay)
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, per_channel={self.per_channel}"


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
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"bits must be an integer in [2, 8], got {bits!r}")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if isinstance(include, str) or isinstance(exclude, str):
            raise ValueError("include and exclude are lists of globs, e.g. ['*'], not a single string")
        if not include:
            raise ValueError("include must name at least one glob (['*'] selects every module)")
        self.bits, self.per_channel = bits, per_channel
        self.include, self.exclude = list(include), list(exclude)
        self.quantize_embeddings, self.ema_decay, self.start_step = quantize_embeddings, ema_decay, start_step

    def _selected(self, name: str, module: nn.Module) -> bool:
        kinds = (nn.Linear, nn.Embedding) if self.quantize_embeddings else (nn.Linear,)
        return (isinstance(module, kinds)
                and any(fnmatch.fnmatchcase(name, pattern) for pattern in self.include)
                and not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude))

    def quantize_modules(self, root: nn.Module) -> list[str]:
        """Swap the selected modules of ``root`` in place; returns their qualified names.

        Idempotent: modules already swapped are kept (so ``setup`` may run more than once).
        """
        # Every name of every module: one module may sit under several (a shared source/target
        # embedding), and each of them must lead to the same quantized replacement.
        names = list(root.named_modules(remove_duplicate=False))
        swapped = [name for name, module in names if isinstance(module, (QATLinear, QATEmbedding))]
        aliases: dict[int, tuple[nn.Module, list[str]]] = {}  # id -> (module, all its names)
        for name, module in names:
            if isinstance(module, (nn.Linear, nn.Embedding)) and not isinstance(module, (QATLinear, QATEmbedding)):
                aliases.setdefault(id(module), (module, []))[1].append(name)
        targets = []
        for module, module_names in aliases.values():
            selected = [name for name in module_names if self._selected(name, module)]
            if selected and len(selected) < len(module_names):
                raise ValueError(
                    f"QuantizationAwareTraining: one module is shared as {module_names}, and include={self.include} "
                    f"exclude={self.exclude} select it as {selected} only; select all its names or none"
                )
            if selected:
                targets.append((module_names, module))
        if not targets and not swapped:
            raise ValueError(
                f"QuantizationAwareTraining selected no nn.Linear{'/nn.Embedding' if self.quantize_embeddings else ''} "
                f"module with include={self.include} exclude={self.exclude}"
            )
        for module_names, module in targets:
            cls = QATEmbedding if isinstance(module, nn.Embedding) else QATLinear
            replacement = cls.from_float(module, self.bits, self.per_channel, self.ema_decay)
            for name in module_names:
                parent_name, _, attribute = name.rpartition(".")
                setattr(root.get_submodule(parent_name) if parent_name else root, attribute, replacement)
        return swapped + [name for module_names, _ in targets for name in module_names]

    # ------------------------------------------------------------------ Lightning hooks
    def state_dict(self) -> dict:
        # Saved with the checkpoint so an exporter knows the integer grid the model trained on.
        return {"bits": self.bits, "per_channel": self.per_channel, "start_step": self.start_step}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before weights are restored and before optimizers exist: both see the final structure.
        self.quantized_names = self.quantize_modules(pl_module)

    def _set_enabled(self, pl_module: L.LightningModule, enabled: bool) -> None:
        for module in pl_module.modules():
            if isinstance(module, (QATLinear, QATEmbedding)) and module.fake_quant_on != enabled:
                module.set_fake_quant(enabled)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._set_enabled(pl_module, trainer.global_step >= self.start_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        modules = [m for m in pl_module.modules() if isinstance(m, QATLinear) and m.pending_absmax is not None]
        if not modules:
            return
        # One collective for all layers: the maximum over ranks of every layer's input range.
        maxima = torch.stack([m.pending_absmax for m in modules])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX)
        for module, value in zip(modules, maxima):
            module.update_input_range(value)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Evaluate the model as it will be deployed once quantization has started.
        self._set_enabled(pl_module, trainer.global_step >= self.start_step)

    on_test_start = on_validation_start
    on_predict_start = on_validation_start
