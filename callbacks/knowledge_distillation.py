"""Knowledge distillation from a frozen teacher: word-level soft targets and hidden-state cosine.

Word-level KD (Hinton et al. 2015; Kim & Rush 2016 for translation): at every target position
the student matches the teacher's temperature-softened distribution over the vocabulary,

    soft = T^2 * sum over target positions of KL(softmax(z_teacher / T) || softmax(z_student / T))

(T^2 keeps its gradient on the scale of the cross-entropy's as T grows; Hugging Face's
distillation script uses the same, with T = 2). DistilBERT's cosine loss (Sanh et al. 2019)
pulls chosen student hidden states towards the teacher's: 1 - cos(h_student, h_teacher) per
position, averaged over positions and over the mapped pairs. With both and the label-smoothed
cross-entropy this is DistilBERT's triple loss:

    hard_weight * CE + soft_weight * soft + hidden_weight * cosine        (all per target token)

The teacher is a checkpoint path (``FrozenTeacher``): frozen, eval mode, outside the student's
state_dict, optimiser and DDP wrapper. It runs once per training batch, without gradients,
inside the student's training step (so under the same autocast as the student).

The protocol a LightningModule must follow (nmt_lightning's TranslationModule does):

- ``register_loss_term(name, fn, weight, features)``: the module adds ``weight * fn(context)``
  to its training loss, where ``fn`` returns a sum over the batch's target positions, and
  ``remove_loss_term(name)``. ``set_loss_weight("cross_entropy", w)`` scales its own task loss
  (needed only when ``hard_weight != 1``).
- ``context.batch`` holds the teacher's inputs: ``teacher_inputs`` names them (dict keys, or
  tuple indices); the teacher is called as ``teacher(*inputs)`` and returns the logits (or an
  object with ``.logits``), shaped like ``context.logits`` (..., V).
- ``context.target_mask``: bool, True at the positions to distil (padding excluded).
- For the hidden-state loss only: ``context.features``, a per-layer recorder whose class has
  ``requesting(["hidden_states"])`` (the teacher is called with one as its last argument) and
  ``context.source_mask`` for encoder positions; ``hidden_size`` on student and teacher when
  their widths may differ (a learned projection then maps the student's states to the
  teacher's width; it trains with the student and is saved in its checkpoint beside the
  student's weights, not among them, so a resume continues it and the student's checkpoint
  still loads into the student's own class).
- Optionally ``tokenization`` on both modules: when both have one they must be equal (the same
  sentencepiece models), else the teacher's token ids would mean other words.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Mapping, Optional, Sequence, Union

import lightning as L
import torch
from torch import nn
import torch.nn.functional as F

from callbacks._arguments import shown
from callbacks._distillation import (check_teacher_inputs, check_temperature, check_weight, soft_target_loss,
                                     task_weight_of, teacher_inputs_of)
from callbacks._teacher import FrozenTeacher
from compression_contract.protocols import TASK_LOSS, missing_members

__all__ = ["KnowledgeDistillation", "HiddenStateProjection"]

SOFT_TERM, HIDDEN_TERM = "distill_soft", "distill_hidden"
PROJECTION_NAME = "distillation_projection"
PROJECTION_KEY = "distillation_projection_state"  # the checkpoint entry beside the student's state_dict
_FEATURE_KEY = re.compile(r"^(encoder|decoder)(_output|\.(\d+))$")
DEFAULT_LAYER_MAP = {"encoder_output": "encoder_output", "decoder_output": "decoder_output"}


class HiddenStateProjection(nn.Module):
    """One learned linear map per distilled layer pair, student width -> teacher width.

    A plain Parameter (not an nn.Linear) on purpose: compression callbacks select nn.Linear
    modules, and this training-only helper must never be quantized, pruned or exported."""

    def __init__(self, pairs: int, student_width: int, teacher_width: int) -> None:
        super().__init__()
        weight = torch.empty(pairs, teacher_width, student_width)
        for matrix in weight:
            nn.init.xavier_uniform_(matrix)
        self.weight = nn.Parameter(weight)  # (pairs, teacher width, student width)

    def forward(self, pair: int, states: torch.Tensor) -> torch.Tensor:  # (N, Ds) -> (N, Dt)
        return states @ self.weight[pair].t()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # The student's checkpoint keeps the projection beside its state_dict (see
        # KnowledgeDistillation.on_save_checkpoint): the module's load finds none and keeps the
        # current values, which the callback's on_load_checkpoint then replaces by the saved ones.
        state_dict.setdefault(f"{prefix}weight", self.weight.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args)


def _parse_layer_map(layer_map: Optional[Mapping[str, str]]) -> dict[str, str]:
    if layer_map is not None and not isinstance(layer_map, Mapping):
        raise ValueError(f"KnowledgeDistillation: layer_map must be a mapping of student state to teacher state, e.g. "
                         f"{{'decoder.3': 'decoder.6'}}, got {shown(layer_map)}")
    layer_map = dict(DEFAULT_LAYER_MAP if layer_map is None else layer_map)
    if not layer_map:
        raise ValueError("KnowledgeDistillation: layer_map is empty; give at least one student: teacher pair")
    for student_key, teacher_key in layer_map.items():
        keys = [_FEATURE_KEY.match(str(k)) for k in (student_key, teacher_key)]
        if not all(keys):
            raise ValueError(f"KnowledgeDistillation: layer_map entry {student_key!r}: {teacher_key!r} is not of the form "
                             f"'encoder.<i>' / 'decoder.<i>' (i = 0 for the embeddings, i = n after layer n) or "
                             f"'encoder_output' / 'decoder_output'")
        if keys[0].group(1) != keys[1].group(1):
            raise ValueError(f"KnowledgeDistillation: layer_map maps {student_key!r} to {teacher_key!r}: an encoder state "
                             f"can only be compared with an encoder state (positions differ), a decoder's with a decoder's")
    return layer_map


# pragma: no mutate start  (wording of messages only: docs/mutation_testing.md)
def _describe_tokenization(tokenization: Any) -> str:
    parts = [f"{getattr(tokenization, 'src_lang', '?')}->{getattr(tokenization, 'tgt_lang', '?')}"]
    for side in ("src_model", "tgt_model"):
        model = getattr(tokenization, side, None)
        if isinstance(model, (bytes, bytearray)):
            parts.append(f"{side} sha1 {hashlib.sha1(model).hexdigest()[:10]}")
    if hasattr(tokenization, "moses_normalize"):
        parts.append(f"moses_normalize={tokenization.moses_normalize}")
    return ", ".join(parts)
# pragma: no mutate end


class _TeacherPass:
    """The teacher's outputs for one batch: logits and, if asked, its per-layer features."""

    def __init__(self, batch: Any, logits: torch.Tensor, features: Any) -> None:
        self.batch, self.logits, self.features = batch, logits, features


