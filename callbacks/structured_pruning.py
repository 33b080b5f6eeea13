"""Structured pruning: whole attention heads and feed-forward neurons removed while training.

Unstructured sparsity and iPQ make a file smaller, not a model faster: a matrix with zeros in
it takes as long to multiply. Removing a head takes rows out of its attention's query, key and
value projections and columns out of its output projection; removing a neuron takes a row out
of the first feed-forward layer and a column out of the second. The exported model then has
smaller matrices (``nmt-lightning export`` cuts them, see ``compression_contract.manifest``),
decodes faster with our decoder and in CTranslate2.

**Units.** An attention module is any module with ``nn.Linear`` children ``q_proj``, ``k_proj``,
``v_proj`` (whose output rows are ``heads x head_dim``) and ``out_proj``, and an integer
attribute ``heads``, ``num_heads``, ``n_heads`` or ``n_head`` (ours, and Hugging Face's
BART/Marian attention), or with one ``nn.Linear`` computing q, k and v (rows: three blocks of
``heads x head_dim``) and an output projection, ``qkv`` and ``proj`` (timm's ViT attention) or
``c_attn`` and ``c_proj`` (nanoGPT's); ``attention_layers`` names the four (or two) children
otherwise. A feed-forward block is any
module with ``nn.Linear`` children ``fc1`` and ``fc2`` (``feed_forward_layers`` names them
otherwise, e.g. ``["linear1", "linear2"]`` for ``nn.TransformerEncoderLayer``, ``["0", "2"]``
for an ``nn.Sequential``), the first's
outputs being the second's inputs. ``include``/``exclude`` globs over those modules' names
choose which are pruned. torch's own layers are found as they are: ``nn.MultiheadAttention``'s
heads (rows of its fused ``in_proj_weight``, columns of its ``out_proj``) and the ``linear1`` /
``linear2`` neurons of ``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer``. The
export cuts them all; an ``nn.MultiheadAttention`` cannot hold fewer heads of the same width, so
the loaded model has ``nmt_lightning.export.pruned_attention.PrunedMultiheadAttention`` in its
place (record ``fused_rows: "in_proj"``).

**Importance.** ``importance="taylor"`` is Michel et al.'s (2019) head importance, applied to
neurons too (Molchanov et al. 2017's first-order Taylor criterion): a gate ``xi_u`` multiplying
unit ``u``'s output, ``I_u = sum over sentences |dL/d xi_u|``, where ``dL/d xi_u`` is the unit's
output dotted with the loss gradient at that output, summed over the sentence's positions. It
is gathered from the gradients of the training steps since the previous pruning (no extra
passes), summed over DDP ranks at every optimiser step so every rank decides alike. An
``nn.MultiheadAttention`` never calls its ``out_proj`` as a module, so while importances are
gathered it is asked for its per-head attention probabilities (``need_weights=True,
average_attn_weights=False``; its caller still gets what it asked for) and the heads' outputs
are those probabilities times the heads' values.
``importance="magnitude"`` is the baseline: the L2 norm of the unit's rows and columns.

**Schedule.** As gradual magnitude pruning (Zhu & Gupta 2017): every ``frequency`` steps from
``start_step`` to ``end_step`` the fraction pruned follows ``f(t) = final * (1 - (1 - p) ** 3)``,
``p`` the progress, until ``prune_heads`` of the heads and ``prune_neurons`` of the neurons are
gone; training simply goes on (distillation alongside works: it is another callback).

**Scope.** ``scope="layer"`` prunes the same fraction in every module, so every attention keeps
the same number of heads: what CTranslate2 needs (one head count per encoder and one per
decoder). ``scope="global"`` ranks units across modules, after normalising each module's
importances by their L2 norm (Michel et al.), keeping at least one unit per module; our decoder
runs the uneven result, CTranslate2 refuses it.

**Masks.** A pruned unit is masked (a ``UnitMask`` weight transform, stage MASK, on each of its
layers): its rows and columns compute as zeros, so the training-time model equals the exported
one with the unit cut out. The masks are model buffers (the checkpoint carries them, DDP ranks
hold the same), the importances gathered so far are this callback's state: a run stopped
anywhere resumes exactly.

**Going on from a pruned model.** ``masks_from`` names a checkpoint of a pruning run (its
``compression_structure`` record): the units it removed are removed here from the first step,
e.g. for a fine-tuning phase after pruning (``init_from`` the same checkpoint copies its weights,
not its masks). Units already gone count toward the schedule's target, so a schedule that ends
at the fractions the checkpoint reached removes nothing more.

**Several instances.** Two or more ``StructuredPruning`` callbacks in one trainer prune
different modules at different fractions, e.g. the decoder harder than the encoder (beam search
runs the decoder once per output token): their ``include``/``exclude`` must select disjoint
modules (an overlap is refused, naming the module), each keeps its own state in the checkpoint
(``state_key`` names its selection), and with ``masks_from`` each adopts the units of its own
modules from the one checkpoint.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import lightning as L
import torch
from torch import nn

from callbacks._arguments import existing_file, globs, integer, number, one_of, shown
from callbacks._selection import matches
from callbacks._transforms import (MASK, WeightTransform, add_weight_transform, find_weight_transform,
                                   refuse_optimizer_state_of_untransformed_weights, trainable_weight, weight_transforms)
from compression_contract.checkpoints import read_checkpoint
from compression_contract.manifest import STRUCTURE_KEY, record_structure

__all__ = ["StructuredPruning", "UnitMask"]

OWNER = "StructuredPruning"
ATTENTION_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj")  # rows: q, k, v; columns: out
# One nn.Linear computing q, k and v (rows: 3 blocks of heads x head_dim), then the output projection:
# timm's ViT attention, nanoGPT's. Found with the default attention_layers, like ATTENTION_LAYERS.
FUSED_ATTENTION_LAYERS = (("qkv", "proj"), ("c_attn", "c_proj"))
FEED_FORWARD_LAYERS = ("fc1", "fc2")  # rows: the first; columns: the second
TORCH_FEED_FORWARD_LAYERS = ("linear1", "linear2")  # nn.TransformerEncoderLayer's and DecoderLayer's
COUNT_ATTRIBUTES = ("heads", "num_heads", "n_heads", "n_head")
FUSED_QKV = "in_proj"  # nn.MultiheadAttention's in_proj_weight (3 * embed_dim, embed_dim) and in_proj_bias
MHA_ARGUMENTS = tuple(inspect.signature(nn.MultiheadAttention.forward).parameters)[1:]  # query, key, value, ...


class UnitMask(WeightTransform):
    """``weight`` with the rows (``axis=0``) or columns (``axis=1``) of dropped units zeroed.

    ``keep`` (units,): 1 keeps a unit, 0 drops it; unit ``u`` spans ``width`` consecutive rows or
    columns, in each of ``blocks`` stacked blocks (3 for a fused q/k/v weight, (3 * units * width,
    in)). Each layer of a unit group holds its own copy (a buffer shared between modules would be
    copied apart by ``model.to(device)``); ``UnitGroup.set_keep`` writes them all."""

    stage = MASK

    def __init__(self, keep: torch.Tensor, width: int, axis: int, blocks: int = 1) -> None:
        super().__init__()
        self.register_buffer("keep", keep)
        self.width, self.axis, self.blocks = width, axis, blocks

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = self.keep.to(weight.dtype).repeat_interleave(self.width).repeat(self.blocks)  # (blocks * units * width,)
        return weight * (mask[:, None] if self.axis == 0 else mask[None, :])


@dataclass(frozen=True)
class UnitTensor:
    """One weight holding a group's units: ``owner.<tensor>`` (and its bias ``owner.<bias>`` for
    rows), the units along ``axis`` in ``blocks`` stacked blocks."""

    owner: nn.Module
    tensor: str
    bias: Optional[str]
    axis: int
    blocks: int = 1


@dataclass
class UnitGroup:
    """The units of one module: its heads (``kind="heads"``) or its neurons (``"neurons"``)."""

    name: str  # the module's qualified name
    kind: str
    module: nn.Module
    rows: tuple[str, ...]  # children whose output rows hold the units
    columns: tuple[str, ...]  # children whose input columns hold the units
    width: int  # rows per unit: head_dim, or 1 for a neuron
    count_attribute: Optional[str]  # "heads" / "num_heads", or None
    fused_rows: Optional[str] = None  # FUSED_QKV: the module's own q/k/v rows (nn.MultiheadAttention)
    row_blocks: int = 1  # 3 where one ``rows`` child computes q, k and v (its rows: 3 blocks of units)
    pending: Optional[torch.Tensor] = None  # importance of the current optimiser step (units,)

    def masks(self) -> list[UnitMask]:
        """The UnitMask of each of the group's weights, looked up afresh: ``model.to(device)``
        replaces buffers, so a tensor kept from before would go stale."""
        return [find_weight_transform(t.owner, UnitMask, t.tensor) for t in self.tensors()]

    @property
    def keep(self) -> torch.Tensor:
        """(units,): 1 for a unit kept (the first layer's copy; every layer holds the same)."""
        return self.masks()[0].keep

    @torch.no_grad()
    def set_keep(self, keep: torch.Tensor) -> None:
        for mask in self.masks():
            mask.keep.copy_(keep.to(mask.keep.device))

    @property
    def units(self) -> int:
        return int(self.keep.numel())

    def tensors(self) -> list[UnitTensor]:
        """Every weight the units live in: the rows first, then the columns."""
        fused = ([UnitTensor(self.module, f"{self.fused_rows}_weight", f"{self.fused_rows}_bias", 0, 3)]
                 if self.fused_rows else [])
        return (fused + [UnitTensor(getattr(self.module, child), "weight", "bias", 0, self.row_blocks)
                         for child in self.rows]
                + [UnitTensor(getattr(self.module, child), "weight", None, 1) for child in self.columns])

    def magnitudes(self) -> torch.Tensor:
        """(units,): the L2 norm of each unit's rows and columns (as trained, before any transform)."""
        squares = torch.zeros(self.units, dtype=torch.float64, device=self.keep.device)
        for unit_tensor in self.tensors():
            weight = trainable_weight(unit_tensor.owner, unit_tensor.tensor).detach().double()
            per_row = weight.pow(2).sum(1 - unit_tensor.axis)  # (blocks * units * width,)
            squares += per_row.view(unit_tensor.blocks, self.units, self.width).sum((0, 2))
            bias = getattr(unit_tensor.owner, unit_tensor.bias) if unit_tensor.bias else None
            if bias is not None:
                squares += bias.detach().double().pow(2).view(unit_tensor.blocks, self.units, self.width).sum((0, 2))
        return squares.sqrt()


def _count_attribute(module: nn.Module) -> Optional[str]:
    return next((name for name in COUNT_ATTRIBUTES if isinstance(getattr(module, name, None), int)
                 and not isinstance(getattr(module, name), bool)), None)


def _child_names(name: str, value: Any, counts: tuple[int, ...]) -> tuple[str, ...]:
    """One of ``counts`` distinct child names (an attribute, or an index of an nn.Sequential: "0"), as a tuple."""
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) not in counts or \
            not all(isinstance(item, str) and item and "." not in item for item in value) or len(set(value)) != len(value):
        count = " or ".join(map(str, counts))
        raise ValueError(f"{OWNER}: {name} must be a list of {count} distinct child names, got {shown(value)}")
    return tuple(value)


