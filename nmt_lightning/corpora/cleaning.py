"""Filtering and splitting parallel text, with a count of every pair dropped and why."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass(frozen=True)
class PairFilter:
    """Which training pairs to keep.

    max_words: drop a pair where either side has more whitespace-separated words.
    max_length_ratio: drop a pair whose word counts differ by more than this factor (as Moses'
        clean-corpus-n.perl, whose default is 9).
    """

    max_words: int = 250
    max_length_ratio: float = 9.0

    def __post_init__(self) -> None:
        if self.max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {self.max_words}")
        if self.max_length_ratio < 1.0:
            raise ValueError(f"max_length_ratio must be >= 1.0, got {self.max_length_ratio}")

    def reason_to_drop(self, source: str, target: str) -> str | None:
        """None to keep the pair, else a short reason used as the counter key."""
        if not source.strip() or not target.strip():
            return "empty line"
        source_words, target_words = len(source.split()), len(target.split())
        if max(source_words, target_words) > self.max_words:
            return f"longer than {self.max_words} words"
        if max(source_words, target_words) > self.max_length_ratio * min(source_words, target_words):
            return f"length ratio above {self.max_length_ratio:g}"
        return None


@dataclass
class DropCounts:
    """How many pairs a step read, kept and dropped (by reason)."""

    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self, name: str) -> str:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.dropped.items()))
        return f"{name}: read {self.read}, kept {self.kept}" + (f", dropped {reasons}" if reasons else "")


def normalise_whitespace(text: str) -> str:
    return " ".join(text.split())


def deduplicate(pairs: Iterable[tuple[str, str]], counts: DropCounts) -> list[tuple[str, str]]:
    """Drop empty, untranslated (source == target) and repeated pairs; keep first occurrence order."""
    seen: set[tuple[str, str]] = set()
    unique: list[tuple[str, str]] = []
    for source, target in pairs:
        counts.read += 1
        if not source or not target:
            counts.dropped["empty"] += 1
        elif source == target:
            counts.dropped["untranslated (source == target)"] += 1
        elif (source, target) in seen:
            counts.dropped["duplicate pair"] += 1
        else:
            seen.add((source, target))
            unique.append((source, target))
    counts.kept = len(unique)
    return unique


def held_out_split(
    pairs: Sequence[tuple[str, str]], valid_size: int, test_size: int, seed: int, counts: DropCounts
) -> dict[str, list[tuple[str, str]]]:
    """Split unique pairs into train/valid/test so that no held-out sentence occurs in train.

    Valid and test pairs are drawn at random (fixed ``seed``) among pairs whose source and
    target both occur nowhere else in valid/test. Train then loses every pair that shares
    its source or its target with a held-out pair, so the split is clean in both translation
    directions (en->cs and cs->en read the same files).
    """
    if valid_size < 0 or test_size < 0:
        raise ValueError(f"valid and test sizes must be >= 0, got {valid_size} and {test_size}")
    if valid_size + test_size >= len(pairs):
        raise ValueError(
            f"cannot hold out {valid_size} valid + {test_size} test pairs from only {len(pairs)} pairs"
        )
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held_sources: set[str] = set()
    held_targets: set[str] = set()
    held: dict[str, list[tuple[str, str]]] = {"test": [], "valid": []}
    held_indices: set[int] = set()
    wanted = {"test": test_size, "valid": valid_size}
    for index in order:
        split = "test" if len(held["test"]) < wanted["test"] else "valid"
        if len(held[split]) >= wanted[split]:
            break
        source, target = pairs[index]
        if source in held_sources or target in held_targets:
            continue
        held[split].append((source, target))
        held_sources.add(source)
        held_targets.add(target)
        held_indices.add(index)
    train = []
    for index, (source, target) in enumerate(pairs):
        if index in held_indices:
            continue
        if source in held_sources or target in held_targets:
            counts.dropped["shares a sentence with valid/test"] += 1
        else:
            train.append((source, target))
    counts.kept = len(train) + len(held["valid"]) + len(held["test"])
    return {"train": train, "valid": held["valid"], "test": held["test"]}
