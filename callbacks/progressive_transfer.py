"""Layer-wise knowledge transfer into a deep, thin student (MobileBERT, Sun et al. 2020).

The student has the teacher's depth and, between its blocks, the teacher's width (its blocks
narrow to a bottleneck inside), so each student layer can learn from the teacher's layer of the
same index (or, with ``teacher_layers``, from a chosen one, for a shallower student):

- feature-map transfer: the squared error between the two layers' outputs, each first
  normalised over its width (parameter-free LayerNorm, as the TensorFlow Model Garden does),
  averaged over positions;
- attention transfer: KL(teacher || student) between the layers' attention distributions,
  per query position, averaged over heads and positions; for an encoder layer its
  self-attention, for a decoder layer its self-attention and its cross-attention.

Modes (the paper's Table 7 compares them):

- ``progressive`` (PKT): one stage per layer, ``stage_steps`` optimiser steps each, encoder
  layers first, then decoder layers (a decoder layer reads the finished encoder): stage l trains
  layer l alone on its transfer losses, everything else held fixed (the layers below already
  learnt theirs; the side's embeddings train in its first stage). Then a distillation stage to
  the end of the fit.
- ``joint`` (JKT): one transfer stage of the same total length in which every layer learns
  from every transfer loss at once, then the distillation stage.
- ``auxiliary`` (AKT): a single stage from the start, the transfer losses added to the
  distillation loss.

The distillation stage trains everything on ``hard_weight`` x the module's label-smoothed
cross-entropy plus ``soft_weight`` x the word-level soft-target loss (``temperature``); the
Model Garden mixes gold labels and the teacher's distribution half and half, the defaults here.
During transfer stages the module's own loss has weight 0. Every stage change restarts the
optimiser and the learning-rate schedule (``callbacks/_optimization.py``).

The stage is a function of the optimiser step, and the callback's state (the stage applied,
the parameters held fixed) is saved with the checkpoint, so a run stopped in any stage resumes
exactly where an uninterrupted run would be. With ``copy_embeddings`` the student starts from
the teacher's embedding tables where the shapes agree (MobileBERT copies them), at ``setup``,
so a resumed run's checkpoint replaces them.

The LightningModule follows the protocol of ``callbacks/knowledge_distillation.py``
(``register_loss_term`` / ``remove_loss_term`` / ``set_loss_weight``, a loss context with
``logits``, ``target_mask``, ``source_mask``, ``num_tokens`` and ``features``, a recorder whose
class has ``requesting(names)`` and fills ``encoder_states`` / ``decoder_states`` (index 0 the
embeddings, l the output of layer l) and the per-layer attention lists
``encoder_self_attention``, ``decoder_self_attention``, ``cross_attention``); ``layer_modules``
names the module lists holding each side's layers in student and teacher.

Under DDP no parameter goes without a gradient in a stage (the zero-weighted task loss still
reaches every parameter), so the default ``strategy="ddp"`` works.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
import torch
from torch import nn
import torch.nn.functional as F

from callbacks._arguments import flag, integer, one_of, shown
from callbacks._distillation import (check_teacher_inputs, check_temperature, check_weight, soft_target_loss,
                                     task_weight_of, teacher_inputs_of)
from callbacks._optimization import ParameterFreezer, matching_parameters, restart_optimization
from callbacks._teacher import FrozenTeacher
from compression_contract.protocols import TASK_LOSS, missing_members

__all__ = ["ProgressiveKnowledgeTransfer"]

OWNER = "ProgressiveKnowledgeTransfer"
MODES = ("progressive", "joint", "auxiliary")
SIDES = ("encoder", "decoder")
ATTENTION_KINDS = {"encoder": ("encoder_self_attention",), "decoder": ("decoder_self_attention", "cross_attention")}
FEATURE_TERM, ATTENTION_TERM, SOFT_TERM = "transfer_features", "transfer_attention", "transfer_soft"
DEFAULT_LAYER_MODULES = {"encoder": "model.encoder_layers", "decoder": "model.decoder_layers"}
DEFAULT_EMBEDDING_MODULES = {"encoder": ["model.src_embed", "model.encoder_embed_projection"],
                             "decoder": ["model.tgt_embed", "model.decoder_embed_projection"]}
_PROBABILITY_FLOOR = 1e-12  # log of a masked (zero) probability stays finite; its weight p_teacher is 0 there


def _module_name(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{OWNER}: {name} must be a qualified module name such as 'model.encoder_layers', "
                         f"got {shown(value)}")
    return value


def _module_names(name: str, value: Any) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or \
            not all(isinstance(item, str) and item for item in value):
        raise ValueError(f"{OWNER}: {name} must be a list of qualified module names, got {shown(value)}")
    return list(value)


def _layer_numbers(name: str, value: Any) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in value):
        raise ValueError(f"{OWNER}: {name} must be a non-empty list of teacher layer numbers (from 1), got {shown(value)}")
    return list(value)


def _side_mapping(name: str, value: Any, check: Any) -> dict[str, Any]:
    """A mapping 'encoder' / 'decoder' -> value (None: empty), each value checked by ``check(entry name, value)``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{OWNER}: {name} must be a mapping of 'encoder' / 'decoder' to values, got {shown(value)}")
    unknown = [key for key in value if key not in SIDES]
    if unknown:
        raise ValueError(f"{OWNER}: {name} keys must be 'encoder' / 'decoder', got {shown(unknown)}")
    return {side: check(f"{name}[{side!r}]", item) for side, item in value.items()}