def _children_are_linear(module: nn.Module, names: Sequence[str]) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Linear) for name in names)


def attention_layouts(attention_layers: Sequence[str]) -> list[tuple[str, ...]]:
    """The children names an attention module is looked for with: ``attention_layers``, and with
    the default ones also the fused q/k/v layouts (FUSED_ATTENTION_LAYERS)."""
    layouts = [tuple(attention_layers)]
    return layouts + list(FUSED_ATTENTION_LAYERS) if layouts[0] == ATTENTION_LAYERS else layouts


def find_unit_groups(root: nn.Module, include: Sequence[str], exclude: Sequence[str], kinds: Sequence[str],
                     attention_layers: Sequence[str] = ATTENTION_LAYERS,
                     feed_forward_layers: Sequence[str] = FEED_FORWARD_LAYERS) -> list[UnitGroup]:
    """Every attention module (``"heads"`` in kinds) and feed-forward block (``"neurons"``) of
    ``root`` selected by the globs, in ``named_modules`` order."""
    layouts = attention_layouts(attention_layers)
    first, second = feed_forward_layers
    groups = []
    for name, module in root.named_modules():
        if not matches(name, include) or matches(name, exclude):
            continue
        layout = next((names for names in layouts if _children_are_linear(module, names)), None)
        if "heads" in kinds and isinstance(module, nn.MultiheadAttention):
            groups.append(_multihead_attention_group(name, module))
        elif "heads" in kinds and layout is not None:
            group = _attention_group(name, module, layout)
            if group is not None:
                groups.append(group)
        elif "neurons" in kinds:
            pair = (first, second)
            if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) \
                    and tuple(feed_forward_layers) == FEED_FORWARD_LAYERS:
                pair = TORCH_FEED_FORWARD_LAYERS  # torch's own layers, found without naming them
            if not _children_are_linear(module, pair) or \
                    getattr(module, pair[0]).out_features != getattr(module, pair[1]).in_features:
                continue
            groups.append(UnitGroup(name, "neurons", module, (pair[0],), (pair[1],), 1, None))
    return groups


