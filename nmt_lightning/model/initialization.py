"""Starting a shallower student from a deeper teacher's layers (DistilBERT's initialisation).

Sanh et al. (2019) initialise DistilBERT by taking one layer out of two from BERT, plus its
embeddings; without it their student loses 3.69 GLUE points. Here the student keeps the
teacher's width (d_model, ffn_dim, heads, vocabulary, norm placement) and has fewer encoder
and/or decoder layers; the embeddings, the output projection and the final norms are copied
as they are, and student layer i of each stack is a copy of teacher layer ``layers[i]``.

``"every_other"`` takes layers 1, 3, 5, ... (0-based) of a teacher twice as deep: the top
teacher layer, the one whose output the final norm and the output projection were trained on,
is always kept. Any other choice is a list per stack.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Mapping, Sequence, Union

import torch

from nmt_lightning.model.transformer import Transformer

EVERY_OTHER = "every_other"
LayerChoice = Union[str, Mapping[str, Sequence[int]], None]

# Fields a student may differ in from its teacher; all others must match for a weight copy.
_FREE_FIELDS = {"encoder_layers", "decoder_layers", "dropout", "attention_dropout", "activation_dropout"}


def every_other_layer(teacher_layers: int, student_layers: int, stack: str = "encoder") -> list[int]:
    """Layers 1, 3, 5, ... of a teacher stack twice the student's depth (or all of them at equal depth)."""
    if teacher_layers == student_layers:
        return list(range(student_layers))
    if teacher_layers != 2 * student_layers:
        raise ValueError(f"init_layers='{EVERY_OTHER}': the teacher's {stack} has {teacher_layers} layers, not twice "
                         f"the student's {student_layers}; give the layers to copy as a list, e.g. "
                         f"{{{stack}: {list(range(teacher_layers))[-student_layers:]}}}")
    return [2 * i + 1 for i in range(student_layers)]


def chosen_layers(student: Transformer, teacher: Transformer, choice: LayerChoice) -> dict[str, list[int]]:
    """``{"encoder": [...], "decoder": [...]}``: the teacher layer each student layer starts from."""
    depths = {"encoder": (teacher.config.encoder_layers, student.config.encoder_layers),
              "decoder": (teacher.config.decoder_layers, student.config.decoder_layers)}
    if choice is None or choice == EVERY_OTHER:
        return {stack: every_other_layer(t, s, stack) for stack, (t, s) in depths.items()}
    if isinstance(choice, str) or not isinstance(choice, Mapping):
        raise ValueError(f"init_layers must be '{EVERY_OTHER}' or a mapping like {{encoder: [1, 3, 5], decoder: [1, 3, 5]}}, "
                         f"got {choice!r}")
    unknown = set(choice) - set(depths)
    if unknown:
        raise ValueError(f"init_layers: unknown stack(s) {sorted(unknown)}; use 'encoder' and 'decoder'")
    layers = {}
    for stack, (teacher_depth, student_depth) in depths.items():
        picked = [int(i) for i in choice[stack]] if stack in choice else every_other_layer(teacher_depth, student_depth, stack)
        if len(picked) != student_depth:
            raise ValueError(f"init_layers['{stack}'] names {len(picked)} layers but the student's {stack} has {student_depth}")
        if any(not 0 <= i < teacher_depth for i in picked) or len(set(picked)) != len(picked):
            raise ValueError(f"init_layers['{stack}'] = {picked}: each must be a distinct layer index in "
                             f"[0, {teacher_depth}) of the teacher's {stack}")
        layers[stack] = picked
    return layers


def _check_compatible(student: Transformer, teacher: Transformer) -> None:
    mine, theirs = asdict(student.config), asdict(teacher.config)
    differing = sorted(k for k in mine if k not in _FREE_FIELDS and mine[k] != theirs[k])
    if differing:
        raise ValueError("the teacher's layers do not fit the student: they differ in "
                         + ", ".join(f"{k} (student {mine[k]!r}, teacher {theirs[k]!r})" for k in differing)
                         + "; only the number of layers and the dropout rates may differ")


def initialize_from_teacher(student: Transformer, teacher: Transformer, layers: LayerChoice = None) -> dict[str, str]:
    """Copy the teacher's weights into ``student`` in place; returns {student name: teacher name}
    for every tensor copied (the whole student state_dict, each tensor from exactly one source)."""
    _check_compatible(student, teacher)
    picked = chosen_layers(student, teacher, layers)
    teacher_state = teacher.state_dict()
    source_of: dict[str, str] = {}
    for name in student.state_dict():
        stack, _, rest = name.partition("_layers.")
        if stack in picked and rest:
            index, _, tail = rest.partition(".")
            source_of[name] = f"{stack}_layers.{picked[stack][int(index)]}.{tail}"
        else:
            source_of[name] = name
    missing = sorted(source for source in source_of.values() if source not in teacher_state)
    if missing:
        raise ValueError(f"the teacher has no tensor {missing[0]}")
    with torch.no_grad():
        student.load_state_dict({name: teacher_state[source].clone() for name, source in source_of.items()})
    return source_of