class KnowledgeDistillation(L.Callback):
    """Distil a frozen teacher into the student being trained (see the module docstring).

    Args:
        teacher: path of the teacher's checkpoint (a Lightning checkpoint, or whatever
            ``teacher_loader`` reads).
        teacher_loader: optional dotted path of a callable ``path -> nn.Module`` (e.g.
            ``nmt_lightning.loading.load_translation_module`` to run an int8 export as the
            teacher); default: the student's class' ``from_checkpoint`` / ``load_from_checkpoint``.
        temperature: T > 0 of the softened distributions.
        soft_weight: weight of the word-level KD term.
        hard_weight: weight of the module's own task loss (label-smoothed cross-entropy);
            0 trains on the teacher alone.
        hidden_weight: weight of the hidden-state cosine loss (0: off).
        layer_map: student state -> teacher state for the cosine loss, e.g.
            ``{"decoder.3": "decoder.6", "encoder.3": "encoder.6"}`` (index 0 is the embeddings,
            n the output of layer n) or ``encoder_output`` / ``decoder_output`` (after the
            final norm); default: both outputs.
        teacher_inputs: the batch fields the teacher's forward takes, in order.
    """

    def __init__(
        self,
        teacher: str,
        teacher_loader: Optional[str] = None,
        temperature: float = 2.0,
        soft_weight: float = 0.5,
        hard_weight: float = 0.5,
        hidden_weight: float = 0.0,
        layer_map: Optional[dict[str, str]] = None,
        teacher_inputs: Sequence[Union[str, int]] = ("source", "decoder_input"),
    ) -> None:
        owner = "KnowledgeDistillation"
        self.temperature = check_temperature(owner, temperature)
        self.soft_weight = check_weight(owner, "soft_weight", soft_weight)
        self.hard_weight = check_weight(owner, "hard_weight", hard_weight)
        self.hidden_weight = check_weight(owner, "hidden_weight", hidden_weight)
        if self.soft_weight == 0 and self.hidden_weight == 0:
            raise ValueError("KnowledgeDistillation: soft_weight and hidden_weight are both 0, so nothing would be "
                             "distilled; set soft_weight > 0 (word-level KD) and/or hidden_weight > 0 (cosine loss)")
        self.layer_map = _parse_layer_map(layer_map)
        self.teacher_inputs = check_teacher_inputs(owner, teacher_inputs)
        self.teacher = FrozenTeacher(teacher, teacher_loader, owner)
        self._pass: Optional[_TeacherPass] = None
        self._previous_task_weight: Optional[float] = None

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        teacher = self.teacher.load(pl_module)
        if stage != "fit" or self.hidden_weight == 0:
            return
        # Structural: the projection must exist before the optimiser is built and before a
        # checkpoint is restored into the module, so it is added here, once.
        student_width, teacher_width = getattr(pl_module, "hidden_size", None), getattr(teacher, "hidden_size", None)
        if student_width is None or teacher_width is None or student_width == teacher_width:
            return
        existing = getattr(pl_module, PROJECTION_NAME, None)
        shape = (len(self.layer_map), teacher_width, student_width)
        if existing is not None:
            if tuple(existing.weight.shape) != shape:
                raise ValueError(f"KnowledgeDistillation: the module already holds a {PROJECTION_NAME} of shape "
                                 f"{tuple(existing.weight.shape)}, this layer_map needs {shape}")
            return
        pl_module.add_module(PROJECTION_NAME, HiddenStateProjection(len(self.layer_map), student_width, teacher_width))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        teacher = self.teacher.attach(pl_module)
        if getattr(pl_module, PROJECTION_NAME, None) is not None:
            getattr(pl_module, PROJECTION_NAME).to(pl_module.device)
        mine, theirs = getattr(pl_module, "tokenization", None), getattr(teacher, "tokenization", None)
        if mine is not None and theirs is not None and mine != theirs:
            raise ValueError(f"KnowledgeDistillation: the teacher {self.teacher.checkpoint} was trained with another "
                             f"tokenization than the student's data (teacher: {_describe_tokenization(theirs)}; "
                             f"student: {_describe_tokenization(mine)}): its token ids would mean other words. "
                             f"Prepare the student's data with the teacher's sentencepiece models "
                             f"(nmt-lightning prepare --bpe-from <the teacher's data directory>)")
        missing = missing_members(pl_module, ("register_loss_term", "remove_loss_term"))
        if self.hard_weight != 1.0 and missing_members(pl_module, ("set_loss_weight",)):
            missing.append("set_loss_weight (hard_weight != 1)")
        if missing:
            raise TypeError(f"KnowledgeDistillation needs the LightningModule to offer {', '.join(missing)}: the "
                            f"extension point through which a callback adds loss terms (see callbacks/"
                            f"knowledge_distillation.py for the protocol); {type(pl_module).__name__} lacks it")
        if self.hard_weight != 1.0:
            self._previous_task_weight = task_weight_of(pl_module, TASK_LOSS)
            pl_module.set_loss_weight(TASK_LOSS, self.hard_weight)
        if self.soft_weight > 0:
            pl_module.register_loss_term(SOFT_TERM, self._soft_loss, self.soft_weight)
        if self.hidden_weight > 0:
            pl_module.register_loss_term(HIDDEN_TERM, self._hidden_loss, self.hidden_weight, features=("hidden_states",))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name in (SOFT_TERM, HIDDEN_TERM):
            pl_module.remove_loss_term(name)
        if self._previous_task_weight is not None:
            pl_module.set_loss_weight(TASK_LOSS, self._previous_task_weight)
            self._previous_task_weight = None
        self._pass = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._pass = None  # the teacher's activations of this batch are no longer needed

    # ------------------------------------------------------------------ checkpoint
    # The width projection trains with the student but is not part of it: its weights travel
    # in the checkpoint beside the student's state_dict, not inside it, so the student's
    # checkpoint loads into its own class (and can be a teacher in turn), and a resumed run
    # gets them back before the state_dict is loaded into the module holding the projection.
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        moved = {key: state.pop(key) for key in [k for k in state if k.startswith(f"{PROJECTION_NAME}.")]}
        if moved:
            checkpoint[PROJECTION_KEY] = moved

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning has loaded the module's state by now (the projection kept its values, see
        # HiddenStateProjection._load_from_state_dict); the optimiser's state comes after this.
        moved = checkpoint.get(PROJECTION_KEY)
        projection = getattr(pl_module, PROJECTION_NAME, None)
        if moved and projection is not None:
            projection.load_state_dict({key[len(PROJECTION_NAME) + 1:]: value for key, value in moved.items()})

    # ------------------------------------------------------------------ the teacher's pass
    def _teacher_pass(self, context: Any) -> _TeacherPass:
        """Run the teacher on this batch once, however many terms read it."""
        if self._pass is not None and self._pass.batch is context.batch:
            return self._pass
        inputs = teacher_inputs_of("KnowledgeDistillation", context.batch, self.teacher_inputs)
        recorder = None
        if self.hidden_weight > 0:
            if context.features is None or not hasattr(type(context.features), "requesting"):
                raise TypeError("KnowledgeDistillation: hidden_weight > 0 needs the module's loss context to carry "
                                "per-layer features (context.features with a requesting() constructor)")
            recorder = type(context.features).requesting(["hidden_states"])
            inputs.append(recorder)
        output = self.teacher(*inputs)
        logits = getattr(output, "logits", output)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"KnowledgeDistillation: the teacher returned a {type(output).__name__}, neither logits "
                            f"nor an object with .logits")
        if logits.shape != context.logits.shape:
            raise ValueError(f"KnowledgeDistillation: the teacher {self.teacher.checkpoint} gives logits of shape "
                             f"{tuple(logits.shape)} where the student's are {tuple(context.logits.shape)}: "
                             f"teacher and student must share the vocabulary ({logits.shape[-1]} vs "
                             f"{context.logits.shape[-1]} entries) and see the same batch")
        self._pass = _TeacherPass(context.batch, logits, recorder)
        return self._pass

    # ------------------------------------------------------------------ the loss terms
    def _soft_loss(self, context: Any) -> torch.Tensor:
        """T^2 * sum over target positions of KL(teacher || student), in fp32."""
        teacher = self._teacher_pass(context)
        return soft_target_loss(context.logits, teacher.logits, context.target_mask, self.temperature)

    def _hidden_loss(self, context: Any) -> torch.Tensor:
        """Mean over pairs of the mean over positions of 1 - cos, times the batch's target tokens."""
        teacher = self._teacher_pass(context)
        projection = getattr(context.module, PROJECTION_NAME, None) if hasattr(context, "module") else None
        total = context.logits.new_zeros((), dtype=torch.float32)
        for pair, (student_key, teacher_key) in enumerate(self.layer_map.items()):
            side = student_key.split("_")[0].split(".")[0]
            mask = context.target_mask if side == "decoder" else getattr(context, "source_mask", None)
            if mask is None:
                raise TypeError("KnowledgeDistillation: an encoder state in layer_map needs context.source_mask")
            mine = self._state(context.features, student_key, "student")[mask].float()  # (N, Ds)
            theirs = self._state(teacher.features, teacher_key, "teacher")[mask].float()  # (N, Dt)
            if projection is not None:
                mine = projection(pair, mine)
            if mine.shape[-1] != theirs.shape[-1]:
                raise ValueError(f"KnowledgeDistillation: {student_key} has width {mine.shape[-1]} and the teacher's "
                                 f"{teacher_key} {theirs.shape[-1]}; give both modules a hidden_size attribute so a "
                                 f"projection between them is learned")
            total = total + (1.0 - F.cosine_similarity(mine, theirs, dim=-1)).mean()
        return total / len(self.layer_map) * context.num_tokens

    @staticmethod
    def _state(features: Any, key: str, whose: str) -> torch.Tensor:
        side, suffix, index = _FEATURE_KEY.match(key).groups()
        if index is None:
            state = getattr(features, f"{side}{suffix}", None)
            if state is None:
                raise ValueError(f"KnowledgeDistillation: the {whose}'s forward recorded no {key}")
            return state
        states = getattr(features, f"{side}_states", [])
        if int(index) >= len(states):
            raise ValueError(f"KnowledgeDistillation: layer_map names {key} of the {whose}, which has only "
                             f"{len(states)} {side} states (0 = embeddings .. {len(states) - 1} = last layer)")
        return states[int(index)]
