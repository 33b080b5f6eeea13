import copy

import pytest
import torch

from nmt_lightning.bpe import BOS_ID, EOS_ID, PAD_ID
from nmt_lightning.decoding import beam_search, greedy_search, top_k_of_rows
from nmt_lightning.model import Transformer, TransformerConfig


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(60, 60, d_model=32, ffn_dim=64, heads=4, encoder_layers=2,
                                         decoder_layers=2, dropout=0.0)).eval()


@pytest.fixture(scope="module")
def source() -> torch.Tensor:
    torch.manual_seed(1)
    source = torch.randint(4, 60, (6, 9))
    source[:, -1] = EOS_ID
    source[0, 5:] = PAD_ID  # a shorter sentence in the batch
    source[0, 4] = EOS_ID
    return source


def test_greedy_takes_the_most_probable_token_at_every_step(model: Transformer, source: torch.Tensor) -> None:
    found = greedy_search(model, source, max_len_a=0.0, max_len_b=6)
    for row, tokens in enumerate(found.tokens):
        prefix = [BOS_ID]
        while len(prefix) < 6:  # the cap: 6 positions, the last one forced to eos
            log_probs = torch.log_softmax(model(source[row : row + 1], torch.tensor([prefix]))[0, -1], -1)
            log_probs[[PAD_ID, BOS_ID]] = float("-inf")
            prefix.append(int(log_probs.argmax()))
            if prefix[-1] == EOS_ID:
                break
        assert tokens == [token for token in prefix[1:] if token != EOS_ID]


@pytest.mark.parametrize("beam", [1, 4])
@pytest.mark.parametrize("use_cache", [True, False])
def test_a_sentence_translates_the_same_alone_or_in_a_batch(model: Transformer, source: torch.Tensor,
                                                             beam: int, use_cache: bool) -> None:
    """Sentences leave the batch as they finish; that must not change anyone's result."""
    batched = beam_search(model, source, beam=beam, use_cache=use_cache)
    for row in range(len(source)):
        alone = beam_search(model, source[row : row + 1], beam=beam, use_cache=use_cache)
        assert alone.tokens == [batched.tokens[row]]
        torch.testing.assert_close(alone.scores, batched.scores[row : row + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beam", [1, 4])
def test_cache_gives_the_same_result_as_recomputing(model: Transformer, source: torch.Tensor, beam: int) -> None:
    cached = beam_search(model, source, beam=beam, use_cache=True)
    recomputed = beam_search(model, source, beam=beam, use_cache=False)
    assert cached.tokens == recomputed.tokens
    torch.testing.assert_close(cached.scores, recomputed.scores, rtol=1e-5, atol=1e-5)
    greedy_cached, greedy_full = greedy_search(model, source), greedy_search(model, source, use_cache=False)
    assert greedy_cached.tokens == greedy_full.tokens


@pytest.mark.parametrize("beam", [1, 3])
def test_scores_are_the_model_log_probability_of_the_output(model: Transformer, source: torch.Tensor, beam: int) -> None:
    result = beam_search(model, source, beam=beam, length_penalty=0.0)
    for row, tokens in enumerate(result.tokens):
        target = torch.tensor([tokens + [EOS_ID]])
        decoder_input = torch.tensor([[BOS_ID] + tokens])
        log_probs = torch.log_softmax(model(source[row : row + 1], decoder_input), -1)
        expected = log_probs.gather(-1, target.unsqueeze(-1)).sum()
        torch.testing.assert_close(result.scores[row], expected, rtol=1e-4, atol=1e-4)


def test_length_cap(model: Transformer, source: torch.Tensor) -> None:
    result = beam_search(model, source, beam=3, max_len_a=0.0, max_len_b=3)
    assert all(len(tokens) <= 2 for tokens in result.tokens)  # 3 positions, the last forced to eos
    with pytest.raises(ValueError, match="beam must be >= 1"):
        beam_search(model, source, beam=0)
    with pytest.raises(ValueError, match="min_length must be >= 0"):
        beam_search(model, source, min_length=-1)


@pytest.mark.parametrize("beam", [1, 3])
def test_min_length_keeps_eos_out_until_then(model: Transformer, source: torch.Tensor, beam: int) -> None:
    eager = copy.deepcopy(model)
    eager.output_projection.register_forward_hook(lambda _, __, logits: logits.index_add(
        -1, torch.tensor([EOS_ID]), torch.full((*logits.shape[:-1], 1), 100.0)))  # eos is always the favourite
    assert beam_search(eager, source, beam=beam).tokens == [[]] * len(source)
    assert all(len(tokens) == 3 for tokens in beam_search(eager, source, beam=beam, min_length=4).tokens)
    capped = beam_search(eager, source, beam=beam, min_length=9, max_len_a=0.0, max_len_b=3)
    assert all(len(tokens) == 2 for tokens in capped.tokens)  # the cap (3 with eos) wins


@pytest.mark.parametrize("width", [8000, 3000, 300, 20])
@pytest.mark.parametrize("k", [1, 4])
def test_top_k_of_rows_is_torch_topk(width: int, k: int) -> None:
    """Blocked (3000 columns: the last block padded) or not (300 and 20: too few blocks), with -inf entries."""
    torch.manual_seed(width)
    values = torch.randn(37, width) * 4
    values[:, :3] = float("-inf")  # banned tokens
    values[5, :] = float("-inf")
    values[5, -1] = 0.0  # a single finite entry, in the padded last block
    best, indices = top_k_of_rows(values, k)
    expected = values.topk(k, dim=-1)
    torch.testing.assert_close(best, expected.values)
    finite = expected.values.isfinite()  # the order among -inf is arbitrary
    assert torch.equal(indices[finite], expected.indices[finite])
    assert torch.equal(values.gather(1, indices), best)
