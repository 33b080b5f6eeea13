"""StructuredPruning on torch's own layers: nn.MultiheadAttention's heads and the feed-forward
neurons of nn.TransformerEncoderLayer, found without naming them.

The head importances are checked against an attention written out by hand from the module's
weights, with a gate per sentence and head multiplying each head's output: autograd's gradient
at the gates (all ones) is the importance before the absolute value. The hand-written attention
never calls nn.MultiheadAttention, so a wrong reconstruction of the heads' outputs (the
probabilities before the padding mask, another head order, the bias left out of the values, the
keys taken for the values, a sequence-first gradient read batch first) answers differently:
self-attention batch first, and cross-attention sequence first with T != S and keys != values.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from callbacks import StructuredPruning
from callbacks.structured_pruning import find_unit_groups
from nmt_lightning.export import export_module, load_module
from tests.callbacks.classifier import ResumableLoader
from tests.callbacks.helpers import (assert_same_state, replayed_head_importances, resumed_and_uninterrupted,
                                     trainer)

WIDTH, HEADS, NEURONS = 12, 4, 10
HEAD_DIM = WIDTH // HEADS


def padding(sentences: int, length: int = 5) -> torch.Tensor:
    """(B, S) True at padded key positions: sentence b has its last b % 3 positions padded."""
    positions = torch.arange(length)
    return torch.stack([positions >= length - index % 3 for index in range(sentences)])


class PaddedRegression(L.LightningModule):
    """Random vectors (B, T, WIDTH) with padded positions regressed onto random targets;
    subclasses give ``forward(x, pad)``."""

    def training_step(self, batch, batch_index):
        inputs, pad, targets = batch
        return F.mse_loss(self(inputs, pad), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class TorchAttention(PaddedRegression):
    """Self-attention by nn.MultiheadAttention (batch first, a key padding mask, no weights asked
    for, as nn.TransformerEncoderLayer calls it)."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return x + self.attention(x, x, x, key_padding_mask=pad, need_weights=False)[0]

    def by_hand(self, x: torch.Tensor, pad: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The forward with the attention written out, each head's output times its gate (B, heads)."""
        return x + attention_by_hand(self.attention, x, x, x, pad, gates)


class TorchCrossAttention(PaddedRegression):
    """Cross-attention, sequence first: the first 3 positions attend to all 5 (T != S, the keys
    padded), whose values are tanh of the keys (key != value); the last 2 pass unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(WIDTH, HEADS)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        query, memory = x[:, :3].transpose(0, 1), x.transpose(0, 1)  # (T, B, E), (S, B, E)
        attended = self.attention(query, memory, torch.tanh(memory), key_padding_mask=pad)[0].transpose(0, 1)
        return torch.cat([x[:, :3] + attended, x[:, 3:]], dim=1)

    def by_hand(self, x: torch.Tensor, pad: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        attended = attention_by_hand(self.attention, x[:, :3], x, torch.tanh(x), pad, gates)
        return torch.cat([x[:, :3] + attended, x[:, 3:]], dim=1)


class TorchEncoder(PaddedRegression):
    """Two stock nn.TransformerEncoderLayer (sequence first, post-norm, no dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(WIDTH, HEADS, NEURONS, dropout=0.0), 2,
                                             enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.transpose(0, 1), src_key_padding_mask=pad).transpose(0, 1)


def data(sentences: int = 8, batch_size: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(sentences, 5, WIDTH, generator=generator)
    targets = torch.randn(sentences, 5, WIDTH, generator=generator)
    return DataLoader(TensorDataset(inputs, padding(sentences), targets), batch_size=batch_size)


def attention_by_hand(module: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      pad: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """What ``module(query, key, value, key_padding_mask=pad)`` computes (batch first), each head's
    output times its gate (B, heads): query (B, T, E), key and value (B, S, E) -> (B, T, E)."""
    weight, bias = module.in_proj_weight, module.in_proj_bias
    q, k, v = (F.linear(x, weight[i * WIDTH:(i + 1) * WIDTH], bias[i * WIDTH:(i + 1) * WIDTH])
               for i, x in enumerate((query, key, value)))
    q, k, v = (t.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2) for t in (q, k, v))  # (B, heads, T or S, head_dim)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(HEAD_DIM)
    scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    heads = scores.softmax(-1) @ v * gates[:, :, None, None]
    return F.linear(heads.transpose(1, 2).flatten(2), module.out_proj.weight, module.out_proj.bias)


def gated_head_gradients(model: PaddedRegression, inputs: torch.Tensor, pad: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    """dL/d gate of every (sentence, head), L the model's MSE; the parameters' gradients are left in place."""
    gates = torch.ones(inputs.shape[0], HEADS, requires_grad=True)
    F.mse_loss(model.by_hand(inputs, pad, gates), targets).backward()
    return gates.grad


@pytest.mark.parametrize("make", [TorchAttention, TorchCrossAttention])
def test_taylor_importance_of_multihead_attention_heads_is_the_gate_gradient_per_sentence(tmp_path: Path,
                                                                                          make: type) -> None:
    found, expected = replayed_head_importances(tmp_path, make, data, gated_head_gradients, HEADS)
    # float32 products summed in another order: a few ulp of the largest term
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-7)
    # Not the absolute value of the batch's sum: these inputs tell the two apart.
    torch.manual_seed(0)
    gradients = gated_head_gradients(make(), *next(iter(data())))
    assert not torch.allclose(gradients.sum(0).abs(), gradients.abs().sum(0))


@pytest.mark.parametrize("need_weights, average", [(False, True), (True, True), (True, False)])
def test_the_caller_gets_what_it_asked_for_while_importances_are_gathered(need_weights: bool, average: bool) -> None:
    """While scoring, the module is called with its per-head probabilities; the caller still gets
    its output and the weights it asked for, as without the callback."""
    torch.manual_seed(0)
    plain, scored = TorchAttention(), TorchAttention()
    scored.load_state_dict(plain.state_dict())
    callback = StructuredPruning(prune_heads=0.5, prune_neurons=0.0, start_step=1, end_step=4)
    callback.setup(None, scored, "fit")
    callback._scoring = True
    x = torch.randn(2, 5, WIDTH, requires_grad=True)
    pad = padding(2)
    expected = plain.attention(x, x, x, key_padding_mask=pad, need_weights=need_weights, average_attn_weights=average)
    found = scored.attention(x, x, x, key_padding_mask=pad, need_weights=need_weights, average_attn_weights=average)
    torch.testing.assert_close(found[0], expected[0], rtol=1e-5, atol=1e-6)
    if need_weights:
        assert found[1].shape == expected[1].shape
        torch.testing.assert_close(found[1], expected[1], rtol=1e-5, atol=1e-6)
    else:
        assert found[1] is None and expected[1] is None
    found[0].sum().backward()
    assert callback.groups[0].pending is not None  # the heads' importances were gathered


def test_masked_heads_compute_what_the_kept_heads_alone_compute() -> None:
    """Masking a head's q/k/v rows of the fused weight and its out_proj columns equals a gate of 0
    on that head's output, and the magnitude counts the head's rows in all three blocks."""
    torch.manual_seed(0)
    model = TorchAttention()
    callback = StructuredPruning(prune_heads=0.5, prune_neurons=0.0, importance="magnitude", start_step=0, end_step=0)
    callback.setup(None, model, "fit")
    (group,) = callback.groups
    weight, bias = model.attention.in_proj_weight.detach().clone(), model.attention.in_proj_bias.detach().clone()
    out = model.attention.out_proj.weight.detach()
    rows = [block * WIDTH + head * HEAD_DIM + torch.arange(HEAD_DIM) for block in range(3) for head in range(HEADS)]
    expected = torch.tensor([
        sum(weight[rows[block * HEADS + head]].double().pow(2).sum() + bias[rows[block * HEADS + head]].double().pow(2)
            .sum() for block in range(3)) + out[:, head * HEAD_DIM:(head + 1) * HEAD_DIM].double().pow(2).sum()
        for head in range(HEADS)]).sqrt()
    torch.testing.assert_close(group.magnitudes(), expected)
    keep = torch.tensor([1.0, 0.0, 0.0, 1.0])
    group.set_keep(keep)
    x, pad = torch.randn(3, 5, WIDTH), padding(3)
    with torch.no_grad():
        torch.testing.assert_close(model(x, pad), model.by_hand(x, pad, keep.expand(3, HEADS)), rtol=1e-5, atol=1e-6)


def test_torch_layers_are_found_without_naming_them_and_odd_attentions_are_refused() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16)
    found = find_unit_groups(layer, ["*"], [], ["heads", "neurons"])
    assert [(g.name, g.kind, g.width, g.rows, g.columns, g.fused_rows) for g in found] == [
        ("", "neurons", 1, ("linear1",), ("linear2",), None),
        ("self_attn", "heads", 4, (), ("out_proj",), "in_proj")]
    decoder = nn.TransformerDecoderLayer(8, 2, 16)
    assert [g.name for g in find_unit_groups(decoder, ["*"], [], ["heads", "neurons"])] == [
        "", "self_attn", "multihead_attn"]
    with pytest.raises(ValueError, match=r"^StructuredPruning: attn is a torch.nn.MultiheadAttention with kdim"):
        find_unit_groups(nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, kdim=4, vdim=4)}), ["*"], [], ["heads"])
    with pytest.raises(ValueError, match=r"^StructuredPruning: attn is a torch.nn.MultiheadAttention with add_bias_kv"):
        find_unit_groups(nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, add_bias_kv=True)}), ["*"], [], ["heads"])