class _Stage:
    """One stage: the layers whose transfer losses count (side, layer index from 1), whether the
    distillation loss counts, and the parameter globs that learn (None: all)."""

    def __init__(self, layers: list[tuple[str, int]], distill: bool, trainable: Optional[list[str]]) -> None:
        self.layers, self.distill, self.trainable = layers, distill, trainable

    # pragma: no mutate start  (wording of messages only: docs/mutation_testing.md)
    def describe(self) -> str:
        parts = [f"transfer of {side} layer {index}" for side, index in self.layers[:2]]
        if len(self.layers) > 2:
            parts[-1] += f" ... ({len(self.layers)} layers)"
        return " + ".join(parts + (["distillation"] if self.distill else []))
    # pragma: no mutate end


class ProgressiveKnowledgeTransfer(L.Callback):
    """Train a deep, thin student layer by layer from a teacher of the same depth (see module docstring).

    Args:
        teacher: path of the teacher's checkpoint (same depth, same width between blocks).
        teacher_loader: optional dotted path of a callable ``path -> nn.Module`` (as in
            KnowledgeDistillation).
        mode: ``progressive`` (PKT), ``joint`` (JKT) or ``auxiliary`` (AKT).
        stage_steps: optimiser steps per layer stage (JKT: the transfer stage lasts
            stage_steps x layers, the same budget); the rest of the fit is the distillation stage.
        feature_weight: weight of the normalised feature-map squared error (the Model Garden: 100).
        attention_weight: weight of the attention KL (0: feature maps only).
        soft_weight, hard_weight, temperature: the distillation stage's loss (and AKT's).
        sides: which stacks to transfer, ``["encoder", "decoder"]`` by default.
        layer_modules: side -> qualified name of the module list holding that side's layers, in
            student and teacher alike.
        embedding_modules: side -> qualified module names trained with the side's first layer
            (PKT) and, with ``copy_embeddings``, copied from the teacher where shapes agree.
        copy_embeddings: start the student's embeddings from the teacher's.
        teacher_layers: side -> the teacher layer (from 1) each student layer learns from, for a
            shallower student (the Model Garden's ``transfer_teacher_layers``), e.g.
            ``{encoder: [2, 4, 6], decoder: [2, 4, 6]}``; default: layer l from layer l.
        teacher_inputs: the batch fields the teacher's forward takes, in order.
    """

    def __init__(
        self,
        teacher: str,
        teacher_loader: Optional[str] = None,
        mode: str = "progressive",
        stage_steps: int = 1000,
        feature_weight: float = 100.0,
        attention_weight: float = 1.0,
        soft_weight: float = 0.5,
        hard_weight: float = 0.5,
        temperature: float = 1.0,
        sides: Sequence[str] = SIDES,
        layer_modules: Optional[Mapping[str, str]] = None,
        embedding_modules: Optional[Mapping[str, Sequence[str]]] = None,
        copy_embeddings: bool = True,
        teacher_layers: Optional[Mapping[str, Sequence[int]]] = None,
        teacher_inputs: Sequence[Union[str, int]] = ("source", "decoder_input"),
    ) -> None:
        self.mode = one_of(OWNER, "mode", mode, MODES)
        self.stage_steps = integer(OWNER, "stage_steps", stage_steps, minimum=1)
        self.temperature = check_temperature(OWNER, temperature)
        self.feature_weight = check_weight(OWNER, "feature_weight", feature_weight)
        self.attention_weight = check_weight(OWNER, "attention_weight", attention_weight)
        self.soft_weight = check_weight(OWNER, "soft_weight", soft_weight)
        self.hard_weight = check_weight(OWNER, "hard_weight", hard_weight)
        if self.feature_weight == 0 and self.attention_weight == 0:
            raise ValueError(f"{OWNER}: feature_weight and attention_weight are both 0, so no layer would learn from "
                             f"the teacher; use KnowledgeDistillation for output-only KD")
        if self.soft_weight == 0 and self.hard_weight == 0:
            raise ValueError(f"{OWNER}: soft_weight and hard_weight are both 0, so the distillation stage would train "
                             f"on nothing")
        if isinstance(sides, (str, bytes)) or not isinstance(sides, Sequence) or not sides or \
                any(not isinstance(side, str) or side not in SIDES for side in sides) or len(set(sides)) != len(sides):
            raise ValueError(f"{OWNER}: sides must be a non-empty list of {list(SIDES)}, each once, got {shown(sides)}")
        self.sides = [side for side in SIDES if side in sides]  # encoder first: a decoder layer reads its output
        self.layer_modules = {**DEFAULT_LAYER_MODULES, **_side_mapping("layer_modules", layer_modules, _module_name)}
        # Both hold both sides: a side the argument leaves out keeps its default.
        self.embedding_modules = {**DEFAULT_EMBEDDING_MODULES,
                                  **_side_mapping("embedding_modules", embedding_modules, _module_names)}
        self.copy_embeddings = flag(OWNER, "copy_embeddings", copy_embeddings)
        self.teacher_layers = _side_mapping("teacher_layers", teacher_layers, _layer_numbers)
        self.teacher_inputs = check_teacher_inputs(OWNER, teacher_inputs)
        self.teacher = FrozenTeacher(teacher, teacher_loader, OWNER)
        self.depth: dict[str, int] = {}
        self.mapping: dict[str, list[int]] = {}  # side -> the teacher layer of student layer l at [l - 1]
        self.stages: list[_Stage] = []
        self.stage: Optional[int] = None  # the stage applied (restored from a checkpoint on resume)
        self.freezer = ParameterFreezer()
        self._pass: Optional[tuple[Any, Any, Any]] = None  # (batch, teacher logits, teacher features)
        self._previous_task_weight: Optional[float] = None
        self._applied_this_fit = False

    # ------------------------------------------------------------------ the schedule
    def _build_stages(self) -> list[_Stage]:
        layers = [(side, index) for side in self.sides for index in range(1, self.depth[side] + 1)]
        if self.mode == "auxiliary":
            return [_Stage(layers, distill=True, trainable=None)]
        if self.mode == "joint":
            return [_Stage(layers, distill=False, trainable=None), _Stage([], distill=True, trainable=None)]
        stages = []
        for side, index in layers:
            trainable = [f"{self.layer_modules[side]}.{index - 1}.*"]
            if index == 1:
                trainable += [f"{name}.*" for name in self.embedding_modules[side]]
            stages.append(_Stage([(side, index)], distill=False, trainable=trainable))
        return stages + [_Stage([], distill=True, trainable=None)]

    @property
    def transfer_steps(self) -> int:
        """Optimiser steps before the distillation stage (0 for AKT, which has no such boundary)."""
        return 0 if self.mode == "auxiliary" else self.stage_steps * sum(self.depth[side] for side in self.sides)

    def stage_at(self, step: int) -> int:
        """The stage index of optimiser step ``step``."""
        if self.mode == "auxiliary":
            return 0
        if self.mode == "joint":
            return 0 if step < self.transfer_steps else 1
        return min(step // self.stage_steps, len(self.stages) - 1)

    # ------------------------------------------------------------------ set-up
    def _depth(self, module: nn.Module, side: str, whose: str) -> int:
        name = self.layer_modules[side]
        try:
            layers = module.get_submodule(name)
        except AttributeError:
            raise ValueError(f"ProgressiveKnowledgeTransfer: the {whose} has no module {name!r} holding its {side} "
                             f"layers (set layer_modules)") from None
        if not isinstance(layers, (nn.ModuleList, nn.Sequential)):
            raise ValueError(f"ProgressiveKnowledgeTransfer: the {whose}'s {name} is a {type(layers).__name__}, not a "
                             f"list of layers")
        return len(layers)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        teacher = self.teacher.load(pl_module)
        if stage != "fit":
            return
        for side in self.sides:
            mine, theirs = self._depth(pl_module, side, "student"), self._depth(teacher, side, "teacher")
            chosen = self.teacher_layers.get(side)
            if chosen is None and mine != theirs:
                raise ValueError(f"ProgressiveKnowledgeTransfer: the student's {side} has {mine} layers and the teacher "
                                 f"{self.teacher.checkpoint}'s {theirs}; layer-wise transfer maps layer l to layer l "
                                 f"unless teacher_layers names the teacher layer of each student layer")
            if chosen is not None and (len(chosen) != mine or not all(1 <= i <= theirs for i in chosen)):
                raise ValueError(f"ProgressiveKnowledgeTransfer: teacher_layers[{side!r}] = {chosen} must name one "
                                 f"teacher layer (1..{theirs}) for each of the student's {mine} {side} layers")
            self.depth[side] = mine
            self.mapping[side] = list(chosen) if chosen is not None else list(range(1, mine + 1))
        self.stages = self._build_stages()
        patterns = [f"{name}.*" for side in self.sides for name in self.embedding_modules[side]]
        if patterns and not matching_parameters(pl_module, patterns):
            raise ValueError(f"{OWNER}: embedding_modules {self.embedding_modules} name no parameter of the "
                             f"{type(pl_module).__name__}, so its embeddings would stay frozen through every layer "
                             f"stage; name the modules holding them, or give empty lists to train them only in the "
                             f"distillation stage")
        if self.copy_embeddings:
            self._copy_embeddings(pl_module, teacher)

    def _copy_embeddings(self, student: nn.Module, teacher: nn.Module) -> None:
        """The teacher's embedding parameters into the student where name and shape agree. Runs
        in setup, before a checkpoint is restored: a resumed run keeps its trained tables."""
        patterns = [f"{name}.*" for side in self.sides for name in self.embedding_modules[side]]
        mine, theirs = dict(student.named_parameters()), dict(teacher.named_parameters())
        copied = []
        with torch.no_grad():
            for name in matching_parameters(student, patterns):
                parameter = mine[name]
                if name in theirs and theirs[name].shape == parameter.shape:
                    parameter.copy_(theirs[name])
                    copied.append(name)
        rank_zero_info(f"ProgressiveKnowledgeTransfer: copied the teacher's {', '.join(copied)}" if copied else
                       "ProgressiveKnowledgeTransfer: no embedding parameter of the teacher has the student's shape; "
                       "the student's embeddings keep the module's own initialisation (nmt_lightning's "
                       "init_from with init_layers: none starts narrower ones from the teacher's, factorised)")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.teacher.attach(pl_module)
        missing = missing_members(pl_module, ("register_loss_term", "remove_loss_term", "set_loss_weight"))
        if missing:
            raise TypeError(f"ProgressiveKnowledgeTransfer needs the LightningModule to offer {', '.join(missing)} "
                            f"(the loss extension point, see callbacks/knowledge_distillation.py); "
                            f"{type(pl_module).__name__} lacks it")
        if self.mode != "auxiliary" and trainer.max_steps != -1 and trainer.max_steps <= self.transfer_steps:
            # A warning, not an error: a run may be split into pieces resumed from checkpoints.
            rank_zero_warn(f"ProgressiveKnowledgeTransfer: the transfer stages take {self.transfer_steps} steps "
                           f"(stage_steps={self.stage_steps} x {self.transfer_steps // self.stage_steps} layers) but "
                           f"max_steps={trainer.max_steps}: this fit ends before the distillation stage")
        self._previous_task_weight = task_weight_of(pl_module, TASK_LOSS)
        self._applied_this_fit = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches:
            return  # inside an update: the stage changes only between optimiser steps
        target = self.stage_at(trainer.global_step)
        if self._applied_this_fit and target == self.stage:
            return
        # A resumed run re-applies the stage of its checkpoint without a restart (the optimiser
        # state restored is that stage's); a new stage restarts the optimiser.
        self._enter(trainer, pl_module, target, restart=self.stage is not None and target != self.stage)

    def _enter(self, trainer: L.Trainer, pl_module: L.LightningModule, index: int, restart: bool) -> None:
        """Apply stage ``index``: its loss terms, its frozen parameters, and (on a change) fresh optimisers."""
        stage = self.stages[index]
        for name in (FEATURE_TERM, ATTENTION_TERM, SOFT_TERM):
            pl_module.remove_loss_term(name)
        if stage.layers and self.feature_weight > 0:
            pl_module.register_loss_term(FEATURE_TERM, self._feature_loss, self.feature_weight, features=("hidden_states",))
        if stage.layers and self.attention_weight > 0:
            pl_module.register_loss_term(ATTENTION_TERM, self._attention_loss, self.attention_weight,
                                         features=("attention",))
        if stage.distill and self.soft_weight > 0:
            pl_module.register_loss_term(SOFT_TERM, self._soft_loss, self.soft_weight)
        pl_module.set_loss_weight(TASK_LOSS, self.hard_weight if stage.distill else 0.0)
        if stage.trainable is None:
            self.freezer.release()
        else:
            learning = set(matching_parameters(pl_module, stage.trainable))
            if not learning:
                raise ValueError(f"ProgressiveKnowledgeTransfer: no parameter matches {stage.trainable} "
                                 f"(layer_modules={self.layer_modules}, embedding_modules={self.embedding_modules})")
            self.freezer.freeze(pl_module, [name for name, _ in pl_module.named_parameters() if name not in learning])
        if restart:
            restart_optimization(trainer)
        if restart or self.stage is None:
            rank_zero_info(f"ProgressiveKnowledgeTransfer: stage {index + 1}/{len(self.stages)} from step "
                           f"{trainer.global_step}: {stage.describe()}")
        self.stage = index
        self._applied_this_fit = True

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self.freezer.drop_gradients(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._pass = None
        if self.stage is not None:
            pl_module.log("transfer/stage", float(self.stage), batch_size=1)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name in (FEATURE_TERM, ATTENTION_TERM, SOFT_TERM):
            pl_module.remove_loss_term(name)
        if self._previous_task_weight is not None:
            pl_module.set_loss_weight(TASK_LOSS, self._previous_task_weight)
        self.freezer.release()
        self._pass = None
        self._applied_this_fit = False

    def _schedule(self) -> dict[str, Any]:
        return {"mode": self.mode, "stage_steps": self.stage_steps, "sides": list(self.sides)}

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "schedule": self._schedule(), **self.freezer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("schedule", self._schedule())
        if saved != self._schedule():
            raise ValueError(f"ProgressiveKnowledgeTransfer: the checkpoint trained with {saved} but this callback has "
                             f"{self._schedule()}; resuming would jump between stages of two schedules")
        self.stage = state_dict.get("stage")
        self.freezer.load_state_dict(state_dict)

    # ------------------------------------------------------------------ the teacher's pass
    def _teacher_pass(self, context: Any) -> tuple[torch.Tensor, Any]:
        if self._pass is not None and self._pass[0] is context.batch:
            return self._pass[1], self._pass[2]
        stage, recorder = self.stages[self.stage], None
        if stage.layers:  # layer-wise losses read the teacher's per-layer features too
            if context.features is None or not hasattr(type(context.features), "requesting"):
                raise TypeError("ProgressiveKnowledgeTransfer: the module's loss context carries no per-layer "
                                "features (context.features with a requesting() constructor)")
            recorder = type(context.features).requesting(
                ["hidden_states"] + (["attention"] if self.attention_weight > 0 else []))
        inputs = teacher_inputs_of(OWNER, context.batch, self.teacher_inputs)
        output = self.teacher(*inputs, *([recorder] if recorder is not None else []))
        logits = getattr(output, "logits", output)
        if logits.shape != context.logits.shape:
            raise ValueError(f"ProgressiveKnowledgeTransfer: the teacher {self.teacher.checkpoint} gives logits of shape "
                             f"{tuple(logits.shape)} where the student's are {tuple(context.logits.shape)}: teacher and "
                             f"student must share the vocabulary and see the same batch")
        self._pass = (context.batch, logits, recorder)
        return logits, recorder

    def _positions(self, context: Any, side: str) -> torch.Tensor:
        return context.target_mask if side == "decoder" else context.source_mask

    # ------------------------------------------------------------------ the loss terms
    def _feature_loss(self, context: Any) -> torch.Tensor:
        """Mean over the stage's layers of the normalised squared error per position, times the batch's target tokens."""
        _, theirs = self._teacher_pass(context)
        layers = self.stages[self.stage].layers
        total = context.logits.new_zeros((), dtype=torch.float32)
        for side, index in layers:
            mask = self._positions(context, side)
            student = self._state(context.features, side, index, "student")[mask].float()  # (N, D)
            teacher = self._state(theirs, side, self.mapping[side][index - 1], "teacher")[mask].float()
            if student.shape[-1] != teacher.shape[-1]:
                raise ValueError(f"ProgressiveKnowledgeTransfer: the student's {side} layer {index} outputs width "
                                 f"{student.shape[-1]}, the teacher's {teacher.shape[-1]}; feature-map transfer needs "
                                 f"the student's d_model (inter-block width) equal to the teacher's")
            width = (student.shape[-1],)
            total = total + (F.layer_norm(student, width) - F.layer_norm(teacher, width)).pow(2).mean()
        return total / len(layers) * context.num_tokens

    def _attention_loss(self, context: Any) -> torch.Tensor:
        """Mean over the stage's attention maps of KL(teacher || student) per query, times the batch's target tokens."""
        _, theirs = self._teacher_pass(context)
        total, maps = context.logits.new_zeros((), dtype=torch.float32), 0
        for side, index in self.stages[self.stage].layers:
            queries = self._positions(context, side)
            for kind in ATTENTION_KINDS[side]:
                # (B, h, queries, keys) -> (N, h, keys) at the real query positions
                student = self._attention(context.features, kind, index, "student").transpose(1, 2)[queries]
                teacher = self._attention(theirs, kind, self.mapping[side][index - 1], "teacher").transpose(1, 2)[queries]
                if student.shape != teacher.shape:
                    raise ValueError(f"ProgressiveKnowledgeTransfer: {kind} of layer {index} has shape "
                                     f"{tuple(student.shape)} in the student and {tuple(teacher.shape)} in the teacher; "
                                     f"attention transfer needs the same number of heads")
                teacher = teacher.float()
                divergence = teacher * (teacher.clamp_min(_PROBABILITY_FLOOR).log()
                                        - student.float().clamp_min(_PROBABILITY_FLOOR).log())
                total, maps = total + divergence.sum(-1).mean(), maps + 1
        return total / max(maps, 1) * context.num_tokens

    def _soft_loss(self, context: Any) -> torch.Tensor:
        logits, _ = self._teacher_pass(context)
        return soft_target_loss(context.logits, logits, context.target_mask, self.temperature)

    @staticmethod
    def _state(features: Any, side: str, index: int, whose: str) -> torch.Tensor:
        states = getattr(features, f"{side}_states", None) or []
        if index >= len(states):
            raise ValueError(f"ProgressiveKnowledgeTransfer: the {whose}'s forward recorded {len(states)} {side} "
                             f"states, layer {index} is needed")
        return states[index]

    @staticmethod
    def _attention(features: Any, kind: str, index: int, whose: str) -> torch.Tensor:
        maps = getattr(features, kind, None) or []
        if index > len(maps):
            raise ValueError(f"ProgressiveKnowledgeTransfer: the {whose}'s forward recorded {len(maps)} {kind} maps, "
                             f"layer {index} is needed")
        return maps[index - 1]
