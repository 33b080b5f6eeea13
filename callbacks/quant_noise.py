"""Quant-Noise (Fan et al. 2020): quantization noise on a random subset of weight blocks.

At every training step a random fraction ``p`` of each selected weight's blocks receives the
noise of the target compression; the other blocks stay exact. The network learns to tolerate
the compression while most of its weights see no noise at each step (QAT, p = 1, trains every
weight through it); the gradient passes straight through the noise (the straight-through
estimator), to noised and exact blocks alike.

A weight (rows, columns) is cut into blocks of ``block_size`` consecutive columns within a
row (for nn.Linear: input features, as in the paper; for nn.Embedding: embedding dimensions),
mask (rows, columns / block_size). Schemes:

- ``int8`` / ``int4``: the selected blocks take their value on the symmetric integer grid of
  the whole tensor (or of their row, ``per_channel``): the QAT callback's ``fake_quantize``,
  with its straight-through gradient. p = 1 with int8 is exactly QAT's weight quantization.
- ``pq``: the paper's proxy for product quantization: the selected blocks are dropped (zero)
  and the others scaled by 1 / (1 - p), as dropout (so p < 1). The gradient, as in the paper
  and fairseq, is the straight-through estimator: every block, dropped or kept, receives the
  gradient of the noisy weight unscaled (fairseq gets it by writing the noisy weight into
  ``.data``). ``pq_gradient="dropout"`` differentiates the dropout instead: dropped blocks get
  no gradient and kept ones 1 / (1 - p) of theirs (docs/methods.md compares the two).

The noisy weight is a ``WeightTransform`` (``callbacks/_transforms.py``, stage PERTURB: after
a pruning mask, before fake quantization), computed afresh from the untouched parameter at
every read: the stored weight never changes (fairseq's ``quant_noise`` writes its masked
weight into ``.data``, and dropped weights never come back: fairseq issues 3783, 3195).
In evaluation (``module.eval()``) there is no noise.

The masks come from the callback's own ``torch.Generator``, on the device of the weights (a GPU
run draws other masks than a CPU run from the same seed), one mask per weight per training
batch, all drawn at once in ``on_train_batch_start``; its state is saved in the callback's
checkpoint state, so a resumed run draws what an uninterrupted one would (Lightning does not
restore the global random state). Every DDP rank seeds it the same way and draws in lockstep:
the noise is identical on all ranks.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
import torch
from torch import nn

from callbacks._arguments import flag, globs, integer, number, one_of
from callbacks._selection import BlockSizes, select_modules
from callbacks._transforms import (WeightTransform, add_weight_transform,
                                   refuse_optimizer_state_of_untransformed_weights, trainable_weight, weight_transforms)
from compression_contract.grid import absmax_of as weight_absmax
from compression_contract.grid import round_to_grid
from compression_contract.manifest import PERTURB, QUANTIZE, record_codec

__all__ = ["QuantNoise", "NoisyWeight", "SCHEMES", "int_noise"]

OWNER = "QuantNoise"
SCHEMES = {"int8": 8, "int4": 4, "pq": None}  # scheme -> bits of its integer grid
PQ_GRADIENTS = ("straight_through", "dropout")


def int_noise(weight: torch.Tensor, mask: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    """The rounding error of ``weight`` on its ``bits`` grid in the blocks of ``mask``, zero elsewhere.

    weight (rows, columns); mask (rows, columns / block_size) bool, True = noised; returns
    (rows, columns). ``weight + int_noise(...)`` is the weight with the selected blocks on the grid."""
    rows, columns = weight.shape
    error = round_to_grid(weight, weight_absmax(weight, per_channel), bits) - weight
    blocks = error.view(rows, mask.shape[1], columns // mask.shape[1])
    return torch.where(mask.unsqueeze(-1), blocks, 0.0).view(rows, columns)


@functools.cache
def compiled_int_noise() -> Callable[..., torch.Tensor]:
    """``int_noise`` through ``torch.compile`` (made once, on first use): a row reduction and one
    elementwise kernel instead of about ten kernels per weight."""
    return torch.compile(int_noise)


class NoisyWeight(WeightTransform):
    """The weight with the noise of ``scheme`` on the blocks of ``mask`` (training only)."""

    stage = PERTURB

    def __init__(self, scheme: str, p: float, block_size: int, per_channel: bool, compile: bool = False,
                 pq_gradient: str = "straight_through") -> None:
        super().__init__()
        self.scheme, self.p, self.block_size, self.per_channel = scheme, p, block_size, per_channel
        self.pq_gradient = pq_gradient
        self.compile = compile  # fuse int_noise with torch.compile (same values)
        self.mask: Optional[torch.Tensor] = None  # (rows, columns / block_size) bool; set each step, not saved

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.training or self.mask is None:
            return weight
        if self.scheme == "pq":
            rows, columns = weight.shape
            blocks = weight.reshape(rows, columns // self.block_size, self.block_size)
            noisy = (blocks.masked_fill(self.mask.unsqueeze(-1), 0.0) / (1.0 - self.p)).reshape(rows, columns)
            if self.pq_gradient == "dropout":
                return noisy  # differentiated: 0 for dropped blocks, 1 / (1 - p) for kept ones
            return weight + (noisy - weight).detach()  # value of the noisy weight, identity gradient
        # The noise is a constant of the step: every block's gradient passes straight through
        # (the straight-through estimator on the noised blocks, exact on the others), so it is
        # computed outside autograd and the backward pass has nothing of it to do.
        with torch.no_grad():
            noise = (compiled_int_noise() if self.compile else int_noise)(
                weight, self.mask, SCHEMES[self.scheme], self.per_channel)
        return weight + noise

    def extra_repr(self) -> str:
        gradient = f", pq_gradient={self.pq_gradient}" if self.scheme == "pq" else ""
        return f"scheme={self.scheme}, p={self.p}, block_size={self.block_size}, per_channel={self.per_channel}{gradient}"


class QuantNoise(L.Callback):
    """Quant-Noise on the selected nn.Linear / nn.Embedding weights while training.

    Args:
        p: fraction of blocks noised at each step, in [0, 1] (the paper: 0.05 to 0.2; pq needs p < 1).
        scheme: "int8", "int4" (scalar quantization of the selected blocks) or "pq" (dropped blocks).
        block_size: columns per block (fairseq: 8 for feed-forward and embeddings, 4 for attention).
        block_sizes: glob over qualified module names -> block size, first match wins, e.g.
            ``{"*attn*": 4}``; modules matching none take ``block_size``.
        include, exclude: globs over qualified module names (as QuantizationAwareTraining's).
        noise_embeddings: also noise nn.Embedding tables.
        per_channel: int schemes: one scale per row instead of one per tensor.
        seed: seed of the callback's random generator.
        compile: compute the int noise through ``torch.compile`` (the same values in a couple of fused
            kernels per weight instead of about ten: pays on a GPU, where a small model's step is
            bound by kernel launches; the first steps wait for the compilation).
        pq_gradient: scheme "pq" only: "straight_through" (the paper's and fairseq's: every block gets
            the noisy weight's gradient) or "dropout" (dropped blocks get none, kept ones 1 / (1 - p)).
    """

    def __init__(
        self,
        p: float = 0.1,
        scheme: str = "int8",
        block_size: int = 8,
        block_sizes: Optional[dict[str, int]] = None,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        noise_embeddings: bool = True,
        per_channel: bool = True,
        seed: int = 0,
        compile: bool = False,
        pq_gradient: str = "straight_through",
    ) -> None:
        super().__init__()
        self.scheme = one_of(OWNER, "scheme", scheme, list(SCHEMES))
        self.p = number(OWNER, "p", p, 0.0, 1.0)
        if scheme == "pq" and p >= 1.0:
            raise ValueError(f"{OWNER}: p must be < 1 with scheme 'pq' (every block dropped leaves no weight to rescale), "
                             f"got {p}")
        self.sizes = BlockSizes(OWNER, block_size, block_sizes)
        self.block_size, self.block_sizes = block_size, self.sizes.block_sizes
        self.include, self.exclude = globs(OWNER, "include", include, allow_empty=False), globs(OWNER, "exclude", exclude)
        self.noise_embeddings = flag(OWNER, "noise_embeddings", noise_embeddings)
        self.per_channel = flag(OWNER, "per_channel", per_channel)
        self.seed = integer(OWNER, "seed", seed, 0, 2 ** 63 - 1)
        self.compile = flag(OWNER, "compile", compile)
        self.pq_gradient = one_of(OWNER, "pq_gradient", pq_gradient, PQ_GRADIENTS)
        self.generator: Optional[torch.Generator] = None  # made on the weights' device at the first draw
        self._saved_generator: Optional[tuple[str, torch.Tensor]] = None  # (device type, state) from a checkpoint
        self.noised_names: list[str] = []
        self._noised: list[tuple[NoisyWeight, nn.Parameter]] = []  # each transform with the weight it noises

    # ------------------------------------------------------------------ selection
    def add_noise_transforms(self, root: nn.Module) -> list[str]:
        """Put a NoisyWeight on every selected weight of ``root`` (idempotent); returns their names.
        A module shared under several names gets one transform; all its names must be selected alike."""
        self._noised, names = [], []
        for module, module_names in select_modules(root, "QuantNoise", self.include, self.exclude,
                                                   self.noise_embeddings):
            size = self.sizes.of(module_names[0], trainable_weight(module))
            wanted = NoisyWeight(self.scheme, self.p, size, self.per_channel, pq_gradient=self.pq_gradient)
            transform = add_weight_transform(module, wanted)
            if transform.extra_repr() != wanted.extra_repr():
                raise ValueError(f"QuantNoise: {module_names[0]} already has Quant-Noise ({transform.extra_repr()})")
            transform.compile = self.compile
            self._noised.append((transform, trainable_weight(module)))
            names += module_names
        return names

    # ------------------------------------------------------------------ noise
    def draw_masks(self) -> None:
        """A fresh mask per weight from the callback's generator: each block noised with probability p.

        One draw for all weights, on the device of the first weight (drawn on the CPU and copied,
        the masks cost a Transformer-base step 18 ms of host time on our CPU); each weight's mask is a view of it."""
        if not self._noised:
            return
        shapes = [(weight.shape[0], weight.shape[1] // transform.block_size) for transform, weight in self._noised]
        device = self._noised[0][1].device
        drawn = torch.rand(sum(rows * blocks for rows, blocks in shapes), device=device,
                           generator=self._generator_on(device)) < self.p
        on_device = {device: drawn}
        start = 0
        for (transform, weight), (rows, blocks) in zip(self._noised, shapes):
            if weight.device not in on_device:  # a model spread over devices
                on_device[weight.device] = drawn.to(weight.device)
            transform.mask = on_device[weight.device][start: start + rows * blocks].view(rows, blocks)
            start += rows * blocks

    def _generator_on(self, device: torch.device) -> torch.Generator:
        """The callback's generator, made on ``device`` at the first draw there, from the seed or
        from the state a checkpoint saved on a device of the same type (the CPU's Mersenne Twister
        and CUDA's Philox have different states: a run resumed on the other kind of device restarts
        its noise from the seed, with a warning)."""
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device).manual_seed(self.seed)
            if self._saved_generator is not None:
                saved_type, state = self._saved_generator
                if saved_type == device.type:
                    self.generator.set_state(state)
                else:
                    rank_zero_warn(f"QuantNoise: the checkpoint's noise generator ran on {saved_type}, this run "
                                   f"draws on {device.type}: the noise restarts from seed {self.seed}")
            self._saved_generator = None
        return self.generator

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.noised_names = self.add_noise_transforms(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.draw_masks()

    # ------------------------------------------------------------------ checkpoint
    def _settings(self) -> dict[str, Any]:
        settings = {"p": self.p, "scheme": self.scheme, "block_size": self.block_size, "block_sizes": self.block_sizes,
                    "per_channel": self.per_channel}
        if self.scheme == "pq":
            settings["pq_gradient"] = self.pq_gradient
        return settings

    def state_dict(self) -> dict[str, Any]:
        if self.generator is not None:
            saved: Optional[tuple[str, torch.Tensor]] = (self.generator.device.type, self.generator.get_state())
        else:  # nothing drawn yet: what was loaded, if anything
            saved = self._saved_generator
        return {**self._settings(), "generator": saved[1] if saved else None,
                "generator_device": saved[0] if saved else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A pq checkpoint from before pq_gradient existed trained with the dropout gradient.
        defaults = {"pq_gradient": "dropout"}
        saved = {key: state_dict.get(key, defaults.get(key)) for key in self._settings()}
        if saved != self._settings():
            raise ValueError(f"QuantNoise: the checkpoint trained with {saved} but this callback has "
                             f"{self._settings()}; resuming would change the noise mid-run (start a new run from "
                             f"its weights instead)")
        state = state_dict.get("generator")
        # Checkpoints written before the generator moved to the weights' device drew on the CPU.
        self._saved_generator = None if state is None else (state_dict.get("generator_device") or "cpu", state)
        self.generator = None  # made again at the next draw, from this state

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        refuse_optimizer_state_of_untransformed_weights(checkpoint, pl_module, "QuantNoise")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # The model was trained for the integer grid: export it there, unless another transform
        # on the same weight decides its encoding (QAT's grid, a codebook in use). pq leaves the
        # export to the product quantization callback.
        if self.scheme == "pq":
            return
        for name in self.noised_names:
            module = pl_module.get_submodule(name)
            if any(t.decides_encoding() for t in weight_transforms(module)):
                continue
            record_codec(checkpoint, f"{name}.weight", self.scheme, QUANTIZE, bits=SCHEMES[self.scheme],
                         per_channel=self.per_channel)
