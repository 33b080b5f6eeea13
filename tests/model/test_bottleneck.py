"""The deep, thin bottleneck Transformer (MobileBERT-style): shapes, parameters, decoding, features."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nmt_lightning.model import Transformer, TransformerConfig, TransformerFeatures
from nmt_lightning.model.attention import explicit_attention
from nmt_lightning.model.bottleneck import BottleneckDecoderLayer, BottleneckEncoderLayer

V, D, B, FFN, E = 50, 32, 16, 24, 8  # vocabulary, inter-block width, bottleneck, feed-forward, embedding


def thin(**overrides) -> Transformer:
    torch.manual_seed(0)
    config = dict(src_vocab_size=V, tgt_vocab_size=V, d_model=D, ffn_dim=FFN, heads=4, encoder_layers=2,
                  decoder_layers=2, dropout=0.0, bottleneck_dim=B, stacked_ffn=3, embedding_dim=E)
    config.update(overrides)
    return Transformer(TransformerConfig(**config)).eval()


def test_parameter_count_follows_the_architecture() -> None:
    model = thin()
    linear = lambda n_in, n_out, bias=True: n_in * n_out + (n_out if bias else 0)  # noqa: E731
    norm = lambda width: 2 * width  # noqa: E731
    ffn = linear(B, FFN) + linear(FFN, B) + norm(B)
    common = linear(D, B) + 4 * linear(B, B) + norm(B) + 3 * ffn + linear(B, D) + norm(D)
    cross = 2 * linear(B, B) + 2 * linear(D, B) + norm(B)  # queries from the bottleneck, keys/values from memory
    embeddings = V * E + 2 * linear(E, D) + linear(D, E, bias=False)  # one shared table, tied output projection
    assert model.num_parameters() == embeddings + 2 * common + 2 * (common + cross)
    assert all(isinstance(layer, BottleneckEncoderLayer) for layer in model.encoder_layers)
    assert all(isinstance(layer, BottleneckDecoderLayer) for layer in model.decoder_layers)
    assert model.output_projection.weight is model.src_embed.weight and model.src_embed.weight.shape == (V, E)


def test_shapes_and_recorded_features() -> None:
    model = thin()
    source, decoder_input = torch.randint(4, V, (3, 7)), torch.randint(4, V, (3, 5))
    source[0, 4:] = 0
    features = TransformerFeatures(hidden_states=True, attention=True)
    logits = model(source, decoder_input, features)
    assert logits.shape == (3, 5, V)
    # Layer outputs have the inter-block width (what layer-wise transfer compares with the teacher's).
    assert [tuple(s.shape) for s in features.encoder_states] == [(3, 7, D)] * 3
    assert [tuple(s.shape) for s in features.decoder_states] == [(3, 5, D)] * 3
    assert [tuple(p.shape) for p in features.cross_attention] == [(3, 4, 5, 7)] * 2
    assert (features.encoder_self_attention[0][0, :, :, 4:] == 0).all()
    torch.testing.assert_close(model(source, decoder_input), logits, rtol=1e-5, atol=1e-5)


def test_incremental_decoding_matches_full_decoding() -> None:
    model = thin(pre_norm=True)
    source, decoder_input = torch.randint(4, V, (2, 6)), torch.randint(4, V, (2, 5))
    full = model(source, decoder_input)
    memory, mask = model.encode(source)
    caches = model.new_cache()
    steps = [model.decode_step(decoder_input[:, t : t + 1], memory, mask, caches, t) for t in range(5)]
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert caches[0]["self_kv"].view(0).shape == (2, 4, 5, B // 4)  # keys cached at the bottleneck width


def test_leaves_are_standard_modules() -> None:
    kinds = {type(m) for m in thin().modules() if not list(m.children())}
    assert kinds <= {nn.Linear, nn.Embedding, nn.LayerNorm, nn.Dropout, nn.Identity}


def test_embeddings_of_the_model_width_need_no_projection() -> None:
    model = thin(embedding_dim=None)
    assert not hasattr(model, "encoder_embed_projection") and model.src_embed.weight.shape == (V, D)


@pytest.mark.parametrize("overrides, message", [
    ({"bottleneck_dim": 18}, r"bottleneck_dim=18 is not divisible by heads=4"),
    ({"bottleneck_dim": None, "stacked_ffn": 2}, "set bottleneck_dim too"),
    ({"stacked_ffn": 0}, "stacked_ffn must be >= 1"),
    ({"embedding_dim": 0}, "embedding_dim must be >= 1"),
])
def test_bad_configuration(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        thin(**overrides)


def test_explicit_attention_probabilities_times_values_are_sdpa_output() -> None:
    """What layer-wise attention transfer reads is the attention the model computes."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=generator) for _ in range(3))
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    for causal, attn_mask in ((False, mask), (True, None)):
        output, probabilities = explicit_attention(q, k, v, attn_mask, causal, 0.0)
        reference = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
        # Products of O(1) numbers summed over 5 keys and 8 dimensions: a few float32 ulps.
        torch.testing.assert_close(probabilities @ v, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-5)


def test_the_bottleneck_preset_is_under_a_third_of_its_teacher() -> None:
    """tiny-bottleneck: the deep-thin student of the 6+6 teacher (recipes/libreoffice_en_cs/teacher.yaml)."""
    student = Transformer.from_preset("tiny-bottleneck", 8000, 8000)
    teacher = Transformer.from_preset("tiny", 8000, 8000, encoder_layers=6, decoder_layers=6)
    assert (student.config.encoder_layers, student.config.d_model) == (6, teacher.config.d_model)
    assert student.num_parameters() / teacher.num_parameters() < 0.3
