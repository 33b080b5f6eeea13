"""The beam-search cache: histories that move between slots only through ``lineage``."""

import pytest
import torch

from nmt_lightning.model import Transformer, TransformerConfig


def tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(50, 50, d_model=32, ffn_dim=64, heads=4, encoder_layers=2,
                                         decoder_layers=2, dropout=0.0)).eval()


def test_reordered_hypotheses_decode_as_their_own_histories() -> None:
    """Beam search reshuffles hypotheses within each sentence at every step; each row's logits
    must be those of a full decode of the tokens that row's history holds."""
    model, beam, sentences, steps = tiny(), 3, 2, 6
    source = torch.randint(4, 50, (sentences, 7))
    source[1, 5:] = 0
    memory, mask = model.encode(source)
    cache = model.new_cache(beam, capacity=2)  # also grows twice
    generator = torch.Generator().manual_seed(1)
    history = torch.randint(4, 50, (sentences * beam, 1), generator=generator)
    for step in range(steps):
        logits = model.decode_step(history[:, -1:], memory, mask, cache)
        full = model.decode(history, memory.repeat_interleave(beam, 0), mask.repeat_interleave(beam, 0))[:, -1]
        torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
        # row i continues a random hypothesis of its own sentence, then emits a random token
        rows = len(history)
        order = (torch.arange(rows) // beam) * beam + torch.randint(0, beam, (rows,), generator=generator)
        cache.reorder(order)
        history = torch.cat([history[order], torch.randint(4, 50, (rows, 1), generator=generator)], 1)
        if step == 3:  # the first sentence finishes: only the second one goes on
            cache.keep_sentences(torch.tensor([1]))
            history, memory, mask = history[beam:], memory[1:], mask[1:]


@pytest.mark.parametrize("beam, order", [(2, [0, 2, 2, 3]), (1, [1, 0, 2, 3])])
def test_a_reorder_cannot_move_a_hypothesis_to_another_sentence(beam: int, order: list[int]) -> None:
    model = tiny()
    memory, mask = model.encode(torch.randint(4, 50, (4 // beam, 5)))
    cache = model.new_cache(beam)
    model.decode_step(torch.randint(4, 50, (4, 1)), memory, mask, cache)
    with pytest.raises(ValueError, match="within their sentence"):
        cache.reorder(torch.tensor(order))


def test_rows_must_split_into_sentences_of_the_beam() -> None:
    model = tiny()
    memory, mask = model.encode(torch.randint(4, 50, (1, 5)))
    with pytest.raises(ValueError, match="do not split into sentences of beam=2"):
        model.decode_step(torch.randint(4, 50, (3, 1)), memory, mask, model.new_cache(2))


def test_steps_feed_one_position() -> None:
    model = tiny()
    memory, mask = model.encode(torch.randint(4, 50, (1, 5)))
    with pytest.raises(ValueError, match="one position at a time"):
        model.decode(torch.randint(4, 50, (1, 2)), memory, mask, model.new_cache())
