"""PrunedMultiheadAttention, the loaded form of an nn.MultiheadAttention that lost heads, against
torch's own nn.MultiheadAttention with those heads' rows and columns zeroed (what the masked
model computes): the same outputs for every way torch's layers and users call an attention, and
for the kept heads the same attention weights.

The inputs make the wrong answers visible: keys other than values and T != S (a module reading
the keys as values, or the query's length for the keys', differs), padded keys and float masks
(a mask ignored or of the wrong sign differs), 3-D masks that differ per head (a mask not
narrowed to the kept heads, or narrowed to the wrong ones, differs).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from nmt_lightning.export.pruned_attention import PrunedMultiheadAttention

WIDTH, HEADS = 16, 4
HEAD_DIM = WIDTH // HEADS
KEPT = [0, 2, 3]  # not a prefix: a module that took the first heads fails


def pair(batch_first: bool, bias: bool = True) -> tuple[nn.MultiheadAttention, PrunedMultiheadAttention]:
    """(torch's attention with the heads outside KEPT zeroed, the pruned module of the KEPT heads)."""
    torch.manual_seed(0)
    full = nn.MultiheadAttention(WIDTH, HEADS, bias=bias, batch_first=batch_first)
    if bias:  # torch starts the biases at zero: random ones make a bias taken from the wrong rows visible
        nn.init.normal_(full.in_proj_bias)
        nn.init.normal_(full.out_proj.bias)
    dropped = torch.ones(HEADS, dtype=torch.bool)
    dropped[KEPT] = False
    with torch.no_grad():
        full.in_proj_weight.view(3, HEADS, HEAD_DIM, WIDTH)[:, dropped] = 0
        if bias:
            full.in_proj_bias.view(3, HEADS, HEAD_DIM)[:, dropped] = 0
        full.out_proj.weight.view(WIDTH, HEADS, HEAD_DIM)[:, dropped] = 0
    pruned = PrunedMultiheadAttention.like(full, KEPT)
    with torch.no_grad():
        pruned.in_proj_weight.copy_(full.in_proj_weight.view(3, HEADS, HEAD_DIM, WIDTH)[:, KEPT].reshape(-1, WIDTH))
        pruned.out_proj.weight.copy_(full.out_proj.weight.view(WIDTH, HEADS, HEAD_DIM)[:, KEPT].reshape(WIDTH, -1))
        if bias:
            pruned.in_proj_bias.copy_(full.in_proj_bias.view(3, HEADS, HEAD_DIM)[:, KEPT].reshape(-1))
            pruned.out_proj.bias.copy_(full.out_proj.bias)
    return full.eval(), pruned.eval()


def inputs(batch_first: bool, batch: int = 3, target: int = 4, source: int = 6) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    query, key = (torch.randn(batch, length, WIDTH, generator=generator) for length in (target, source))
    value = torch.tanh(key) + 0.5  # values other than the keys
    if not batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    return query, key, value


def key_padding(batch: int = 3, source: int = 6) -> torch.Tensor:
    """(B, S) True at padded keys: sentence b has its last b positions padded."""
    return torch.arange(source)[None, :] >= source - torch.arange(batch)[:, None]


# float32 products over WIDTH terms, summed in other orders by SDPA and the explicit softmax path
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "padding", "float", "bool and padding"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_outputs_and_kept_heads_weights_are_torchs(batch_first: bool, masks: str, need_weights: bool) -> None:
    full, pruned = pair(batch_first)
    query, key, value = inputs(batch_first)
    generator = torch.Generator().manual_seed(2)
    options = {"key_padding_mask": key_padding() if "padding" in masks else None,
               "attn_mask": {"float": torch.randn(4, 6, generator=generator),
                             "bool and padding": torch.rand(4, 6, generator=generator) > 0.7}.get(masks)}
    with torch.no_grad():
        expected, expected_weights = full(query, key, value, need_weights=need_weights, average_attn_weights=False,
                                          **options)
        found, weights = pruned(query, key, value, need_weights=need_weights, average_attn_weights=False, **options)
        torch.testing.assert_close(found, expected, **TOLERANCE)
        if need_weights:
            torch.testing.assert_close(weights, expected_weights[:, KEPT], **TOLERANCE)
            averaged = pruned(query, key, value, **options)[1]  # the mean over the kept heads only
            torch.testing.assert_close(averaged, expected_weights[:, KEPT].mean(1), **TOLERANCE)
        else:
            assert weights is None


def test_a_per_head_mask_of_the_original_heads_is_narrowed_to_the_kept_ones() -> None:
    """A 3-D attn_mask of batch x 4 rows (the heads before pruning) is narrowed to heads 0, 2, 3;
    one of batch x 3 rows is taken as the pruned module's own."""
    full, pruned = pair(batch_first=False)
    query, key, value = inputs(batch_first=False)
    mask = torch.randn(3 * HEADS, 4, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = full(query, key, value, attn_mask=mask, need_weights=False)[0]
        torch.testing.assert_close(pruned(query, key, value, attn_mask=mask, need_weights=False)[0], expected, **TOLERANCE)
        own = mask.view(3, HEADS, 4, 6)[:, KEPT].reshape(-1, 4, 6)
        torch.testing.assert_close(pruned(query, key, value, attn_mask=own, need_weights=False)[0], expected, **TOLERANCE)
        with pytest.raises(ValueError, match=r"attn_mask of shape \(6, 4, 6\)"):
            pruned(query, key, value, attn_mask=mask[:6])


def test_unbatched_inputs_a_causal_hint_and_no_bias() -> None:
    full, pruned = pair(batch_first=True, bias=False)
    assert pruned.in_proj_bias is None and pruned.out_proj.bias is None
    query, key, value = (t[0] for t in inputs(batch_first=True))  # (T, E), (S, E)
    with torch.no_grad():
        expected, expected_weights = full(query, key, value, key_padding_mask=key_padding()[2])
        found, weights = pruned(query, key, value, key_padding_mask=key_padding()[2])
        torch.testing.assert_close(found, expected, **TOLERANCE)
        assert weights.shape == (4, 6)
        causal = nn.Transformer.generate_square_subsequent_mask(4)
        expected = full(query, query, query, attn_mask=causal, is_causal=True, need_weights=False)[0]
        torch.testing.assert_close(pruned(query, query, query, attn_mask=causal, is_causal=True)[0], expected, **TOLERANCE)
    with pytest.raises(RuntimeError, match="is_causal is a hint"):
        pruned(query, query, query, is_causal=True)


def test_the_constructor_refuses_impossible_heads() -> None:
    with pytest.raises(ValueError, match="kept_heads must be 2 distinct heads of 0..3"):
        PrunedMultiheadAttention(WIDTH, 2, HEAD_DIM, kept_heads=[1, 1], original_heads=4)
    with pytest.raises(ValueError, match="must be >= 1"):
        PrunedMultiheadAttention(WIDTH, 0, HEAD_DIM)


def test_a_batch_first_encoder_built_for_nested_tensors_runs_the_loaded_attention(tmp_path: Path) -> None:
    """nn.TransformerEncoder chooses its nested-tensor path when built (with torch's attention):
    in evaluation with a padding mask it would hand the layers nested tensors. Loading turns it
    off, and the pruned encoder computes what the masked one did."""
    from callbacks import StructuredPruning
    from nmt_lightning.export import export_module, load_module
    from tests.callbacks.helpers import trainer
    from tests.callbacks.test_structured_pruning_torch_layers import PaddedRegression, data, padding

    class NestedEncoder(PaddedRegression):
        def __init__(self) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(12, 4, 10, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2)

        def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
            return self.encoder(x, src_key_padding_mask=pad)

    assert NestedEncoder().encoder.use_nested_tensor  # the test can tell
    L.seed_everything(0)
    model = NestedEncoder()
    fit = trainer(tmp_path / "fit", [StructuredPruning(importance="magnitude", start_step=2, end_step=2)], max_steps=4)
    fit.fit(model, data(sentences=16))
    fit.save_checkpoint(tmp_path / "trained.ckpt")
    export_module(tmp_path / "trained.ckpt", NestedEncoder(), tmp_path / "pruned.safetensors")
    loaded = load_module(NestedEncoder(), tmp_path / "pruned.safetensors")
    assert not loaded.encoder.use_nested_tensor
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(x, padding(3))
        found = loaded(x, padding(3))
    keep = ~padding(3)  # the padded positions' outputs: torch's nested path writes zeros there, the dense path not
    torch.testing.assert_close(found[keep], expected[keep], rtol=1e-5, atol=1e-5)


def test_with_qat_its_out_proj_stays_an_nn_linear_of_the_int8_weight(tmp_path: Path) -> None:
    """StructuredPruning and QAT on nn.MultiheadAttention: the loaded attention reads out_proj by
    weight as torch's does, so it stays an nn.Linear (an int8 layer there would never run) holding
    the trained weight's kept columns on the int8 grid."""
    from callbacks import QuantizationAwareTraining, StructuredPruning
    from nmt_lightning.export import export_module, load_module
    from nmt_lightning.export.codecs.int8_kernels import Int8Linear
    from tests.callbacks.helpers import trainer
    from tests.callbacks.test_structured_pruning_torch_layers import TorchEncoder, data, padding

    L.seed_everything(0)
    trained = TorchEncoder()
    callbacks = [StructuredPruning(importance="magnitude", start_step=2, end_step=2), QuantizationAwareTraining()]
    fit = trainer(tmp_path / "fit", callbacks, max_steps=6)
    fit.fit(trained, data(sentences=32))
    fit.save_checkpoint(tmp_path / "trained.ckpt")
    export_module(tmp_path / "trained.ckpt", TorchEncoder(), tmp_path / "pruned_int8.safetensors")
    loaded = load_module(TorchEncoder(), tmp_path / "pruned_int8.safetensors")
    x = torch.randn(5, 3, 12, generator=torch.Generator().manual_seed(1))  # (T, B, E): sequence first
    for trained_layer, layer in zip(trained.eval().encoder.layers, loaded.encoder.layers):
        attention = layer.self_attn
        assert isinstance(attention, PrunedMultiheadAttention) and attention.num_heads == 2
        assert type(attention.out_proj) is nn.Linear and isinstance(layer.linear1, Int8Linear)
        kept = torch.tensor(attention.kept_heads)
        columns = trained_layer.self_attn.out_proj.weight.detach().view(12, 4, 3)[:, kept].reshape(12, 6)
        # code x scale against the fake-quantized code / (127 / max|W|): float32 roundings apart
        torch.testing.assert_close(attention.out_proj.weight, columns, rtol=2.4e-7, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(attention(x, x, x, key_padding_mask=padding(3))[0],
                                       trained_layer.self_attn(x, x, x, key_padding_mask=padding(3))[0],
                                       rtol=1e-5, atol=1e-6)