def _attention_group(name: str, module: nn.Module, layout: Sequence[str]) -> Optional[UnitGroup]:
    """The heads of an attention with nn.Linear children ``layout``: q, k, v and output projections,
    or one projection computing q, k and v (3 blocks of rows) and the output projection; None
    without an integer head count."""
    attribute = _count_attribute(module)
    if attribute is None:
        return None
    *rows, columns = layout
    heads = getattr(module, attribute)
    inner = getattr(module, columns).in_features
    blocks = 3 if len(rows) == 1 else 1
    outputs = {getattr(module, child).out_features for child in rows}
    if heads < 1 or outputs != {blocks * inner} or inner % heads:
        what = (f"a q/k/v projection of {outputs.pop()} outputs" if blocks == 3 else
                f"q/k/v projections of {sorted(outputs)} outputs")
        raise ValueError(f"{OWNER}: {name} has {what} and an output projection of {inner} inputs for "
                         f"{attribute}={heads}; heads can only be removed where q, k and v each hold heads x "
                         f"head_dim (no grouped keys and values)")
    return UnitGroup(name, "heads", module, tuple(rows), (columns,), inner // heads, attribute, row_blocks=blocks)


def _multihead_attention_group(name: str, module: nn.MultiheadAttention) -> UnitGroup:
    """The heads of a torch.nn.MultiheadAttention: rows of its fused q/k/v weight, columns of its
    out_proj; refused where its keys and values are not plain per-head projections."""
    if not module._qkv_same_embed_dim or module.in_proj_weight is None:
        raise ValueError(f"{OWNER}: {name} is a torch.nn.MultiheadAttention with kdim/vdim other than embed_dim "
                         f"(separate q/k/v weights): its heads are not supported; prune_heads=0 prunes neurons only, "
                         f"or exclude=['{name}']")
    if module.bias_k is not None or module.add_zero_attn:
        raise ValueError(f"{OWNER}: {name} is a torch.nn.MultiheadAttention with add_bias_kv or add_zero_attn, whose "
                         f"extra key/value position its heads' pruning does not handle; prune_heads=0 prunes neurons "
                         f"only, or exclude=['{name}']")
    return UnitGroup(name, "heads", module, (), ("out_proj",), module.head_dim, None, fused_rows=FUSED_QKV)


def _add_gate_gradients(group: UnitGroup, outputs: torch.Tensor, gradient: torch.Tensor) -> None:
    """Add to ``group.pending`` each unit's ``sum over sentences |dL/d gate|`` from its outputs and
    the loss gradient at them, both (B, ..., units * width): per sentence, the product summed over
    the positions and the unit's width."""
    product = (outputs.float() * gradient.float()).reshape(outputs.shape[0], -1, group.units, group.width)
    per_sentence = product.sum(dim=(1, 3)).abs().sum(0)  # (units,)
    group.pending = per_sentence if group.pending is None else group.pending + per_sentence


class StructuredPruning(L.Callback):
    """Removes attention heads and feed-forward neurons during training (module docstring).

    Args:
        prune_heads: fraction of the heads removed by ``end_step``, in [0, 1).
        prune_neurons: fraction of the feed-forward neurons removed by ``end_step``, in [0, 1).
        importance: "taylor" (Michel et al. 2019, from the training gradients) or "magnitude".
        scope: "layer" (the same fraction in every module: CTranslate2 can run it) or "global".
        start_step / end_step / frequency: the pruning schedule (cubic, Zhu & Gupta 2017).
            With "taylor" the first pruning needs gradients before it: ``start_step >= 1``.
        include / exclude: globs over the names of the attention and feed-forward modules.
        attention_layers: the names of an attention module's query, key, value and output
            projections (default: q_proj, k_proj, v_proj, out_proj; also qkv, proj and c_attn,
            c_proj), or two: one projection computing q, k and v, and the output projection.
        feed_forward_layers: the names of a feed-forward block's two layers (default: fc1, fc2).
        masks_from: a checkpoint of a pruning run whose removed units stay removed from the
            first step (a fine-tuning phase after pruning); it must record every module this
            run prunes, and no other.
    """

    def __init__(self, prune_heads: float = 0.5, prune_neurons: float = 0.5, importance: str = "taylor",
                 scope: str = "layer", start_step: int = 100, end_step: int = 1000, frequency: int = 100,
                 include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                 attention_layers: Sequence[str] = ATTENTION_LAYERS,
                 feed_forward_layers: Sequence[str] = FEED_FORWARD_LAYERS,
                 masks_from: Optional[str] = None) -> None:
        self.prune_heads = number(OWNER, "prune_heads", prune_heads, 0.0, 1.0, high_open=True)
        self.prune_neurons = number(OWNER, "prune_neurons", prune_neurons, 0.0, 1.0, high_open=True)
        if self.prune_heads == 0.0 and self.prune_neurons == 0.0:
            raise ValueError(f"{OWNER}: prune_heads and prune_neurons are both 0; nothing would be pruned")
        self.importance = one_of(OWNER, "importance", importance, ("taylor", "magnitude"))
        self.scope = one_of(OWNER, "scope", scope, ("layer", "global"))
        self.start_step = integer(OWNER, "start_step", start_step, minimum=1 if self.importance == "taylor" else 0)
        self.end_step = integer(OWNER, "end_step", end_step, minimum=self.start_step)
        self.frequency = integer(OWNER, "frequency", frequency, minimum=1)
        self.include = globs(OWNER, "include", include, allow_empty=False)
        self.exclude = globs(OWNER, "exclude", exclude)
        self.attention_layers = _child_names("attention_layers", attention_layers, (4, 2))
        self.feed_forward_layers = _child_names("feed_forward_layers", feed_forward_layers, (2,))
        self.masks_from = None if masks_from is None else existing_file(OWNER, "masks_from", masks_from)
        self.masks_applied = False  # whether masks_from's units were removed (callback state)
        self.groups: list[UnitGroup] = []
        self.scores: Optional[torch.Tensor] = None  # (all units,) float64: importance since the last pruning
        self._scoring = False
        self._kept: dict[str, float] = {}

    # ------------------------------------------------------------------ settings
    def fraction(self, kind: str) -> float:
        return self.prune_heads if kind == "heads" else self.prune_neurons

    def target(self, kind: str, step: int) -> float:
        """The fraction of ``kind`` the schedule has removed at ``step``."""
        if step < self.start_step:
            return 0.0
        progress = 1.0 if self.end_step == self.start_step else min(1.0, (step - self.start_step) /
                                                                     (self.end_step - self.start_step))
        return self.fraction(kind) * (1.0 - (1.0 - progress) ** 3)

    def on_schedule(self, step: int) -> bool:
        return self.start_step <= step <= self.end_step and (
            (step - self.start_step) % self.frequency == 0 or step == self.end_step)

    @property
    def state_key(self) -> str:
        """The callback's key in a checkpoint: one per selection of modules, so several instances
        pruning different modules each keep their own state. The default selection keeps the
        plain class name (the key of checkpoints written before instances could be combined)."""
        if self.include == ["*"] and not self.exclude:
            return super().state_key
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    def _settings(self) -> list[Any]:
        settings = [self.prune_heads, self.prune_neurons, self.importance, self.scope, self.start_step,
                    self.end_step, self.frequency]
        return settings + [self.masks_from] if self.masks_from is not None else settings

    # ------------------------------------------------------------------ structure
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.groups:
            return
        self.groups = self._selected_groups(pl_module)
        for other in self._siblings(trainer):
            shared = {group.name for group in self.groups} & {group.name for group in other._selected_groups(pl_module)}
            if shared:
                raise ValueError(f"{OWNER}: {sorted(shared)[0]} is selected by two StructuredPruning callbacks "
                                 f"(include={self.include} exclude={self.exclude}, and include={other.include} "
                                 f"exclude={other.exclude}); each module can be pruned by one of them only")
        for kind in self._kinds():
            if not any(group.kind == kind for group in self.groups):
                layouts = attention_layouts(self.attention_layers)
                what = (f"attention module (nn.Linear children {' or '.join(', '.join(names) for names in layouts)} "
                        f"and an integer {', '.join(COUNT_ATTRIBUTES)})" if kind == "heads" else
                        f"feed-forward block (nn.Linear children {' and '.join(self.feed_forward_layers)}); "
                        f"attention_layers / feed_forward_layers name other children")
                raise ValueError(f"{OWNER}: prune_{kind} is {self.fraction(kind)} but include={self.include} "
                                 f"exclude={self.exclude} select no {what}; set prune_{kind}=0 or select some")
        for group in self.groups:
            units = getattr(group.module, group.columns[0]).in_features // group.width
            for unit_tensor in group.tensors():  # idempotent: a weight's existing UnitMask stays
                device = trainable_weight(unit_tensor.owner, unit_tensor.tensor).device
                add_weight_transform(unit_tensor.owner, UnitMask(torch.ones(units, device=device), group.width,
                                                                 unit_tensor.axis, unit_tensor.blocks),
                                     unit_tensor.tensor)
        if self.importance == "taylor":  # the hooks stay for the model's lifetime
            for group in self.groups:
                if group.fused_rows:
                    self._hook_multihead_attention(group)
                else:
                    getattr(group.module, group.columns[0]).register_forward_pre_hook(self._gate_gradient_hook(group))

    def _kinds(self) -> list[str]:
        """The unit kinds this callback prunes at all."""
        return [kind for kind in ("heads", "neurons") if self.fraction(kind) > 0]

    def _selected_groups(self, pl_module: nn.Module) -> list[UnitGroup]:
        return find_unit_groups(pl_module, self.include, self.exclude, self._kinds(), self.attention_layers,
                                self.feed_forward_layers)

    def _siblings(self, trainer: Optional[L.Trainer]) -> list["StructuredPruning"]:
        """The trainer's other StructuredPruning callbacks (none without a trainer)."""
        callbacks = getattr(trainer, "callbacks", None) or []
        return [callback for callback in callbacks if isinstance(callback, StructuredPruning) and callback is not self]

    def _gate_gradient_hook(self, group: UnitGroup):
        """A forward pre-hook on the group's first ``columns`` layer: its input is the units'
        outputs, (..., units * width); the gradient arriving there gives each unit's gate gradient."""

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            if not (self._scoring and module.training and torch.is_grad_enabled() and x.requires_grad):
                return
            saved = x.detach()
            x.register_hook(lambda gradient: _add_gate_gradients(group, saved, gradient))

        return hook

    def _hook_multihead_attention(self, group: UnitGroup) -> None:
        """Taylor importances of an nn.MultiheadAttention's heads. Its forward applies ``out_proj``
        inside ``F.multi_head_attention_forward``, so the heads' outputs (out_proj's input) are
        rebuilt: while gathering, the call is made with ``need_weights=True,
        average_attn_weights=False`` (torch's own computation, whose returned probabilities are
        those it used, dropout included), the outputs are those probabilities times the values, and
        the gradient at out_proj's input is the output's gradient times out_proj's weight. The
        weights are the ones the forward used (their transform chains' last results, caught by a
        hook for the call), not read again: each read runs the whole chain once more. The caller
        gets what it asked for."""
        module = group.module
        calls: list[Optional[dict[str, Any]]] = []  # per call in flight: what the caller asked, what it computed

        def before(module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
            if not (self._scoring and module.training and torch.is_grad_enabled()):
                calls.append(None)
                return None
            call = {**dict(zip(MHA_ARGUMENTS, args)), **kwargs}
            computed: dict[str, Any] = {"asked": (bool(call.get("need_weights", True)),
                                                  bool(call.get("average_attn_weights", True)))}

            def remember(key: str) -> Callable:
                def hook(chain: nn.Module, inputs: Any, output: torch.Tensor) -> None:
                    computed[key] = output  # the last read is the one the forward passes on
                return hook

            # Hooked per call: another callback's transform added later rebuilds the chains.
            computed["handles"] = [
                module.parametrizations[f"{FUSED_QKV}_weight"].register_forward_hook(remember(FUSED_QKV)),
                module.out_proj.parametrizations["weight"].register_forward_hook(remember("out_proj"))]
            calls.append(computed)
            return (), {**call, "need_weights": True, "average_attn_weights": False}

        def after(module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> Optional[tuple]:
            computed = calls.pop()
            if computed is None:
                return None
            for handle in computed["handles"]:
                handle.remove()
            attention, probabilities = output  # (B, T, E) or (T, B, E) or (T, E); (B, H, T, S) or (H, T, S)
            batched = kwargs["query"].dim() == 3
            value = kwargs["value"] if batched else kwargs["value"].unsqueeze(1)
            value = value.transpose(0, 1) if batched and module.batch_first else value  # (S, B, E)
            weight, bias = computed.pop(FUSED_QKV), module.in_proj_bias
            embed = module.embed_dim
            values = nn.functional.linear(value, weight[2 * embed:], None if bias is None else bias[2 * embed:])
            values = values.unflatten(-1, (module.num_heads, module.head_dim)).permute(1, 2, 0, 3)  # (B, H, S, hd)
            per_head = probabilities if batched else probabilities.unsqueeze(0)
            heads = (per_head.to(values.dtype) @ values).permute(0, 2, 1, 3).flatten(2).detach()  # (B, T, E)
            out_weight = computed.pop("out_proj").detach()

            def on_gradient(gradient: torch.Tensor) -> None:
                if not batched:
                    gradient = gradient.unsqueeze(0)
                elif not module.batch_first:
                    gradient = gradient.transpose(0, 1)  # (B, T, E)
                _add_gate_gradients(group, heads, gradient.float() @ out_weight.float())

            if attention.requires_grad:
                attention.register_hook(on_gradient)
            need_weights, average = computed["asked"]
            if not need_weights:
                return attention, None
            return attention, probabilities.mean(dim=-3) if average else probabilities

        module.register_forward_pre_hook(before, with_kwargs=True)
        module.register_forward_hook(after, with_kwargs=True)

    # ------------------------------------------------------------------ training
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.masks_from is not None and not self.masks_applied:  # once: a resumed run has them already
            others = {group.name for other in self._siblings(trainer) for group in other.groups}  # all set up by now
            self.adopt_masks(self.masks_from, others)
            self.masks_applied = True
        total = sum(group.units for group in self.groups)
        if self.scores is None or self.scores.numel() != total:
            self.scores = torch.zeros(total, dtype=torch.float64)
        self._kept = self.kept_fractions()  # of the masks as restored; logged every step, computed at changes

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.on_schedule(step) and batch_idx % trainer.accumulate_grad_batches == 0:
            self.prune(step)
        # Gradients are gathered only while a pruning is still to come.
        self._scoring = self.importance == "taylor" and step < self.end_step
        for kind, kept in self._kept.items():
            pl_module.log(f"structured_pruning/{kind}_kept", kept, on_step=True, on_epoch=False, batch_size=1)

    @torch.no_grad()
    def adopt_masks(self, path: str, pruned_by_others: Sequence[str] = ()) -> None:
        """Remove the units that the pruning run of checkpoint ``path`` removed (every rank reads the
        same file, so every rank holds the same masks). ``pruned_by_others``: modules another
        StructuredPruning of the trainer selects, whose records are that one's to adopt."""
        checkpoint = read_checkpoint(path, f"{OWNER}: masks_from")
        recorded, state = checkpoint.get(STRUCTURE_KEY, {}), checkpoint.get("state_dict", {})
        if not recorded:
            raise ValueError(f"{OWNER}: masks_from {path} records no removed units (not saved by a run with "
                             f"StructuredPruning)")
        others = set(pruned_by_others)
        recorded = {name: entry for name, entry in recorded.items() if name not in others}
        mine = {group.name: group for group in self.groups}
        if set(recorded) - set(mine):
            raise ValueError(f"{OWNER}: masks_from {path} removed units of {sorted(set(recorded) - set(mine))}, which "
                             f"this run does not prune (include={self.include} exclude={self.exclude}, "
                             f"prune_heads={self.prune_heads}, prune_neurons={self.prune_neurons}): they would grow back")
        for name, group in mine.items():
            entry = recorded.get(name)
            if entry is None:
                raise ValueError(f"{OWNER}: masks_from {path} records no units of {name}, which this run prunes; "
                                 f"exclude it, or start from a checkpoint that pruned it")
            keep = state.get(entry["keep"])
            if (tuple(entry["rows"]), tuple(entry["columns"]), entry["width"], entry.get("fused_rows"),
                    entry.get("row_blocks", 1)) != (group.rows, group.columns, group.width, group.fused_rows,
                                                    group.row_blocks) \
                    or keep is None or tuple(keep.shape) != (group.units,):
                raise ValueError(f"{OWNER}: masks_from {path}: {name}'s record (rows {entry['rows']}"
                                 f"{' and fused ' + entry['fused_rows'] if entry.get('fused_rows') else ''}, columns "
                                 f"{entry['columns']}, width {entry['width']}, keep "
                                 f"{None if keep is None else tuple(keep.shape)}) does not fit this model's "
                                 f"{group.kind} ({list(group.rows)}, {list(group.columns)}, width {group.width}, "
                                 f"{group.units} units)")
            group.set_keep(keep.float())

    def kept_fractions(self) -> dict[str, float]:
        """The fraction of the heads and of the neurons still there (each kind pruned at all)."""
        fractions = {}
        for kind in ("heads", "neurons"):
            units = [group for group in self.groups if group.kind == kind]
            if units:
                fractions[kind] = sum(int(group.keep.sum().item()) for group in units) / sum(g.units for g in units)
        return fractions

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not self._scoring:
            return
        device = self.groups[0].keep.device
        step_scores = torch.cat([group.pending if group.pending is not None else
                                 torch.zeros(group.units, device=device) for group in self.groups])
        for group in self.groups:
            group.pending = None
        # Summed over ranks, so every rank holds the same importances and prunes alike.
        step_scores = trainer.strategy.reduce(step_scores.to(device), reduce_op="sum").detach().double().cpu()
        # 16-mixed: the gradients the hooks saw were multiplied by the loss scale (which changes over
        # the run); a step whose gradients overflowed is skipped by the scaler and here alike.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            step_scores /= float(scaler.get_scale())
        if torch.isfinite(step_scores).all():
            self.scores += step_scores

    @torch.no_grad()
    def prune(self, step: int) -> None:
        """Remove units until each kind's fraction is the schedule's at ``step``."""
        scores = self.unit_scores()
        for kind in ("heads", "neurons"):
            groups = [(group, score) for group, score in zip(self.groups, scores) if group.kind == kind]
            if not groups:
                continue
            if self.scope == "layer":
                for group, score in groups:
                    self._drop_lowest(group, score, min(group.units - 1, round(self.target(kind, step) * group.units)))
            else:
                self._prune_globally(groups, self.target(kind, step))
        if self.scores is not None:
            self.scores.zero_()
        self._kept = self.kept_fractions()

    def unit_scores(self) -> list[torch.Tensor]:
        """Each group's importances (units,), float64 on CPU."""
        if self.importance == "magnitude":
            return [group.magnitudes().cpu() for group in self.groups]
        return list(self.scores.split([group.units for group in self.groups]))

    @staticmethod
    def _drop_lowest(group: UnitGroup, score: torch.Tensor, dropped: int) -> None:
        """Drop the lowest-scoring kept units of ``group`` until ``dropped`` are gone."""
        kept = group.keep.detach().cpu().bool()
        more = dropped - int((~kept).sum())
        if more <= 0:
            return
        candidates = torch.where(kept, score, torch.full_like(score, float("inf")))
        order = torch.argsort(candidates, stable=True)[:more]  # ties broken by position: alike on every rank
        keep = kept.float()
        keep[order] = 0.0
        group.set_keep(keep)

    @staticmethod
    def _prune_globally(groups: list[tuple[UnitGroup, torch.Tensor]], fraction: float) -> None:
        total = sum(group.units for group, _ in groups)
        dropped_now = sum(int((group.keep == 0).sum()) for group, _ in groups)
        more = round(fraction * total) - dropped_now
        if more <= 0:
            return
        candidates = []  # (normalised importance, group index, unit) of every kept unit
        for index, (group, score) in enumerate(groups):
            kept = group.keep.detach().cpu().bool()
            norm = score[kept].norm().item()
            normalised = score / norm if norm > 0 else score
            candidates += [(normalised[u].item(), index, u) for u in range(group.units) if kept[u]]
        keeps = [group.keep.detach().cpu().clone() for group, _ in groups]
        for _, index, unit in sorted(candidates):
            if more == 0:
                break
            if int(keeps[index].sum()) > 1:  # every module keeps at least one unit
                keeps[index][unit] = 0.0
                more -= 1
        for (group, _), keep in zip(groups, keeps):
            group.set_keep(keep)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        names = {id(module): name for name, module in pl_module.named_modules()}
        for group in self.groups:
            first = group.tensors()[0]
            index = next(i for i, t in enumerate(weight_transforms(first.owner, first.tensor))
                         if isinstance(t, UnitMask))
            keep = f"{names[id(first.owner)]}.parametrizations.{first.tensor}.{index}.keep"
            record_structure(checkpoint, group.name, keep, list(group.rows), list(group.columns), group.width,
                             group.count_attribute, fused_rows=group.fused_rows,
                             row_blocks=group.row_blocks)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        refuse_optimizer_state_of_untransformed_weights(checkpoint, pl_module, OWNER)
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states and OWNER in states and not self._siblings(trainer):
            # Written before the key named the selection: the trainer's one StructuredPruning takes it.
            self.load_state_dict(states[OWNER])

    def state_dict(self) -> dict[str, Any]:
        return {"settings": self._settings(), "scores": None if self.scores is None else self.scores.clone(),
                "masks_applied": self.masks_applied}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state.get("settings", [])) != self._settings():
            raise ValueError(f"{OWNER}: the checkpoint was pruned with {state.get('settings')}, this run asks for "
                             f"{self._settings()} (prune_heads, prune_neurons, importance, scope, start_step, "
                             f"end_step, frequency{', masks_from' if self.masks_from is not None else ''})")
        self.scores = state.get("scores")
        self.masks_applied = bool(state.get("masks_applied", False))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._scoring = False
