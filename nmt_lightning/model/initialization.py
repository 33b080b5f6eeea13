"""Starting a shallower student from a deeper teacher's layers (DistilBERT's initialisation).

Sanh et al. (2019) initialise DistilBERT by taking one layer out of two from BERT, plus its
embeddings; without it their student loses 3.69 GLUE points. Here the student keeps the
teacher's width (d_model, ffn_dim, heads, vocabulary, norm placement) and has fewer encoder
and/or decoder layers; the embeddings, the output projection and the final norms are copied
as they are, and student layer i of each stack is a copy of teacher layer ``layers[i]``.

``"every_other"`` takes layers 1, 3, 5, ... (0-based) of a teacher twice as deep: the top
teacher layer, the one whose output the final norm and the output projection were trained on,
is always kept. Any other choice is a list per stack. ``"none"`` copies no layer: the student's
blocks may then be shaped otherwise (a MobileBERT-style bottleneck student), and it starts
from the teacher's embeddings, output projection and final norms only.

A student with narrower embeddings than its teacher (``embedding_dim`` e < d_model) gets them
factorised: the teacher's table E (V, d) = U S V^T truncated to rank e, the student's table
U_e S_e^1/2 (V, e), the maps after the lookup sqrt(d/e) V_e S_e^1/2 (d, e) (the lookup is
scaled by sqrt(e) where the teacher's is by sqrt(d)) and the map before the output projection
S_e^1/2 V_e^T (e, d). Student and teacher then compute the same inputs and logits up to the
best rank-e approximation of E (Eckart-Young); MobileBERT's teacher has the student's narrow
embedding, so it copies it as it is.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Mapping, Sequence, Union

import torch

from nmt_lightning.model.transformer import Transformer

EVERY_OTHER = "every_other"
NO_LAYERS = "none"
LayerChoice = Union[str, Mapping[str, Sequence[int]], None]

# Fields a student may differ in from its teacher; all others must match for a weight copy.
_FREE_FIELDS = {"encoder_layers", "decoder_layers", "dropout", "attention_dropout", "activation_dropout",
                "embedding_dim", "max_positions"}
# ... and with no layer copied, what shapes the blocks too.
_FREE_WITHOUT_LAYERS = _FREE_FIELDS | {"ffn_dim", "heads", "bottleneck_dim", "stacked_ffn"}
# The tensors around the layers that carry the embedding width: (table, map after the lookup)
# for the inputs, and the output projection with the map before it.
_INPUT_TABLES = (("src_embed.weight", "encoder_embed_projection"), ("tgt_embed.weight", "decoder_embed_projection"))
_OUTPUT_TABLE = ("output_projection.weight", "output_down_projection")


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
    if choice == NO_LAYERS:
        return {}
    if isinstance(choice, str) or not isinstance(choice, Mapping):
        raise ValueError(f"init_layers must be '{EVERY_OTHER}', '{NO_LAYERS}' or a mapping like "
                         f"{{encoder: [1, 3, 5], decoder: [1, 3, 5]}}, got {choice!r}")
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


def _check_compatible(student: Transformer, teacher: Transformer, copies_layers: bool) -> None:
    mine, theirs = asdict(student.config), asdict(teacher.config)
    free = _FREE_FIELDS if copies_layers else _FREE_WITHOUT_LAYERS
    differing = sorted(k for k in mine if k not in free and mine[k] != theirs[k])
    if differing:
        what = "the teacher's layers do not fit the student" if copies_layers else "the teacher's embeddings do not fit the student"
        allowed = ("the number of layers, the embedding width and the dropout rates (init_layers="
                   f"'{NO_LAYERS}' copies no layer, for a student whose blocks are shaped otherwise)" if copies_layers
                   else "the number and shape of the blocks, the embedding width and the dropout rates")
        raise ValueError(f"{what}: they differ in "
                         + ", ".join(f"{k} (student {mine[k]!r}, teacher {theirs[k]!r})" for k in differing)
                         + f"; only {allowed} may differ")
    student_width, teacher_width = _embedding_width(student), _embedding_width(teacher)
    if student_width != teacher_width and (student_width > teacher_width or teacher_width != teacher.config.d_model):
        raise ValueError(f"the student's embeddings ({student_width} wide) can start from the teacher's only when "
                         f"they are as wide, or narrower than a teacher whose embeddings are d_model wide "
                         f"(the teacher's are {teacher_width}, its d_model {teacher.config.d_model})")


def _embedding_width(model: Transformer) -> int:
    return model.config.embedding_dim or model.config.d_model


def factorized_table(table: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """table (V, d) -> (left (V, rank), right (rank, d)), left @ right the best rank-``rank``
    approximation of table: its truncated SVD with the singular values split evenly
    (left = U S^1/2, right = S^1/2 V^T), computed in float64."""
    u, s, vh = torch.linalg.svd(table.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()


def _factorized_embeddings(student: Transformer,
                           teacher_state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, str]]:
    """{student tensor: (value, its source)}: the student's narrow tables and their maps from the
    teacher's full-width tables (module docstring). A table tied in the teacher is factorised once."""
    e, d = _embedding_width(student), student.config.d_model
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # storage of a teacher table -> its factors

    def factorized(table: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = teacher_state[table].data_ptr()
        if key not in factors:
            factors[key] = factorized_table(teacher_state[table], e)
        return factors[key]

    values: dict[str, tuple[torch.Tensor, str]] = {}
    for table, after_lookup in _INPUT_TABLES:
        left, right = factorized(table)
        source = f"rank-{e} factors of {table}"
        values[table] = (left, source)
        values[f"{after_lookup}.weight"] = (math.sqrt(d / e) * right.T, source)  # (d, e)
        values[f"{after_lookup}.bias"] = (torch.zeros(d), source)
    table, before_output = _OUTPUT_TABLE
    left, right = factorized(table)
    source = f"rank-{e} factors of {table}"
    values[table] = (left, source)  # the same tensor as tgt_embed's where they are tied (same teacher table)
    values[f"{before_output}.weight"] = (right, source)  # (e, d)
    return values


def initialize_from_teacher(student: Transformer, teacher: Transformer, layers: LayerChoice = None) -> dict[str, str]:
    """Copy the teacher's weights into ``student`` in place; returns {student name: teacher source}
    for every tensor copied (with layers, the whole student state_dict; with ``"none"`` all but
    the layers, which keep their initialisation)."""
    picked = chosen_layers(student, teacher, layers)
    _check_compatible(student, teacher, copies_layers=bool(picked))
    teacher_state = teacher.state_dict()
    factorized = (_factorized_embeddings(student, teacher_state)
                  if _embedding_width(student) != _embedding_width(teacher) else {})
    source_of: dict[str, str] = {}
    for name in student.state_dict():
        stack, _, rest = name.partition("_layers.")
        if rest and stack in ("encoder", "decoder"):
            if stack in picked:
                index, _, tail = rest.partition(".")
                source_of[name] = f"{stack}_layers.{picked[stack][int(index)]}.{tail}"
        elif name in factorized:
            source_of[name] = factorized[name][1]
        else:
            source_of[name] = name
    missing = sorted(source for name, source in source_of.items() if name not in factorized and source not in teacher_state)
    if missing:
        raise ValueError(f"the teacher has no tensor {missing[0]}")
    with torch.no_grad():
        student.load_state_dict({name: factorized[name][0] if name in factorized else teacher_state[source].clone()
                                 for name, source in source_of.items()}, strict=bool(picked))
    return source_of
