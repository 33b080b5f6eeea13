"""Iterative product quantization (iPQ; Stock et al. 2020, as used by Quant-Noise, Fan et al. 2020).

A weight (rows, columns) is cut into blocks of ``block_size`` consecutive columns within a row;
k-means learns ``centroids`` codewords (256: one byte per block) and every block is replaced by
its nearest codeword. Stage by stage (groups of layers, by default fairseq's order:
feed-forward, embeddings, attention), the callback quantizes a group, then training goes on:
the codewords (each one's gradient is the **mean** over the blocks assigned to it: fairseq's
PQLinear sums them) and the layers not quantized yet learn, with a fresh optimiser and
schedule per stage (``callbacks/_optimization.restart_optimization``). Stage ``s`` starts at
``start_step + s * steps_per_stage``; after the last stage, training fine-tunes every codebook.

Codebooks and assignments are model state: a ``CentroidWeight`` in the weight's transform
chain (``callbacks/_transforms.py``, stage CODEBOOK: after a pruning mask and Quant-Noise,
before fake quantization) holds the ``centroids`` parameter (k, block_size), the
``assignments`` buffer (rows, columns / block_size), the block counts and whether the layer is
quantized yet. The ordinary checkpoint carries them, so a run stopped in any stage resumes
exactly; the latent weight stays in the model, untouched. The checkpoint's ``compression``
entry tells ``nmt-lightning export`` to store uint8 assignments and fp16 (or int8) codebooks.

A module shared under several names (the tied embedding and output projection share one
parameter) gets one codebook. Under DDP the latent weights of quantized layers receive no
gradient: use ``strategy="ddp_find_unused_parameters_true"``; k-means runs on every rank on the
same weights with the same seed, so the codebooks are identical (a 2-process test checks it).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning as L
import torch
from torch import nn

from callbacks._arguments import glob_mapping, globs, integer, shown
from callbacks._optimization import restart_optimization
from callbacks._selection import BlockSizes, first_match, select_modules
from callbacks._transforms import (WeightTransform, add_weight_transform,
                                   refuse_optimizer_state_of_untransformed_weights, trainable_weight, weight_transforms)
from compression_contract.manifest import CODEBOOK, PERTURB, record_codec
from compression_contract.product_quantization import DEFAULT_BLOCK_SIZES, DEFAULT_STAGES, learn_codebook

__all__ = ["IterativeProductQuantization", "CentroidWeight", "DEFAULT_STAGES"]

OWNER = "IterativeProductQuantization"



class _GatherWithMeanGradient(torch.autograd.Function):
    """forward: centroids (k, d)[assignments (m,)] -> (m, d); backward: each centroid's gradient
    is the mean of its blocks' gradients (the sum divided by its block count)."""

    @staticmethod
    def forward(ctx: Any, centroids: torch.Tensor, assignments: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(assignments, counts)
        ctx.k = centroids.shape[0]
        return centroids[assignments]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        assignments, counts = ctx.saved_tensors
        sums = torch.zeros(ctx.k, grad.shape[1], dtype=grad.dtype, device=grad.device).index_add_(0, assignments, grad)
        return sums / counts.clamp(min=1).unsqueeze(1).to(grad.dtype), None, None


class CentroidWeight(WeightTransform):
    """The weight as codewords: block (r, j) = centroids[assignments[r, j]], once quantized."""

    stage = CODEBOOK

    def __init__(self, shape: torch.Size, block_size: int, k: int) -> None:
        super().__init__()
        rows, columns = shape
        self.block_size = block_size
        self.centroids = nn.Parameter(torch.zeros(k, block_size))
        self.register_buffer("assignments", torch.zeros(rows, columns // block_size, dtype=torch.long))
        self.register_buffer("counts", torch.zeros(k))
        self.register_buffer("quantized", torch.zeros((), dtype=torch.bool))
        self.active = False  # mirror of ``quantized`` read by forward (no device sync per call)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return weight
        blocks = _GatherWithMeanGradient.apply(self.centroids, self.assignments.flatten(), self.counts)
        return blocks.reshape(weight.shape).to(weight.dtype)

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor, iterations: int, generator: torch.Generator) -> None:
        """Learn the codebook of ``weight`` (rows, columns) and switch to it."""
        centroids, assignments = learn_codebook(weight, self.block_size, self.centroids.shape[0], iterations, generator)
        self.centroids.copy_(centroids)
        self.assignments.copy_(assignments)
        self.counts.copy_(torch.bincount(assignments.flatten(), minlength=len(self.counts)).float())
        self.quantized.fill_(True)
        self.active = True

    def decides_encoding(self) -> bool:
        return self.active

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.active = bool(self.quantized)

    def extra_repr(self) -> str:
        return f"k={self.centroids.shape[0]}, block_size={self.block_size}, quantized={self.active}"


class IterativeProductQuantization(L.Callback):
    """Quantize the selected weights group by group with product quantization, fine-tuning between.

    Args:
        steps_per_stage: training steps between two stages (each stage an equal share, as fairseq).
        stages: one list of module-name globs per stage (default: feed-forward, embeddings,
            attention of our Transformer); each must select at least one nn.Linear / nn.Embedding.
        start_step: global step of the first stage.
        centroids: codewords per codebook (256 = one byte per block); fewer where a weight has
            fewer blocks.
        block_size: columns per block (fairseq: 8 for feed-forward and embeddings, 4 for attention).
        block_sizes: glob -> block size, first match wins (default: 4 for ``*attn.*``).
        centroid_counts: glob -> codewords, first match wins, else ``centroids`` (a larger
            codebook where a layer needs it: 4096 codewords cost 12 bits a block in the export).
        exclude: globs of modules never quantized.
        kmeans_iterations: Lloyd iterations per codebook.
        centroid_bits: 16 (fp16 codebooks in the export) or 8 (int8 codebooks: "iPQ & int8"; the
            export then stores what stays dense in 8 bits too, biases and LayerNorm included).
        seed: seed of the k-means initialisation.
    """

    def __init__(
        self,
        steps_per_stage: int = 1000,
        stages: Sequence[Sequence[str]] = DEFAULT_STAGES,
        start_step: int = 0,
        centroids: int = 256,
        block_size: int = 8,
        block_sizes: Optional[dict[str, int]] = None,
        centroid_counts: Optional[dict[str, int]] = None,
        exclude: Sequence[str] = (),
        kmeans_iterations: int = 20,
        centroid_bits: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.steps_per_stage = integer(OWNER, "steps_per_stage", steps_per_stage, minimum=1)
        self.start_step = integer(OWNER, "start_step", start_step, minimum=0)
        self.centroids = integer(OWNER, "centroids", centroids, 1, 65536)
        self.centroid_counts = glob_mapping(OWNER, "centroid_counts", centroid_counts,
                                            lambda name, count: integer(OWNER, name, count, 1, 65536))
        self.kmeans_iterations = integer(OWNER, "kmeans_iterations", kmeans_iterations, minimum=1)
        if isinstance(centroid_bits, bool) or centroid_bits not in (8, 16):
            raise ValueError(f"{OWNER}: centroid_bits must be 16 (fp16 codebooks) or 8 (int8), got {shown(centroid_bits)}")
        self.centroid_bits = centroid_bits
        self.sizes = BlockSizes(OWNER, block_size, DEFAULT_BLOCK_SIZES if block_sizes is None else block_sizes)
        self.block_size, self.block_sizes = block_size, self.sizes.block_sizes
        if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or not stages:
            raise ValueError(f"{OWNER}: stages must be a non-empty list of lists of globs, e.g. [['*.ffn.*'], "
                             f"['*attn.*']], got {shown(stages)}")
        self.stages = [globs(OWNER, f"stages[{index}]", stage, allow_empty=False) for index, stage in enumerate(stages)]
        self.exclude = globs(OWNER, "exclude", exclude)
        self.seed = integer(OWNER, "seed", seed, 0, 2 ** 63 - 1)
        self._stage_targets: list[list[tuple[CentroidWeight, nn.Module, list[str]]]] = []

    # ------------------------------------------------------------------ structure
    def add_codebooks(self, root: nn.Module) -> None:
        """Put an (inactive) CentroidWeight on every weight of every stage (idempotent)."""
        owner = OWNER
        by_parameter: dict[int, CentroidWeight] = {}  # one codebook per tensor (tied weights share it)
        taken: set[int] = set()
        self._stage_targets = []
        for index, stage_globs in enumerate(self.stages):
            targets = []
            for module, names in select_modules(root, f"{owner} stage {index} {stage_globs}", stage_globs, self.exclude,
                                                required=False):
                if id(module) in taken:
                    continue  # an earlier stage has it
                taken.add(id(module))
                weight = trainable_weight(module)
                size = self.sizes.of(names[0], weight)
                transform = by_parameter.get(id(weight))
                if transform is None:
                    blocks = weight.numel() // size
                    count = first_match(names[0], self.centroid_counts, self.centroids)
                    transform = CentroidWeight(weight.shape, size, min(count, blocks)).to(weight.device)
                    by_parameter[id(weight)] = transform
                transform = add_weight_transform(module, transform)
                targets.append((transform, module, names))
            if not targets:
                raise ValueError(f"{owner}: stage {index} {stage_globs} selects no nn.Linear / nn.Embedding module "
                                 f"(not excluded and not taken by an earlier stage)")
            self._stage_targets.append(targets)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.add_codebooks(pl_module)

    # ------------------------------------------------------------------ stages
    @property
    def quantized_stages(self) -> int:
        """How many stages are on their codebooks now (0 before ``setup``)."""
        return sum(all(transform.active for transform, _, _ in targets) for targets in self._stage_targets)

    def stage_due(self, global_step: int) -> int:
        """How many stages should be quantized at ``global_step``."""
        if global_step < self.start_step:
            return 0
        return min(len(self.stages), (global_step - self.start_step) // self.steps_per_stage + 1)

    def quantize_stage(self, index: int) -> None:
        """Learn the codebooks of stage ``index`` from the current weights (masked, without noise)."""
        for position, (transform, module, _) in enumerate(self._stage_targets[index]):
            if transform.active:
                continue  # a tied weight quantized under another name
            weight = trainable_weight(module).detach()
            for step in weight_transforms(module):
                if step.stage < PERTURB:  # a pruning mask applies; noise does not
                    weight = step(weight)
            # Fixed per layer, whatever ran before; modulo 2**63 so that every accepted seed (up to
            # 2**63 - 1) gives a valid generator seed (the same value as before for seeds < 9e12).
            seed = (self.seed * 1_000_003 + index * 1009 + position) % 2 ** 63
            transform.quantize(weight, self.kmeans_iterations, torch.Generator().manual_seed(seed))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        due = self.stage_due(trainer.global_step)
        started = False
        for index in range(due):
            if not all(transform.active for transform, _, _ in self._stage_targets[index]):
                self.quantize_stage(index)
                started = True
        if started:
            restart_optimization(trainer)

    def quantize_post_training(self, module: nn.Module) -> dict[str, Any]:
        """iPQ without fine-tuning, the post-training baseline: codebooks of every stage at once,
        learnt from ``module``'s current weights. Returns the checkpoint entries (the compression
        manifest) to save beside ``module.state_dict()``, as a trained run's checkpoint has them."""
        self.add_codebooks(module)
        for index in range(len(self.stages)):
            self.quantize_stage(index)
        entries: dict[str, Any] = {}
        self.on_save_checkpoint(None, module, entries)
        return entries

    # ------------------------------------------------------------------ checkpoint
    def _settings(self) -> dict[str, Any]:
        return {"stages": self.stages, "centroids": self.centroids, "block_size": self.block_size,
                "block_sizes": self.block_sizes, "steps_per_stage": self.steps_per_stage, "start_step": self.start_step,
                "centroid_counts": self.centroid_counts or None}  # None: what checkpoints before it hold

    def state_dict(self) -> dict[str, Any]:
        return self._settings()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {key: state_dict.get(key) for key in self._settings()}
        if saved != self._settings():
            raise ValueError(f"IterativeProductQuantization: the checkpoint trained with {saved} but this callback "
                             f"has {self._settings()}; resuming would mix two schedules or codebook layouts")

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        refuse_optimizer_state_of_untransformed_weights(checkpoint, pl_module, "IterativeProductQuantization")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        for targets in self._stage_targets:
            for transform, module, names in targets:
                if not transform.active:
                    continue
                index = weight_transforms(module).index(transform)
                for name in names:
                    prefix = f"{name}.parametrizations.weight.{index}"
                    record_codec(checkpoint, f"{name}.weight", "ipq", CODEBOOK, block_size=transform.block_size,
                                 centroid_bits=self.centroid_bits, centroids=f"{prefix}.centroids",
                                 assignments=f"{prefix}.assignments")