def pruning() -> list:
    return [StructuredPruning(start_step=2, end_step=6, frequency=2)]  # the defaults: half of the heads and neurons


def resumable_data() -> DataLoader:
    return ResumableLoader(data(sentences=40, batch_size=4).dataset, batch_size=4)  # resumes mid-epoch


def seeded_encoder() -> TorchEncoder:
    torch.manual_seed(0)
    return TorchEncoder()


def test_a_stock_transformer_encoder_is_pruned_with_the_defaults_and_resumes_exactly(tmp_path: Path) -> None:
    straight, resumed = resumed_and_uninterrupted(tmp_path, seeded_encoder, pruning, resumable_data, stop=3, total=8)
    assert_same_state(straight, resumed)
    keeps = {name: value for name, value in straight.items() if name.endswith(".keep")}
    heads = [v for n, v in keeps.items() if "in_proj_weight" in n]
    neurons = [v for n, v in keeps.items() if "linear1" in n]
    assert len(heads) == 2 and all(v.sum() == HEADS // 2 for v in heads)
    assert len(neurons) == 2 and all(v.sum() == NEURONS // 2 for v in neurons)


def trained_encoder(tmp_path: Path) -> TorchEncoder:
    """A TorchEncoder that lost half of its heads and neurons, saved as ``tmp_path``/trained.ckpt."""
    L.seed_everything(0)
    model = TorchEncoder()
    fit = trainer(tmp_path / "fit", pruning(), max_steps=8)
    fit.fit(model, data(sentences=32))
    fit.save_checkpoint(tmp_path / "trained.ckpt")
    return model.eval()


def kept_heads(attention: nn.MultiheadAttention) -> torch.Tensor:
    """(heads,) True for a head the masks keep: its out_proj columns are not all zero (as the masked forward
    computes them: the transform chain's result)."""
    return (attention.out_proj.weight != 0).any(0).view(HEADS, HEAD_DIM).any(1)


def test_the_export_cuts_multihead_attention_heads_and_neurons(tmp_path: Path) -> None:
    """The loaded encoder's attentions hold only the kept heads: each of the q, k and v blocks of
    in_proj_weight keeps the trained rows of those heads (a cut of one contiguous range, or of the
    first block only, keeps others), out_proj their columns; it computes what the masked model did."""
    from nmt_lightning.export.pruned_attention import PrunedMultiheadAttention

    model = trained_encoder(tmp_path)
    export_module(tmp_path / "trained.ckpt", TorchEncoder(), tmp_path / "pruned.safetensors")
    loaded = load_module(TorchEncoder(), tmp_path / "pruned.safetensors")
    x, pad = torch.randn(3, 5, WIDTH, generator=torch.Generator().manual_seed(1)), padding(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, pad), model(x, pad), rtol=1e-5, atol=1e-5)
    kept_width = HEADS // 2 * HEAD_DIM
    for trained, layer in zip(model.encoder.layers, loaded.encoder.layers):
        assert tuple(layer.linear1.weight.shape) == (NEURONS // 2, WIDTH)
        attention = layer.self_attn
        assert isinstance(attention, PrunedMultiheadAttention) and attention.num_heads == HEADS // 2
        assert tuple(attention.in_proj_weight.shape) == (3 * kept_width, WIDTH)
        assert tuple(attention.out_proj.weight.shape) == (WIDTH, kept_width)
        kept = kept_heads(trained.self_attn)
        assert attention.kept_heads == torch.nonzero(kept).flatten().tolist()
        rows = trained.self_attn.in_proj_weight.detach().view(3, HEADS, HEAD_DIM, WIDTH)[:, kept]
        torch.testing.assert_close(attention.in_proj_weight.view(3, HEADS // 2, HEAD_DIM, WIDTH), rows, rtol=0, atol=0)
        columns = trained.self_attn.out_proj.weight.detach().view(WIDTH, HEADS, HEAD_DIM)[:, kept]
        torch.testing.assert_close(attention.out_proj.weight.view(WIDTH, HEADS // 2, HEAD_DIM), columns, rtol=0, atol=0)


def test_an_attention_that_lost_no_head_stays_torchs(tmp_path: Path) -> None:
    """A record whose heads are all kept (a layer the schedule left whole) changes nothing: that
    layer keeps its nn.MultiheadAttention (and torch's fused kernels), the other is cut."""
    from nmt_lightning.export.pruned_attention import PrunedMultiheadAttention

    trained_encoder(tmp_path)
    checkpoint = torch.load(tmp_path / "trained.ckpt", weights_only=False)
    whole = "encoder.layers.0.self_attn."
    for name in [n for n in checkpoint["state_dict"] if n.startswith(whole) and n.endswith(".keep")]:
        checkpoint["state_dict"][name] = torch.ones_like(checkpoint["state_dict"][name])
    export_module(checkpoint, TorchEncoder(), tmp_path / "one_whole.safetensors")
    loaded = load_module(TorchEncoder(), tmp_path / "one_whole.safetensors")
    first, second = (layer.self_attn for layer in loaded.encoder.layers)
    assert isinstance(first, nn.MultiheadAttention) and tuple(first.in_proj_weight.shape) == (3 * WIDTH, WIDTH)
    assert isinstance(second, PrunedMultiheadAttention) and second.num_heads == HEADS // 2


def test_a_record_of_earlier_versions_not_cut_still_exports_zeros(tmp_path: Path) -> None:
    """Checkpoints written before the heads were cut record nn.MultiheadAttention with ``cut: False``:
    their export keeps the attention's shapes and writes the removed heads as zeros."""
    model = trained_encoder(tmp_path)
    checkpoint = torch.load(tmp_path / "trained.ckpt", weights_only=False)
    for name, record in checkpoint["compression_structure"].items():
        if record.get("fused_rows"):
            record["cut"] = False
    export_module(checkpoint, TorchEncoder(), tmp_path / "zeros.safetensors")
    loaded = load_module(TorchEncoder(), tmp_path / "zeros.safetensors")
    x, pad = torch.randn(3, 5, WIDTH, generator=torch.Generator().manual_seed(1)), padding(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, pad), model(x, pad), rtol=1e-5, atol=1e-5)
    for layer in loaded.encoder.layers:
        assert isinstance(layer.self_attn, nn.MultiheadAttention)
        assert tuple(layer.self_attn.in_proj_weight.shape) == (3 * WIDTH, WIDTH)
        dropped = ~kept_heads(layer.self_attn)
        assert int(dropped.sum()) == HEADS // 2
        rows = layer.self_attn.in_proj_weight.view(3, HEADS, HEAD_DIM, WIDTH)
        assert bool((rows[:, dropped] == 0).all()) and bool((rows[:, ~dropped] != 0).any())


def test_composed_with_transforms_added_after_it_a_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """MagnitudePruning and Quant-Noise set up after StructuredPruning rebuild out_proj's transform
    chain; the heads' importances still read the weights the forward used, and a run stopped
    between two prunings ends where the straight one does."""
    from callbacks import MagnitudePruning, QuantNoise

    def callbacks() -> list:
        return [*pruning(), MagnitudePruning(sparsity=0.5, start_step=1, end_step=7, frequency=2, include=["*"]),
                QuantNoise(p=0.25, block_size=2)]

    straight, resumed = resumed_and_uninterrupted(tmp_path, seeded_encoder, callbacks, resumable_data, stop=3, total=8)
    assert_same_state(straight, resumed)
    chain = [key for key in straight if key.startswith("encoder.layers.0.self_attn.out_proj.parametrizations.weight.")]
    assert any(key.endswith(".keep") for key in chain) and any(key.endswith(".mask") for key in chain)


def test_masks_from_keeps_the_multihead_attention_heads_a_checkpoint_removed(tmp_path: Path) -> None:
    """A fine-tuning phase after pruning torch's layers: the record of a fused attention (its
    ``in_proj`` rows) is adopted, and the same heads stay removed although the new
    weights' magnitudes would choose others."""
    torch.manual_seed(0)
    source = TorchEncoder()
    first = StructuredPruning(importance="magnitude", start_step=2, end_step=2)
    fit = trainer(tmp_path / "source", [first], max_steps=4)
    fit.fit(source, data(sentences=16))
    fit.save_checkpoint(tmp_path / "pruned.ckpt")
    record = torch.load(tmp_path / "pruned.ckpt", weights_only=False)["compression_structure"]
    assert record["encoder.layers.0.self_attn"]["fused_rows"] == "in_proj"
    assert "cut" not in record["encoder.layers.0.self_attn"] and "cut" not in record["encoder.layers.0"]
    expected = [group.keep.tolist() for group in first.groups]

    def keeps(masks_from: Optional[Path]) -> list[list[float]]:
        torch.manual_seed(5)  # other weights: their magnitudes rank the units otherwise
        model = TorchEncoder()
        callback = StructuredPruning(importance="magnitude", start_step=0, end_step=0,
                                     masks_from=None if masks_from is None else str(masks_from))
        trainer(tmp_path / f"tuned_{masks_from is None}", [callback], max_steps=2).fit(model, data(sentences=16))
        return [group.keep.tolist() for group in callback.groups]

    assert keeps(None) != expected  # the test can tell
    assert keeps(tmp_path / "pruned.ckpt") == expected


class TorchSeq2Seq(L.LightningModule):
    """nn.Transformer, batch first, no dropout: a causal decoder self-attention (its mask given,
    as torch asks) and cross-attention over the encoder's output."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Transformer(WIDTH, HEADS, 1, 1, NEURONS, dropout=0.0, batch_first=True)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(target.shape[1])
        return self.transformer(source, target, tgt_mask=mask, tgt_is_causal=True)

    def training_step(self, batch, batch_index):
        source, target = batch
        return F.mse_loss(self(source, target[:, :4]), target[:, 1:])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_an_nn_transformer_loses_heads_of_all_three_attentions_and_computes_as_before_while_scoring(
        tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TorchSeq2Seq()
    callback = StructuredPruning(start_step=2, end_step=4, frequency=2)
    generator = torch.Generator().manual_seed(3)
    pairs = TensorDataset(torch.randn(16, 6, WIDTH, generator=generator), torch.randn(16, 5, WIDTH, generator=generator))
    trainer(tmp_path, [callback], max_steps=5).fit(model, DataLoader(pairs, batch_size=4))
    heads = {group.name: int(group.keep.sum()) for group in callback.groups if group.kind == "heads"}
    assert heads == {"transformer.encoder.layers.0.self_attn": 2, "transformer.decoder.layers.0.self_attn": 2,
                     "transformer.decoder.layers.0.multihead_attn": 2}
    source, target = pairs.tensors[0][:2], pairs.tensors[1][:2, :4]
    callback._scoring = False
    plain = model.train()(source, target)
    callback._scoring = True  # the explicit-probabilities path
    scored = model(source, target)
    # SDPA and the explicit path sum the same float32 products in other orders (unit-scale values,
    # sums of a few dozen terms: ~1e-6 apart), through two layers and their LayerNorms
    torch.testing.assert_close(scored, plain, rtol=1e-5, atol=1e-5)
    scored.sum().backward()
    assert all(group.pending is not None for group in callback.groups if group.kind == "heads")


def test_an_nn_transformer_exports_without_the_removed_heads_and_translates_as_trained(tmp_path: Path) -> None:
    """Encoder self-attention, causal decoder self-attention (its mask and is_causal hint) and
    cross-attention, all with heads cut out, compute what the masked model did."""
    from nmt_lightning.export.pruned_attention import PrunedMultiheadAttention

    torch.manual_seed(0)
    model = TorchSeq2Seq()
    generator = torch.Generator().manual_seed(3)
    pairs = TensorDataset(torch.randn(16, 6, WIDTH, generator=generator), torch.randn(16, 5, WIDTH, generator=generator))
    fit = trainer(tmp_path, [StructuredPruning(start_step=2, end_step=4, frequency=2)], max_steps=5)
    fit.fit(model, DataLoader(pairs, batch_size=4))
    fit.save_checkpoint(tmp_path / "trained.ckpt")
    export_module(tmp_path / "trained.ckpt", TorchSeq2Seq(), tmp_path / "pruned.safetensors")
    loaded = load_module(TorchSeq2Seq(), tmp_path / "pruned.safetensors")
    attentions = [m for m in loaded.modules() if isinstance(m, PrunedMultiheadAttention)]
    assert len(attentions) == 3 and all(m.num_heads == HEADS // 2 for m in attentions)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in loaded.modules())
    source, target = pairs.tensors[0][:3], pairs.tensors[1][:3, :4]
    with torch.no_grad():
        torch.testing.assert_close(loaded(source, target), model.eval()(source, target), rtol=1e-5, atol=1e-5)
