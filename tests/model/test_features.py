"""Model features: per-layer hidden states and attention probabilities, recorded only on request."""

import pytest
import torch

from nmt_lightning.model import TransformerFeatures
from nmt_lightning.model import attention as attention_module
from tests.model.test_transformer import tiny


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    source = torch.randint(4, 50, (3, 7), generator=generator)
    source[0, 4:] = 0  # padding: attention to it must be exactly zero
    return source, torch.randint(4, 50, (3, 5), generator=generator)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_features_come_with_the_same_logits(pre_norm: bool) -> None:
    model = tiny(pre_norm=pre_norm)
    source, decoder_input = batch()
    with torch.no_grad():
        plain = model(source, decoder_input)
        features = TransformerFeatures(hidden_states=True, attention=True)
        recorded = model(source, decoder_input, features)
    # The explicit softmax computes what SDPA computes, to float rounding (a few ulps of the logits).
    torch.testing.assert_close(recorded, plain, rtol=1e-5, atol=1e-5)
    assert [tuple(s.shape) for s in features.encoder_states] == [(3, 7, 32)] * 3
    assert [tuple(s.shape) for s in features.decoder_states] == [(3, 5, 32)] * 3
    assert features.encoder_output.shape == (3, 7, 32) and features.decoder_output.shape == (3, 5, 32)
    with torch.no_grad():  # the last hidden state is what the output projection reads
        torch.testing.assert_close(model.output_projection(features.decoder_output), plain, rtol=1e-5, atol=1e-5)
    for kind, shape in (("encoder_self_attention", (3, 4, 7, 7)), ("decoder_self_attention", (3, 4, 5, 5)),
                        ("cross_attention", (3, 4, 5, 7))):
        probabilities = getattr(features, kind)
        assert len(probabilities) == 2 and all(p.shape == shape for p in probabilities), kind
        for p in probabilities:
            torch.testing.assert_close(p.sum(-1), torch.ones(shape[:-1]), rtol=0, atol=1e-5)
    for p in features.decoder_self_attention:  # causal: nothing from later positions
        assert (p.triu(diagonal=1) == 0).all()
    for p in features.encoder_self_attention + features.cross_attention:
        assert (p[0, :, :, 4:] == 0).all()  # nothing from padding


def test_sdpa_stays_the_default_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a request no probabilities are materialised; hidden states alone keep SDPA too."""
    def refuse(*args, **kwargs):
        raise AssertionError("explicit attention used")

    monkeypatch.setattr(attention_module, "explicit_attention", refuse)
    model = tiny()
    source, decoder_input = batch()
    model(source, decoder_input)
    features = TransformerFeatures.requesting(["hidden_states"])
    model(source, decoder_input, features)
    assert len(features.encoder_states) == 3 and features.cross_attention == []


def test_gradients_flow_through_recorded_features() -> None:
    model = tiny().train()
    source, decoder_input = batch()
    features = TransformerFeatures.requesting(["hidden_states", "attention"])
    model(source, decoder_input, features)
    (features.encoder_states[1].sum() + features.cross_attention[0][:, :, :, 0].sum()).backward()
    assert model.encoder_layers[0].ffn.fc1.weight.grad is not None
    assert model.decoder_layers[0].cross_attn.q_proj.weight.grad is not None


def test_unknown_feature_names_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown model features \['logit'\]"):
        TransformerFeatures.requesting(["logit"])
