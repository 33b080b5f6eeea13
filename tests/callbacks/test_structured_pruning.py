"""StructuredPruning: which heads and neurons go, computed independently, and the cut-out export.

The Taylor importance is checked against explicit gates: a gate per sentence and unit
multiplies the unit's output, and autograd's gradient of the same loss at the gates (all ones)
is the importance before the absolute value. A wrong variant (absolute value per position, or
after summing over sentences; a head's width ignored) answers differently on these inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import StructuredPruning
from callbacks.structured_pruning import UnitMask
from callbacks._transforms import find_weight_transform
from nmt_lightning.model.attention import MultiHeadAttention
from nmt_lightning.model.layers import FeedForward
from tests.callbacks.classifier import ResumableLoader
from tests.callbacks.helpers import assert_same_state, resumed_and_uninterrupted, trainer

HEADS, HEAD_DIM, NEURONS, WIDTH = 4, 3, 10, 12


class Regression(L.LightningModule):
    """Random vectors (B, T, WIDTH) regressed onto a target of the same shape; subclasses give forward."""

    def training_step(self, batch, batch_index):
        inputs, targets = batch
        return nn.functional.mse_loss(self(inputs), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class AttentionBlock(Regression):
    """A model that is not ours: self-attention and a feed-forward block."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(WIDTH, HEADS)
        self.feed_forward = FeedForward(WIDTH, NEURONS, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(x, x)
        return h + self.feed_forward(h)


def block_data(sentences: int = 8, batch_size: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(sentences, 5, WIDTH, generator=generator)
    return DataLoader(TensorDataset(inputs, torch.randn(sentences, 5, WIDTH, generator=generator)),
                      batch_size=batch_size)


def gated_gradients(model: AttentionBlock, inputs: torch.Tensor, targets: torch.Tensor,
                    scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/d gate of every (sentence, head) and (sentence, neuron) of L = scale * MSE: gates of
    ones multiplying each unit's output (B, units), put in front of out_proj and fc2."""
    head_gates = torch.ones(inputs.shape[0], HEADS, requires_grad=True)
    neuron_gates = torch.ones(inputs.shape[0], NEURONS, requires_grad=True)

    def gate_heads(module, args):
        z = args[0].unflatten(-1, (HEADS, HEAD_DIM))  # (B, T, heads, head_dim)
        return ((z * head_gates[:, None, :, None]).flatten(-2),)

    def gate_neurons(module, args):
        return (args[0] * neuron_gates[:, None, :],)

    hooks = [model.attention.out_proj.register_forward_pre_hook(gate_heads),
             model.feed_forward.fc2.register_forward_pre_hook(gate_neurons)]
    (scale * nn.functional.mse_loss(model(inputs), targets)).backward()
    for hook in hooks:
        hook.remove()
    return head_gates.grad, neuron_gates.grad


def test_taylor_importance_is_the_gate_gradient_summed_in_absolute_value_per_sentence(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AttentionBlock()
    reference = AttentionBlock()
    reference.load_state_dict(model.state_dict())
    reference_start = {name: value.clone() for name, value in model.state_dict().items()}
    callback = StructuredPruning(prune_heads=0.5, prune_neurons=0.5, start_step=10, end_step=20, frequency=5)
    trainer(tmp_path, [callback], max_steps=2).fit(model, block_data())
    expected_heads, expected_neurons = torch.zeros(HEADS, dtype=torch.float64), torch.zeros(NEURONS, dtype=torch.float64)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    for inputs, targets in block_data():  # the same two steps, the same updates
        optimizer.zero_grad()
        heads, neurons = gated_gradients(reference, inputs, targets)
        expected_heads += heads.abs().sum(0).double()
        expected_neurons += neurons.abs().sum(0).double()
        optimizer.step()
    found_heads, found_neurons = callback.unit_scores()
    # float32 products summed in another order: relative error of a few ulp of the largest term
    torch.testing.assert_close(found_heads, expected_heads, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(found_neurons, expected_neurons, rtol=1e-5, atol=1e-7)
    # With gradient accumulation the micro-batches' importances add up (each micro-batch's loss
    # divided by 2, as Lightning does): 4 micro-batches of 2 sentences, 2 optimiser steps.
    torch.manual_seed(0)
    model, accumulating = AttentionBlock(), AttentionBlock()
    accumulating.load_state_dict(reference_start)
    model.load_state_dict(reference_start)
    callback = StructuredPruning(prune_heads=0.5, prune_neurons=0.5, start_step=10, end_step=20, frequency=5)
    trainer(tmp_path / "accumulated", [callback], max_steps=2, accumulate_grad_batches=2).fit(
        model, block_data(batch_size=2))
    expected_heads, expected_neurons = torch.zeros(HEADS, dtype=torch.float64), torch.zeros(NEURONS, dtype=torch.float64)
    optimizer = torch.optim.SGD(accumulating.parameters(), lr=0.05)
    for index, (inputs, targets) in enumerate(block_data(batch_size=2)):
        if index % 2 == 0:
            optimizer.zero_grad()
        heads, neurons = gated_gradients(accumulating, inputs, targets, scale=0.5)
        expected_heads += heads.abs().sum(0).double()
        expected_neurons += neurons.abs().sum(0).double()
        if index % 2 == 1:
            optimizer.step()
    found_heads, found_neurons = callback.unit_scores()
    torch.testing.assert_close(found_heads, expected_heads, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(found_neurons, expected_neurons, rtol=1e-5, atol=1e-7)
    # Not the absolute value of the batch's sum (a plausible wrong variant): these inputs tell them apart.
    heads, _ = gated_gradients(reference, *next(iter(block_data())))
    assert not torch.allclose(heads.sum(0).abs(), heads.abs().sum(0))


def two_attentions() -> nn.Module:
    root = nn.Module()
    root.first, root.second = MultiHeadAttention(8, 4), MultiHeadAttention(8, 4)
    return root


def pruned_with_scores(scope: str, fraction: float, scores: list[float]) -> list[list[float]]:
    root = two_attentions()
    callback = StructuredPruning(prune_heads=fraction, prune_neurons=0.0, scope=scope, start_step=1, end_step=1)
    callback.setup(None, root, "fit")
    callback.scores = torch.tensor(scores, dtype=torch.float64)
    callback.prune(step=1)
    return [group.keep.tolist() for group in callback.groups]


def test_layer_scope_prunes_the_same_number_in_every_module() -> None:
    scores = [10, 20, 30, 40, 0.2, 0.1, 0.5, 0.3]
    assert pruned_with_scores("layer", 0.25, scores) == [[0, 1, 1, 1], [1, 0, 1, 1]]
    assert pruned_with_scores("layer", 0.5, scores) == [[0, 0, 1, 1], [0, 0, 1, 1]]


def test_global_scope_ranks_importances_normalised_per_module() -> None:
    """Michel et al.: each module's importances divided by their L2 norm, then one ranking. The
    second module's raw scores are all smaller; normalised, its units interleave with the first's
    (0.16, 0.18, 0.32, 0.37: second[1], first[0], second[0], first[1])."""
    scores = [10, 20, 30, 40, 0.2, 0.1, 0.5, 0.3]
    assert pruned_with_scores("global", 0.5, scores) == [[0, 0, 1, 1], [0, 0, 1, 1]]
    # Raw ranking would have taken second[1], second[0], second[3], then first[0] (a module keeps one).


def test_global_scope_keeps_one_unit_per_module() -> None:
    """7 of 8 asked for: the second module's last head and one of the first's must stay."""
    assert pruned_with_scores("global", 0.875, [1, 1, 1, 1, 0.01, 0.01, 0.01, 10]) == [[0, 0, 0, 1], [0, 0, 0, 1]]


@pytest.mark.parametrize("scope, after_first, after_second", [
    ("layer", [[0, 1, 1, 1], [1, 0, 1, 1]], [[0, 0, 1, 1], [0, 0, 1, 1]]),
    ("global", [[0, 1, 1, 1], [0, 0, 1, 1]], [[0, 0, 1, 1], [0, 0, 1, 1]]),
])
def test_a_second_round_counts_the_units_already_removed(scope: str, after_first: list, after_second: list) -> None:
    """Schedule 1..4 to half the heads: step 2 targets 0.5 * (1 - (2/3)^3) = 0.352, step 3 0.481.
    Per layer that is 1 then 2 of 4 heads: the second round removes one more per module, not two.
    Globally it is 3 then 4 of 8: one more, not four, ranked among the kept heads renormalised
    (first: 20, 30, 40 / 53.9; second: 0.5, 0.3 / 0.583, so first[1] goes)."""
    root = two_attentions()
    callback = StructuredPruning(prune_heads=0.5, prune_neurons=0.0, scope=scope, start_step=1, end_step=4)
    callback.setup(None, root, "fit")
    for step, expected in ((2, after_first), (3, after_second)):
        callback.scores = torch.tensor([10, 20, 30, 40, 0.2, 0.1, 0.5, 0.3], dtype=torch.float64)
        callback.prune(step=step)
        assert [group.keep.tolist() for group in callback.groups] == expected, step


def test_global_scope_with_a_module_of_zero_importance() -> None:
    """A module whose units got no gradient (all importances 0) is not divided by its zero norm:
    its units rank lowest and go first."""
    assert pruned_with_scores("global", 0.25, [1, 2, 3, 4, 0, 0, 0, 0]) == [[1, 1, 1, 1], [0, 0, 1, 1]]


def test_magnitude_is_the_l2_norm_over_a_units_rows_biases_and_columns() -> None:
    """Random signed weights: each head's magnitude is the root of the sum of squares of its
    q/k/v rows, their biases and its out_proj columns (out_proj's bias belongs to no head),
    computed here from the plain parameters. Signs and biases matter on these inputs: a cube
    instead of a square, or biases left out, gives other values."""
    torch.manual_seed(5)
    root = two_attentions()
    with torch.no_grad():
        for parameter in root.parameters():
            parameter.normal_()
    expected = []
    for attention in (root.first, root.second):
        for head in range(4):
            rows = slice(2 * head, 2 * head + 2)
            squares = sum(getattr(attention, name).weight[rows].double().pow(2).sum()
                          + getattr(attention, name).bias[rows].double().pow(2).sum()
                          for name in ("q_proj", "k_proj", "v_proj"))
            squares = squares + attention.out_proj.weight[:, rows].double().pow(2).sum()
            expected.append(squares.sqrt())
    callback = StructuredPruning(prune_heads=0.5, prune_neurons=0.0, importance="magnitude", start_step=0, end_step=0)
    callback.setup(None, root, "fit")
    found = torch.cat([group.magnitudes() for group in callback.groups])
    # float64 sums of the same squares in another order: a few ulp
    torch.testing.assert_close(found, torch.stack(expected), rtol=1e-12, atol=0)


def test_the_modules_found_their_units_and_widths() -> None:
    """Which modules become unit groups, in named_modules order: the globs (include, then exclude),
    an attention without a head count and a feed-forward pair whose widths do not meet are
    skipped (placed first, so a search that stopped at them would miss the rest), one head is a
    head; torch's own layers: test_structured_pruning_torch_layers.py."""
    from callbacks.structured_pruning import find_unit_groups

    def attention(heads: int, kv_width: int = 8) -> MultiHeadAttention:
        module = MultiHeadAttention(8, heads)
        module.k_proj, module.v_proj = nn.Linear(8, kv_width), nn.Linear(8, kv_width)
        return module

    headless = attention(2)
    del headless.heads
    root = nn.Module()
    root.ignored = FeedForward(8, 6, 0.0)  # outside include
    root.encoder = nn.Module()
    root.encoder.headless, root.encoder.attn, root.encoder.ffn = headless, attention(4), FeedForward(8, 6, 0.0)
    root.decoder = nn.Module()
    root.decoder.uneven = FeedForward(8, 6, 0.0)
    root.decoder.uneven.fc2 = nn.Linear(5, 8)  # 6 outputs feed 5 inputs: not a neuron layer
    root.decoder.attn, root.decoder.ffn = attention(1), FeedForward(8, 3, 0.0)
    found = find_unit_groups(root, ["encoder.*", "decoder.*"], ["encoder.ffn"], ["heads", "neurons"])
    assert [(g.name, g.kind, g.module, g.width, g.count_attribute, g.rows, g.columns) for g in found] == [
        ("encoder.attn", "heads", root.encoder.attn, 2, "heads", ("q_proj", "k_proj", "v_proj"), ("out_proj",)),
        ("decoder.attn", "heads", root.decoder.attn, 8, "heads", ("q_proj", "k_proj", "v_proj"), ("out_proj",)),
        ("decoder.ffn", "neurons", root.decoder.ffn, 1, None, ("fc1",), ("fc2",))]
    assert [g.name for g in find_unit_groups(root, ["*"], [], ["neurons"])] == [
        "ignored", "encoder.ffn", "decoder.ffn"]
    grouped = nn.Module()
    grouped.attn = attention(4, kv_width=4)  # grouped keys and values: 4 k/v outputs for 4 heads of 2
    with pytest.raises(ValueError, match=r"^StructuredPruning: attn has q/k/v projections of \[4, 8\] outputs"):
        find_unit_groups(grouped, ["*"], [], ["heads"])
    torch_layer = nn.TransformerEncoderLayer(8, 2, 16)
    assert [g.name for g in find_unit_groups(torch_layer, ["*"], [], ["neurons"], feed_forward_layers=(
        "linear1", "linear2"))] == [""]


def test_magnitude_counts_every_row_and_column_of_a_head() -> None:
    """Head 0 has the largest query rows but nothing in out_proj's columns or v: its norm over
    all its rows and columns is still the largest; head 3 has small q/k/v rows but large output
    columns, so it is kept; head 1 is smallest overall."""
    root = two_attentions()
    with torch.no_grad():
        for attention in (root.first, root.second):
            for linear in (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj):
                linear.weight.fill_(0.1)
                linear.bias.zero_()
            attention.q_proj.weight[0:2] = 5.0  # head 0's query rows
            attention.v_proj.weight[2:4] = 0.01  # head 1's value rows: small
            attention.k_proj.weight[2:4] = 0.01
            attention.q_proj.weight[2:4] = 0.01
            attention.out_proj.weight[:, 2:4] = 0.01  # and its output columns
            attention.q_proj.weight[6:8] = 0.0  # head 3's q/k rows small...
            attention.k_proj.weight[6:8] = 0.0
            attention.out_proj.weight[:, 6:8] = 1.0  # ...but its output columns large
    callback = StructuredPruning(prune_heads=0.5, prune_neurons=0.0, importance="magnitude", start_step=0, end_step=0)
    callback.setup(None, root, "fit")
    callback.on_train_start(None, root)
    callback.prune(step=0)
    assert [group.keep.tolist() for group in callback.groups] == [[1, 0, 0, 1]] * 2


def test_the_masked_model_computes_what_the_kept_units_alone_compute() -> None:
    """With half the heads and neurons masked, attention and feed-forward equal smaller layers
    built from the kept rows and columns of the untouched parameters (what the export cuts out)."""
    torch.manual_seed(0)
    model = AttentionBlock()
    raw = {name: value.clone() for name, value in model.state_dict().items()}
    callback = StructuredPruning(prune_heads=0.5, prune_neurons=0.5, importance="magnitude", start_step=0, end_step=0)
    callback.setup(None, model, "fit")
    callback.on_train_start(None, model)
    callback.prune(step=0)
    heads, neurons = (group.keep.bool() for group in callback.groups)
    assert int(heads.sum()) == HEADS // 2 and int(neurons.sum()) == NEURONS // 2
    assert torch.equal(model.attention.q_proj.parametrizations.weight.original, raw["attention.q_proj.weight"])
    rows = heads.repeat_interleave(HEAD_DIM)
    small = MultiHeadAttention(WIDTH, HEADS // 2)
    small.head_dim = HEAD_DIM
    for name in ("q_proj", "k_proj", "v_proj"):
        small.get_submodule(name).weight.data = raw[f"attention.{name}.weight"][rows]
        small.get_submodule(name).bias.data = raw[f"attention.{name}.bias"][rows]
    small.out_proj = nn.Linear(int(rows.sum()), WIDTH)
    small.out_proj.weight.data = raw["attention.out_proj.weight"][:, rows]
    small.out_proj.bias.data = raw["attention.out_proj.bias"]
    x = torch.randn(2, 5, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(model.attention(x, x), small(x, x), rtol=1e-5, atol=1e-6)
        hidden = torch.relu(x @ raw["feed_forward.fc1.weight"][neurons].T + raw["feed_forward.fc1.bias"][neurons])
        expected = hidden @ raw["feed_forward.fc2.weight"][:, neurons].T + raw["feed_forward.fc2.bias"]
        torch.testing.assert_close(model.feed_forward(x), expected, rtol=1e-5, atol=1e-6)


def test_the_kept_fractions_are_logged_per_kind(tmp_path: Path) -> None:
    """Half the heads and 80% of the neurons pruned at step 1: the logged fractions kept are 0.5
    and 0.2, each under its own kind."""
    callback = StructuredPruning(prune_heads=0.5, prune_neurons=0.8, importance="magnitude", start_step=1, end_step=1)
    fit = trainer(tmp_path, [callback], max_steps=3)
    fit.fit(AttentionBlock(), block_data())
    # logged as float32 tensors: 0.2 to float32's precision
    assert fit.callback_metrics["structured_pruning/heads_kept"].item() == pytest.approx(0.5, abs=1e-7)
    assert fit.callback_metrics["structured_pruning/neurons_kept"].item() == pytest.approx(0.2, abs=1e-7)


def test_the_mask_keeps_the_weights_dtype() -> None:
    weight = torch.randn(4, 3, dtype=torch.bfloat16)
    masked = UnitMask(torch.tensor([1.0, 0.0]), 2, 0)(weight)
    assert masked.dtype == torch.bfloat16 and torch.equal(masked[:2], weight[:2]) and not masked[2:].any()


def test_the_schedule_is_cubic_and_ends_at_the_target() -> None:
    callback = StructuredPruning(prune_heads=0.5, prune_neurons=0.8, start_step=5, end_step=25, frequency=10)
    assert [callback.target("neurons", step) for step in (4, 5, 15, 25, 40)] == \
        pytest.approx([0.0, 0.0, 0.8 * (1 - 0.5 ** 3), 0.8, 0.8])
    assert [step for step in range(40) if callback.on_schedule(step)] == [5, 15, 25]
    late_end = StructuredPruning(prune_heads=0.5, prune_neurons=0.8, start_step=5, end_step=22, frequency=10)
    assert [step for step in range(40) if late_end.on_schedule(step)] == [5, 15, 22]
    # every frequency steps counted from start_step (3 is not a multiple of 4, nor 6 of 4)
    odd_start = StructuredPruning(prune_heads=0.5, start_step=3, end_step=11, frequency=4)
    assert [step for step in range(40) if odd_start.on_schedule(step)] == [3, 7, 11]


def test_resume_in_the_middle_of_the_gathering_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """Stopped at step 7, between prunings at 5 and 10: the importances gathered over steps 5-6
    come back from the checkpoint, so the pruning at step 10 chooses the same units."""
    def callbacks() -> list:
        return [StructuredPruning(prune_heads=0.5, prune_neurons=0.6, start_step=5, end_step=15, frequency=5)]

    def data() -> DataLoader:
        loader = block_data(sentences=48, batch_size=4)
        return ResumableLoader(loader.dataset, batch_size=4)  # resumes mid-epoch where it stopped

    def make_model() -> AttentionBlock:
        torch.manual_seed(0)
        return AttentionBlock()

    straight, resumed = resumed_and_uninterrupted(tmp_path, make_model, callbacks, data, stop=7, total=12)
    assert_same_state(straight, resumed)
    keep = [value for name, value in straight.items() if name.endswith(".keep")]
    assert keep and any(float(k.mean()) < 1 for k in keep)


def test_a_second_setup_changes_nothing() -> None:
    model = AttentionBlock()
    callback = StructuredPruning(prune_heads=0.5, prune_neurons=0.5)
    callback.setup(None, model, "fit")
    masks = [find_weight_transform(model.attention.q_proj, UnitMask)]
    callback.setup(None, model, "validate")
    assert find_weight_transform(model.attention.q_proj, UnitMask) is masks[0]
    assert len(callback.groups) == 2


@pytest.mark.parametrize("arguments, message", [
    (dict(prune_heads=0.0, prune_neurons=0.0), "prune_heads and prune_neurons are both 0"),
    (dict(prune_heads=1.0), r"prune_heads must be a finite number in \[0, 1\)"),
    (dict(prune_neurons=True), "prune_neurons must be a finite number"),
    (dict(importance="fisher"), r"importance must be one of \['taylor', 'magnitude'\]"),
    (dict(scope="model"), r"scope must be one of \['layer', 'global'\]"),
    (dict(start_step=0), "start_step must be an integer >= 1"),  # taylor needs gradients before its first pruning
    (dict(start_step=50, end_step=10), "end_step must be an integer >= 50"),
    (dict(frequency=0), "frequency must be an integer >= 1"),
    (dict(prune_neurons=-0.1), r"prune_neurons must be a finite number in \[0, 1\)"),
    (dict(prune_neurons=1.0), r"prune_neurons must be a finite number in \[0, 1\)"),
    (dict(attention_layers=["q_proj", "k_proj", "v_proj"]), "attention_layers must be a list of 4 or 2 distinct"),
    (dict(attention_layers=["qkv", "qkv"]), "attention_layers must be a list of 4 or 2 distinct"),
    (dict(feed_forward_layers=["fc1", "fc2", "fc3"]), "feed_forward_layers must be a list of 2 distinct"),
    (dict(include="*attn*"), "include must be a list of globs"),
    (dict(exclude=[""]), "exclude must be a list of globs"),
])
def test_bad_arguments_are_named(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^StructuredPruning: {message}"):
        StructuredPruning(**arguments)


def test_a_model_without_the_units_asked_for_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"StructuredPruning: prune_heads is 0.5 but .* select no attention module"):
        StructuredPruning(prune_heads=0.5, prune_neurons=0.0).setup(None, model, "fit")
    attention_only = two_attentions()
    with pytest.raises(ValueError, match=r"prune_neurons is 0.5 .* select no feed-forward block"):
        StructuredPruning(prune_heads=0.5, prune_neurons=0.5).setup(None, attention_only, "fit")


def test_a_resume_with_other_settings_is_refused() -> None:
    callback = StructuredPruning(prune_heads=0.5)
    state = callback.state_dict()
    with pytest.raises(ValueError, match="StructuredPruning: the checkpoint was pruned with"):
        StructuredPruning(prune_heads=0.25).load_state_dict(state)
    with pytest.raises(ValueError, match="^StructuredPruning: the checkpoint was pruned with None, "):
        StructuredPruning(prune_heads=0.25).load_state_dict({})  # a callback state without its settings


@pytest.mark.parametrize("model, kept", [("ours", [2, 6]), ("torch", [6, 2, 6, 2])])
def test_two_process_ddp_prunes_the_same_units_on_every_rank(tmp_path: Path, model: str, kept: list[int]) -> None:
    """Each rank sees other sentences, so its own gradients would rank the units differently; the
    importances are summed over ranks at every step, so both hold the same and prune alike. Also
    for the heads of torch's nn.MultiheadAttention (stock encoder layers: neurons, then heads, per layer)."""
    import json

    from tests.conftest import run_script

    run_script("structured_pruning_ddp.py", tmp_path, *(["torch"] if model == "torch" else []))
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["keep"] == ranks[1]["keep"] and ranks[0]["scores"] == ranks[1]["scores"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    # at step 4 the cubic schedule has removed 0.5 * (1 - 0.5 ** 3) of the heads, 0.4375: 2 of 4, 4 of 10 neurons
    assert [sum(keep) for keep in ranks[0]["keep"]] == kept
    assert any(score > 0 for score in ranks[0]["scores"])  # steps 4 and 5, gathered for the pruning at 6


def test_composed_with_qat_and_magnitude_pruning_a_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """Three transforms on one weight (unit mask and magnitude mask, then fake quantization),
    stopped between two structured prunings: the resumed run ends where the straight one does."""
    from callbacks import MagnitudePruning, QuantizationAwareTraining

    def callbacks() -> list:
        return [QuantizationAwareTraining(include=["*"]),
                MagnitudePruning(sparsity=0.5, start_step=2, end_step=10, frequency=2, include=["*"]),
                StructuredPruning(prune_heads=0.5, prune_neurons=0.5, start_step=3, end_step=9, frequency=3)]

    def data() -> DataLoader:
        return ResumableLoader(block_data(sentences=48, batch_size=4).dataset, batch_size=4)

    def make_model() -> AttentionBlock:
        torch.manual_seed(0)
        return AttentionBlock()

    straight, resumed = resumed_and_uninterrupted(tmp_path, make_model, callbacks, data, stop=5, total=11)
    assert_same_state(straight, resumed)
    chain = [key for key in straight if key.startswith("attention.q_proj.parametrizations.weight.")]
    assert any(key.endswith(".keep") for key in chain) and any(key.endswith(".mask") for key in chain)


def test_mixed_precision_gradients_are_unscaled_and_overflowing_steps_dropped() -> None:
    """With 16-mixed the hooks see gradients times the loss scale: the importance is divided by
    it; a step with inf gradients (the scaler skips it) adds nothing."""
    from types import SimpleNamespace

    class Scaler:
        def is_enabled(self) -> bool:
            return True

        def get_scale(self) -> float:
            return 1024.0

    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=Scaler()),
                              strategy=SimpleNamespace(reduce=lambda tensor, reduce_op: tensor))
    model = AttentionBlock()
    callback = StructuredPruning(prune_heads=0.5, prune_neurons=0.5)
    callback.setup(None, model, "fit")
    callback.on_train_start(None, model)
    callback._scoring = True
    heads, neurons = callback.groups
    heads.pending, neurons.pending = torch.full((HEADS,), 2048.0), torch.full((NEURONS,), 1024.0)
    callback.on_before_optimizer_step(trainer, model, None)
    assert callback.scores.tolist() == [2.0] * HEADS + [1.0] * NEURONS
    heads.pending, neurons.pending = torch.full((HEADS,), float("inf")), torch.ones(NEURONS)
    callback.on_before_optimizer_step(trainer, model, None)
    assert callback.scores.tolist() == [2.0] * HEADS + [1.0] * NEURONS
    # A module the step's loss did not reach (no gradient arrived at its hook) adds nothing.
    heads.pending, neurons.pending = None, torch.full((NEURONS,), 3072.0)
    callback.on_before_optimizer_step(trainer, model, None)
    assert callback.scores.tolist() == [2.0] * HEADS + [4.0] * NEURONS


def test_pruning_after_the_model_moved_reaches_every_layer() -> None:
    """``model.to(...)`` (a GPU, here float64) replaces every buffer: the masks are looked up
    afresh, so a pruning after the move reaches all four projections of a head, not a stale copy."""
    model = AttentionBlock()
    callback = StructuredPruning(prune_heads=0.5, prune_neurons=0.5, importance="magnitude", start_step=0, end_step=0)
    callback.setup(None, model, "fit")
    model.double()
    callback.on_train_start(None, model)
    callback.prune(step=0)
    heads = callback.groups[0]
    assert all(torch.equal(mask.keep, heads.keep) for mask in heads.masks()) and int(heads.keep.sum()) == HEADS // 2
    dropped = ~heads.keep.bool().repeat_interleave(HEAD_DIM)
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.all(getattr(model.attention, name).weight[dropped] == 0)
    assert torch.all(model.attention.out_proj.weight[:, dropped] == 0)


def test_validation_while_gathering_taylor_importances_changes_nothing(tmp_path: Path) -> None:
    """Validation between the training steps of the gathering window (no gradients, eval mode) adds
    nothing to the importances: the scores equal those of the same steps without validation. Nor
    does a forward and backward after the fit."""

    class Validated(AttentionBlock):
        def validation_step(self, batch, batch_index):
            inputs, targets = batch
            self.log("val_loss", nn.functional.mse_loss(self(inputs), targets))

    scores = []
    for validate in (False, True):
        torch.manual_seed(0)
        model = Validated()
        callback = StructuredPruning(prune_heads=0.5, prune_neurons=0.5, start_step=10, end_step=20, frequency=5)
        options = dict(limit_val_batches=2, val_check_interval=1, num_sanity_val_steps=1) if validate else {}
        trainer(tmp_path / str(validate), [callback], max_steps=2, **options).fit(
            model, block_data(), block_data() if validate else None)
        scores.append(callback.unit_scores())
    for without, within in zip(*scores):
        assert torch.equal(without, within)
    # After the fit, a user's own training-mode forward and backward gathers nothing either.
    model.train()
    inputs, _ = next(iter(block_data()))
    model(inputs).sum().backward()
    assert all(group.pending is None for group in callback.groups)


def pruned_checkpoint(tmp_path: Path, prune_heads: float, prune_neurons: float) -> Path:
    """An AttentionBlock trained 8 steps while losing ``prune_heads`` / ``prune_neurons`` by
    magnitude at step 2 (seed 0), saved with its structure record."""
    torch.manual_seed(0)
    model = AttentionBlock()
    callback = StructuredPruning(prune_heads=prune_heads, prune_neurons=prune_neurons, importance="magnitude",
                                 start_step=2, end_step=2)
    fit = trainer(tmp_path / "source", [callback], max_steps=8)
    fit.fit(model, block_data(sentences=32))
    fit.save_checkpoint(tmp_path / "pruned.ckpt")
    return tmp_path / "pruned.ckpt"


def kept_in(path: Path) -> dict[str, list[float]]:
    """The q_proj and fc1 keep vectors as saved in the checkpoint (read apart from the callback)."""
    state = torch.load(path, weights_only=True)["state_dict"]
    return {layer: state[f"{layer}.parametrizations.weight.0.keep"].tolist()
            for layer in ("attention.q_proj", "feed_forward.fc1")}


def test_masks_from_a_pruned_checkpoint_keeps_exactly_its_units(tmp_path: Path) -> None:
    """A fine-tuning phase after pruning: the checkpoint's units are gone from step 0 and stay gone,
    nothing else is pruned although the new model's own magnitudes would choose other units, and
    the removed units compute nothing (their q/k/v rows and fc1 rows read as zeros)."""
    source = pruned_checkpoint(tmp_path, 0.5, 0.6)
    expected = kept_in(source)
    assert [sum(keep) for keep in expected.values()] == [HEADS // 2, round(NEURONS * 0.4)]
    torch.manual_seed(5)  # other weights: their magnitudes rank the units otherwise
    model = AttentionBlock()
    alone = StructuredPruning(prune_heads=0.5, prune_neurons=0.6, importance="magnitude", start_step=0, end_step=0)
    alone.setup(None, model, "fit")
    alone.prune(step=0)
    assert [group.keep.tolist() for group in alone.groups] != list(expected.values())  # the test can tell
    torch.manual_seed(5)
    model = AttentionBlock()
    adopting = StructuredPruning(prune_heads=0.5, prune_neurons=0.6, importance="magnitude", start_step=0, end_step=0,
                                 masks_from=str(source))
    trainer(tmp_path / "tuned", [adopting], max_steps=6).fit(model, block_data(sentences=32))
    assert [group.keep.tolist() for group in adopting.groups] == list(expected.values())
    heads = torch.tensor(expected["attention.q_proj"]).bool().repeat_interleave(HEAD_DIM)
    neurons = torch.tensor(expected["feed_forward.fc1"]).bool()
    assert not model.attention.q_proj.weight[~heads].any() and model.attention.q_proj.weight[heads].all()
    assert not model.feed_forward.fc2.weight[:, ~neurons].any() and model.feed_forward.fc2.weight[:, neurons].all()


def test_masks_from_counts_toward_the_schedule_which_removes_the_rest(tmp_path: Path) -> None:
    """The checkpoint removed 1 of 4 heads and 3 of 10 neurons; a run to half the heads and 60% of
    the neurons removes 1 head and 3 neurons more, and the checkpoint's stay removed."""
    source = kept_in(pruned_checkpoint(tmp_path, 0.25, 0.3))
    torch.manual_seed(5)
    callback = StructuredPruning(prune_heads=0.5, prune_neurons=0.6, importance="magnitude", start_step=2, end_step=2,
                                 masks_from=str(tmp_path / "pruned.ckpt"))
    trainer(tmp_path / "more", [callback], max_steps=4).fit(AttentionBlock(), block_data(sentences=32))
    for before, group in zip(source.values(), callback.groups):
        after = group.keep.tolist()
        assert all(a <= b for a, b in zip(after, before))  # nothing grew back
        assert sum(after) == {HEADS: HEADS // 2, NEURONS: round(NEURONS * 0.4)}[len(after)]
        assert sum(before) - sum(after) == {HEADS: 1, NEURONS: 3}[len(after)]


def test_masks_from_then_a_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """Stopped after the adopted masks and a further pruning (steps 3 and 6 of 3-9): the resume
    keeps the masks it saved instead of adopting the checkpoint's again (which would bring back the
    units pruned at step 3), and ends where the straight run does."""
    source = pruned_checkpoint(tmp_path, 0.25, 0.3)

    def callbacks() -> list:
        return [StructuredPruning(prune_heads=0.5, prune_neurons=0.6, start_step=3, end_step=9, frequency=3,
                                  masks_from=str(source))]

    def data() -> DataLoader:
        return ResumableLoader(block_data(sentences=48, batch_size=4).dataset, batch_size=4)

    def make_model() -> AttentionBlock:
        torch.manual_seed(0)
        return AttentionBlock()

    straight, resumed = resumed_and_uninterrupted(tmp_path / "resume", make_model, callbacks, data, stop=7, total=11)
    assert_same_state(straight, resumed)
    assert sum(straight["attention.q_proj.parametrizations.weight.0.keep"].tolist()) == HEADS // 2


def test_masks_from_that_does_not_fit_is_refused_naming_the_file(tmp_path: Path) -> None:
    source = pruned_checkpoint(tmp_path, 0.5, 0.6)
    with pytest.raises(FileNotFoundError, match="StructuredPruning: masks_from .*missing.ckpt: no such file"):
        StructuredPruning(masks_from=str(tmp_path / "missing.ckpt"))
    heads_only = StructuredPruning(prune_heads=0.5, prune_neurons=0.0, importance="magnitude", start_step=0,
                                   end_step=0, masks_from=str(source))
    with pytest.raises(ValueError, match=r"masks_from .*pruned.ckpt removed units of \['feed_forward'\], which this "
                                         r"run does not prune .*they would grow back"):
        trainer(tmp_path / "a", [heads_only], max_steps=1).fit(AttentionBlock(), block_data())
    plain = tmp_path / "plain.ckpt"
    fit = trainer(tmp_path / "b", [], max_steps=1)
    fit.fit(AttentionBlock(), block_data())
    fit.save_checkpoint(plain)
    with pytest.raises(ValueError, match=r"masks_from .*plain.ckpt records no removed units"):
        trainer(tmp_path / "c", [StructuredPruning(masks_from=str(plain))], max_steps=1).fit(AttentionBlock(),
                                                                                          block_data())


class TwoBlocks(Regression):
    """Two attention + feed-forward blocks in a row (an "encoder" and a "decoder" to prune apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = AttentionBlock(), AttentionBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def two_prunings(start: int = 0, end: int = 0, frequency: int = 1, masks_from: Optional[Path] = None,
                 importance: str = "magnitude") -> list:
    """The first block loses a quarter of its heads and 30% of its neurons, the second three quarters and 60%."""
    source = None if masks_from is None else str(masks_from)
    return [StructuredPruning(prune_heads=0.25, prune_neurons=0.3, importance=importance, start_step=start,
                              end_step=end, frequency=frequency, include=["first.*"], masks_from=source),
            StructuredPruning(prune_heads=0.75, prune_neurons=0.6, importance=importance, start_step=start,
                              end_step=end, frequency=frequency, include=["second.*"], masks_from=source)]


def smallest_units(block: AttentionBlock, heads: int, neurons: int) -> tuple[list[float], list[float]]:
    """Keep vectors that drop the ``heads`` / ``neurons`` of smallest L2 norm over their rows, biases and
    columns, computed here from the weights."""
    def norms(rows: list[nn.Linear], columns: list[nn.Linear], width: int) -> torch.Tensor:
        squares = sum((layer.weight.pow(2).sum(1) + layer.bias.pow(2)).view(-1, width).sum(1) for layer in rows)
        return (squares + sum(layer.weight.pow(2).sum(0).view(-1, width).sum(1) for layer in columns)).sqrt()

    attention, feed_forward = block.attention, block.feed_forward
    keeps = []
    for score, dropped in ((norms([attention.q_proj, attention.k_proj, attention.v_proj], [attention.out_proj],
                                  HEAD_DIM), heads),
                           (norms([feed_forward.fc1], [feed_forward.fc2], 1), neurons)):
        keep = torch.ones(len(score))
        keep[score.argsort()[:dropped]] = 0.0
        keeps.append(keep.tolist())
    return keeps[0], keeps[1]


def test_two_instances_prune_their_own_modules_at_their_own_fractions(tmp_path: Path) -> None:
    """The decoder pruned harder than the encoder: each callback removes its own fraction of its own
    modules' units, the smallest by magnitude within each module (computed here from the weights)."""
    torch.manual_seed(0)
    model = TwoBlocks()
    expected = {"first": smallest_units(model.first, 1, 3), "second": smallest_units(model.second, 3, 6)}
    fit = trainer(tmp_path, two_prunings(), max_steps=1)
    fit.fit(model, block_data())
    for name in ("first", "second"):
        block = getattr(model, name)
        kept = (find_weight_transform(block.attention.q_proj, UnitMask).keep.tolist(),
                find_weight_transform(block.feed_forward.fc1, UnitMask).keep.tolist())
        assert kept == expected[name], name
    assert expected["first"] != smallest_units(model.first, 3, 6)  # the fractions differ, and the test can tell


def test_two_instances_resume_exactly_each_with_its_own_state(tmp_path: Path) -> None:
    """Taylor importances gathered by both callbacks survive a resume between two prunings; the
    checkpoint holds one state per callback, keyed by its selection."""
    def make_model() -> TwoBlocks:
        torch.manual_seed(0)
        return TwoBlocks()

    def data() -> DataLoader:
        return ResumableLoader(block_data(sentences=48, batch_size=4).dataset, batch_size=4)

    straight, resumed = resumed_and_uninterrupted(tmp_path, make_model, lambda: two_prunings(5, 15, 5, importance="taylor"),
                                                  data, stop=7, total=12)
    assert_same_state(straight, resumed)
    checkpoint = torch.load(tmp_path / "ckpt" / "mid.ckpt", weights_only=False)
    keys = [key for key in checkpoint["callbacks"] if key.startswith("StructuredPruning")]
    assert len(keys) == 2 and all(checkpoint["callbacks"][key]["scores"] is not None for key in keys)
    assert StructuredPruning().state_key == "StructuredPruning"  # the default selection: the key of older checkpoints


def test_two_instances_adopt_their_own_units_from_one_checkpoint(tmp_path: Path) -> None:
    """A fine-tuning phase after a two-callback pruning: with masks_from, each callback adopts the
    units of its own modules, and nothing more goes."""
    torch.manual_seed(0)
    fit = trainer(tmp_path / "source", two_prunings(2, 2), max_steps=4)
    fit.fit(TwoBlocks(), block_data(sentences=32))
    fit.save_checkpoint(tmp_path / "pruned.ckpt")
    saved = torch.load(tmp_path / "pruned.ckpt", weights_only=True)["state_dict"]
    torch.manual_seed(5)
    model = TwoBlocks()
    trainer(tmp_path / "tuned", two_prunings(masks_from=tmp_path / "pruned.ckpt"), max_steps=3).fit(model, block_data())
    for name in ("first.attention.q_proj", "first.feed_forward.fc1", "second.attention.q_proj", "second.feed_forward.fc1"):
        key = f"{name}.parametrizations.weight.0.keep"
        assert model.state_dict()[key].tolist() == saved[key].tolist(), name
    assert sum(saved["second.attention.q_proj.parametrizations.weight.0.keep"].tolist()) == 1


def test_two_instances_selecting_one_module_are_refused(tmp_path: Path) -> None:
    prunings = [StructuredPruning(prune_heads=0.5, include=["first.*"], start_step=1, end_step=1),
                StructuredPruning(prune_heads=0.25, prune_neurons=0.0, include=["*.attention"], start_step=1,
                                  end_step=1)]
    with pytest.raises(ValueError, match=r"first.attention is selected by two StructuredPruning callbacks"):
        trainer(tmp_path, prunings, max_steps=1).fit(TwoBlocks(), block_data())


def test_a_checkpoint_keyed_by_the_plain_class_name_still_resumes_exactly(tmp_path: Path) -> None:
    """A checkpoint whose callback state is under "StructuredPruning" (as every one was before the
    key named the selection) resumes a run with include=[...] exactly: the importances gathered
    before the stop reach the next pruning."""
    def callbacks() -> list:
        return [StructuredPruning(prune_heads=0.5, prune_neurons=0.6, start_step=5, end_step=15, frequency=5,
                                  include=["attention", "feed_forward"])]

    def data() -> DataLoader:
        return ResumableLoader(block_data(sentences=48, batch_size=4).dataset, batch_size=4)

    def make_model() -> AttentionBlock:
        torch.manual_seed(0)
        return AttentionBlock()

    key = callbacks()[0].state_key
    assert key != "StructuredPruning"

    def rename_key(path: Path) -> None:
        checkpoint = torch.load(path, weights_only=False)
        checkpoint["callbacks"]["StructuredPruning"] = checkpoint["callbacks"].pop(key)
        torch.save(checkpoint, path)

    original_fit = L.Trainer.fit

    def fit(self, model, *args, ckpt_path=None, **kwargs):  # the resume reads the checkpoint renamed
        if ckpt_path is not None:
            rename_key(Path(ckpt_path))
        return original_fit(self, model, *args, ckpt_path=ckpt_path, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(L.Trainer, "fit", fit)
        straight, resumed = resumed_and_uninterrupted(tmp_path, make_model, callbacks, data, stop=7, total=12)
    assert_same_state(straight, resumed)
