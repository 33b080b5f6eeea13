import pytest
import torch
from torch import nn

from nmt_lightning.model import Transformer, TransformerConfig


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    config = dict(src_vocab_size=50, tgt_vocab_size=50, d_model=32, ffn_dim=64, heads=4, encoder_layers=2,
                  decoder_layers=2, dropout=0.0)
    config.update(overrides)
    return Transformer(TransformerConfig(**config)).eval()


@pytest.mark.parametrize("pre_norm", [False, True])
def test_shapes(pre_norm: bool) -> None:
    model = tiny(pre_norm=pre_norm)
    logits = model(torch.randint(4, 50, (3, 7)), torch.randint(4, 50, (3, 5)))
    assert logits.shape == (3, 5, 50)


def test_tied_weights_are_one_parameter() -> None:
    model = tiny(share_embeddings="all")
    assert model.src_embed is model.tgt_embed
    assert model.output_projection.weight is model.tgt_embed.weight
    # Counted once, and one gradient accumulates both uses.
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in tiny(share_embeddings="none").parameters())
    model(torch.randint(4, 50, (2, 4)), torch.randint(4, 50, (2, 3))).sum().backward()
    assert model.src_embed.weight.grad is not None
    decoder_only = tiny(share_embeddings="decoder", tgt_vocab_size=60)
    assert decoder_only.output_projection.weight is decoder_only.tgt_embed.weight
    assert decoder_only.src_embed is not decoder_only.tgt_embed


def test_causal_mask_hides_future_target_tokens() -> None:
    model = tiny()
    source = torch.randint(4, 50, (2, 6))
    decoder_input = torch.randint(4, 50, (2, 5))
    changed = decoder_input.clone()
    changed[:, 3:] = torch.randint(4, 50, (2, 2))
    a, b = model(source, decoder_input), model(source, changed)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_padding_mask_hides_source_padding() -> None:
    model = tiny()
    source = torch.randint(4, 50, (1, 5))
    padded = torch.cat([source, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    decoder_input = torch.randint(4, 50, (1, 4))
    torch.testing.assert_close(model(source, decoder_input), model(padded, decoder_input), rtol=1e-5, atol=1e-5)


def test_incremental_decoding_matches_full_decoding() -> None:
    model = tiny()
    source, decoder_input = torch.randint(4, 50, (2, 6)), torch.randint(4, 50, (2, 5))
    full = model(source, decoder_input)
    memory, mask = model.encode(source)
    caches = model.new_cache()
    steps = [model.decode_step(decoder_input[:, t : t + 1], memory, mask, caches, t) for t in range(5)]
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_leaves_are_standard_modules() -> None:
    kinds = {type(m) for m in tiny(pre_norm=True).modules() if not list(m.children())}
    assert kinds <= {nn.Linear, nn.Embedding, nn.LayerNorm, nn.Dropout, nn.Identity}


@pytest.mark.parametrize("overrides, message", [
    ({"d_model": 30, "heads": 4}, "not divisible"),
    ({"share_embeddings": "all", "tgt_vocab_size": 60}, "joint vocabulary"),
    ({"share_embeddings": "some"}, "share_embeddings must be one of"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"encoder_layers": 0}, "encoder_layers must be >= 1"),
])
def test_bad_configuration(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_presets() -> None:
    big = Transformer.from_preset("big", 100, 100)
    assert (big.config.d_model, big.config.ffn_dim, big.config.heads) == (1024, 4096, 16)
    with pytest.raises(ValueError, match="unknown preset"):
        Transformer.from_preset("huge", 10, 10)


@pytest.mark.parametrize("use_cache", [False, True])
def test_hypotheses_can_share_their_sentence_encoder_output(use_cache: bool) -> None:
    """Beam search passes one memory row per sentence for g hypothesis rows: the same logits
    as repeating the memory g times."""
    model, group = tiny(), 3
    source = torch.randint(4, 50, (2, 6))
    source[1, 4:] = 0  # padding: the mask must follow its sentence
    decoder_input = torch.randint(4, 50, (2 * group, 4))
    memory, mask = model.encode(source)
    repeated = model.decode(decoder_input, memory.repeat_interleave(group, 0), mask.repeat_interleave(group, 0))
    if use_cache:
        caches = model.new_cache()
        shared = torch.stack([model.decode_step(decoder_input[:, t : t + 1], memory, mask, caches, t)
                              for t in range(4)], 1)
        assert caches[0]["cross_k"].shape[0] == 2  # one copy of the encoder keys per sentence
    else:
        shared = model.decode(decoder_input, memory, mask)
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-5)


def test_grouped_queries_must_divide_and_not_be_causal() -> None:
    attention = tiny().decoder_layers[0].cross_attn
    with pytest.raises(ValueError, match="5 query rows cannot share 2 key/value rows"):
        attention(torch.randn(5, 1, 32), torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match="need is_causal=False"):
        attention(torch.randn(4, 3, 32), torch.randn(2, 3, 32), is_causal=True)
