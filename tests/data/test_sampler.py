import numpy as np
import pytest

from nmt_lightning.data.sampler import TokenBatchSampler


def lengths(n: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 80, n), rng.integers(1, 80, n)


def test_batches_respect_max_tokens_and_cover_every_sentence_once() -> None:
    src, tgt = lengths()
    sampler = TokenBatchSampler(src, tgt, max_tokens=500)
    batches = list(sampler)
    for batch in batches:
        assert len(batch) * max(max(src[batch]), max(tgt[batch])) <= 500
    flat = sorted(i for batch in batches for i in batch)
    assert flat == list(range(1000))


def test_length_grouping_limits_padding() -> None:
    src, tgt = lengths()
    batches = list(TokenBatchSampler(src, tgt, max_tokens=800))
    sizes = np.maximum(src, tgt)
    padded = sum(len(b) * sizes[b].max() for b in batches)
    assert sizes.sum() / padded > 0.9


def test_epochs_reshuffle_deterministically() -> None:
    src, tgt = lengths()
    sampler = TokenBatchSampler(src, tgt, max_tokens=500, seed=7)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch0 != epoch1
    again = TokenBatchSampler(src, tgt, max_tokens=500, seed=7)
    assert list(again) == epoch0


@pytest.mark.parametrize("world", [2, 3, 4, 7])
def test_ranks_get_disjoint_batches_of_equal_count(world: int) -> None:
    src, tgt = lengths(997)
    per_rank = []
    for rank in range(world):
        sampler = TokenBatchSampler(src, tgt, max_tokens=600, num_replicas=world, rank=rank, seed=3)
        sampler.set_epoch(2)
        per_rank.append([i for batch in sampler for i in batch])
        assert len(list(sampler)) == len(sampler)
    assert len({len(TokenBatchSampler(src, tgt, 600, num_replicas=world, rank=r, seed=3)) for r in range(world)}) == 1
    everything = [i for indices in per_rank for i in indices]
    assert len(everything) == len(set(everything)) == 997


def test_overlong_training_pairs_are_skipped_and_counted() -> None:
    src, tgt = np.array([3, 300, 5, 7]), np.array([4, 5, 6, 400])
    sampler = TokenBatchSampler(src, tgt, max_tokens=1000, max_source_positions=256, max_target_positions=256)
    assert sampler.num_skipped == 2
    assert sorted(i for b in sampler for i in b) == [0, 2]


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"max_tokens": 10, "max_sentences": 0}, "max_sentences must be >= 1"),
    ({"max_tokens": 10, "num_replicas": 2, "rank": 2}, r"rank must be in \[0, 2\)"),
])
def test_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenBatchSampler(np.array([1, 2]), np.array([1, 2]), **kwargs)


def test_evaluation_never_leaves_a_sentence_out() -> None:
    """Lines longer than max_tokens get a batch of their own; lines over the position limits are
    truncated (by the dataset), not skipped; ranks may get unequal counts rather than lose lines."""
    src = np.array([5, 900, 7, 300, 6])
    tgt = np.array([5, 20, 8, 400, 6])
    for replicas in (1, 2):
        seen = []
        for rank in range(replicas):
            sampler = TokenBatchSampler(src, tgt, max_tokens=64, shuffle=False, num_replicas=replicas, rank=rank,
                                        max_source_positions=256, max_target_positions=256, evaluation=True)
            assert sampler.num_skipped == 0
            batches = list(sampler)
            assert len(batches) == len(sampler)
            seen += [i for batch in batches for i in batch]
        assert sorted(seen) == [0, 1, 2, 3, 4]
    training = TokenBatchSampler(src, tgt, max_tokens=64, max_source_positions=256, max_target_positions=256)
    assert training.num_skipped == 2  # training skips them (and says so)
