"""A target-vocabulary shortlist from the training data: CTranslate2's vocabulary map.

A small model spends a large share of each decoding step on the output projection over the
whole target vocabulary (8,000 pieces here). Given the source sentence, few target pieces can
appear in its translation: CTranslate2's "dynamic vocabulary reduction" restricts each batch's
output layer to the union of the candidates of its source pieces plus pieces always allowed.
The map is a text file, one line per source piece, ``src<TAB>tgt_1 tgt_2 ...``, and one line
with an empty source for the pieces always allowed.

**What the candidates are.** The ``best`` target pieces of each source piece by the lexical
translation probability ``t(target | source)`` of IBM Model 1 (Brown et al. 1993), estimated
by EM on the training pairs (with a NULL source word for target pieces nothing translates),
plus the ``frequent`` most frequent target pieces for every sentence. This is how Marian's
lexical shortlists are built (word-alignment probabilities, the top 50 per source word and the
100 most frequent target words; Junczys-Dowmunt et al. 2018), except that the probabilities
come from Model 1 rather than from fast_align's reparametrised Model 2, which needs no extra
tool. Raw co-occurrence counts would rank frequent target pieces (punctuation, "a", "se") first
for every source piece; Model 1's EM explains those by the source pieces that translate them.

The statistics are over sentencepiece pieces, the tokens CTranslate2 sees, from the prepared
data directory's memory-mapped ids. Every co-occurring (source, target) piece pair of the
corpus is one entry of the EM's arrays (16 bytes each): ``max_sentences`` caps the pairs read
for a large corpus.

Our own decoder reads the same map (``Shortlist``): each batch's output layer then computes the
logits of the candidates only, as CTranslate2's ``use_vmap`` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from nmt_lightning.atomic import atomic_path
from nmt_lightning.binarized import TokenArray
from nmt_lightning.bpe import SPECIAL_IDS

__all__ = ["Shortlist", "ShortlistReport", "build_shortlist", "lexical_probabilities", "read_vocabulary_map"]

FIRST_PIECE = len(SPECIAL_IDS)  # pad, unk, bos and eos come first: never candidates of their own
DEFAULT_BEST, DEFAULT_FREQUENT = 50, 100  # candidates per source piece; target pieces always allowed
BATCH_SENTENCES = 32  # translate's default batch: sentences sorted by length, then cut into batches of 32


@dataclass
class LexicalTable:
    """t(target | source) for every co-occurring pair: parallel arrays, source -1 for NULL."""

    source: torch.Tensor  # (pairs,) int64
    target: torch.Tensor  # (pairs,) int64
    probability: torch.Tensor  # (pairs,) float64


def lexical_probabilities(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], iterations: int = 5,
                          progress: bool = False) -> LexicalTable:
    """IBM Model 1's t(target | source) after ``iterations`` EM iterations, from uniform.

    Each target token ``f_j`` of a pair aligns to one source token ``e_i`` or to NULL with
    probability ``t(f_j | e_i) / sum_k t(f_j | e_k)``; the expected counts of every (e, f) summed
    over the corpus, normalised per source, give the next t. Vectorised over all the corpus'
    (target position, source token) links at once."""
    null = -1
    link_source, link_target, link_position = [], [], []  # one link per (target position, source token or NULL)
    position = 0
    for source, target in pairs:
        candidates = np.asarray([null, *source], dtype=np.int64)  # (m + 1,)
        tokens = np.asarray(target, dtype=np.int64)  # (n,)
        link_source.append(np.tile(candidates, len(tokens)))  # (n * (m + 1),): target-major
        link_target.append(np.repeat(tokens, len(candidates)))
        link_position.append(np.repeat(np.arange(position, position + len(tokens)), len(candidates)))
        position += len(tokens)
    if position == 0:
        raise ValueError("no sentence pairs to estimate a lexical table from")
    sources = torch.from_numpy(np.concatenate(link_source))
    targets = torch.from_numpy(np.concatenate(link_target))
    positions = torch.from_numpy(np.concatenate(link_position))
    # One parameter per distinct (source, target) pair; a link reads its pair's parameter.
    width = int(targets.max()) + 1
    keys, link_pair = torch.unique((sources + 1) * width + targets, return_inverse=True)
    pair_source, pair_target = keys // width - 1, keys % width
    # Uniform start: every target a source co-occurs with equally likely.
    _, pair_source_index = torch.unique(pair_source, return_inverse=True)
    per_source = torch.zeros(int(pair_source_index.max()) + 1, dtype=torch.float64).index_add_(
        0, pair_source_index, torch.ones(len(keys), dtype=torch.float64))
    probability = 1.0 / per_source[pair_source_index]
    for _ in tqdm(range(iterations), desc="IBM Model 1 EM", unit=" iteration", disable=not progress):
        link_probability = probability[link_pair]
        normaliser = torch.zeros(position, dtype=torch.float64).index_add_(0, positions, link_probability)
        posterior = link_probability / normaliser[positions]  # P(target position aligned to this source)
        counts = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, link_pair, posterior)
        totals = torch.zeros_like(per_source).index_add_(0, pair_source_index, counts)
        probability = counts / totals[pair_source_index]
    return LexicalTable(pair_source, pair_target, probability)


def shortlist_candidates(table: LexicalTable, target_counts: np.ndarray, best: int, frequent: int
                         ) -> tuple[list[int], dict[int, list[int]]]:
    """(always-allowed target ids, source id -> its ``best`` target ids by t(target | source)).
    Special ids never appear: the vocabulary map of CTranslate2 always allows unk, bos and eos."""
    order = np.argsort(-target_counts[FIRST_PIECE:], kind="stable")[:frequent] + FIRST_PIECE
    always = [int(i) for i in order if target_counts[i] > 0]
    keep = (table.source >= FIRST_PIECE) & (table.target >= FIRST_PIECE)
    source, target, probability = table.source[keep], table.target[keep], table.probability[keep]
    # Sort by source, then by probability descending (ties by target id): each source's best first.
    order = np.lexsort((target.numpy(), -probability.numpy(), source.numpy()))
    candidates: dict[int, list[int]] = {}
    for s, t in zip(source.numpy()[order], target.numpy()[order]):
        chosen = candidates.setdefault(int(s), [])
        if len(chosen) < best:
            chosen.append(int(t))
    return always, candidates


@dataclass
class ShortlistReport:
    output: Path
    sentences: int
    source_pieces: int  # source pieces with candidates (lines of the map)
    always: int  # target pieces allowed for every sentence
    mean_candidates: float  # target pieces a test-like sentence allows, averaged (with the always-allowed ones)
    mean_batch_candidates: float  # the same for a batch of BATCH_SENTENCES (CTranslate2 takes the batch's union)


def _pieces(processor, ids: Iterable[int]) -> list[str]:
    return [processor.id_to_piece(int(i)) for i in ids]


def build_shortlist(data_dir: str | os.PathLike, output: str | os.PathLike, src_lang: str = "en",
                    tgt_lang: str = "cs", best: int = DEFAULT_BEST, frequent: int = DEFAULT_FREQUENT, iterations: int = 5,
                    max_sentences: Optional[int] = None, progress: bool = True) -> ShortlistReport:
    """Write the vocabulary map of a prepared data directory's training split (module docstring)."""
    from nmt_lightning.data import TranslationDataModule

    for name, value, minimum in (("best", best, 1), ("frequent", frequent, 0), ("iterations", iterations, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"--{name} must be an integer >= {minimum}, got {value!r}")
    if max_sentences is not None and max_sentences < 1:
        raise ValueError(f"--max-sentences must be >= 1, got {max_sentences}")
    data = TranslationDataModule(str(data_dir), src_lang=src_lang, tgt_lang=tgt_lang)
    source = TokenArray(Path(data_dir) / f"train.{src_lang}", data.src_vocab_size)
    target = TokenArray(Path(data_dir) / f"train.{tgt_lang}", data.tgt_vocab_size)
    count = min(len(source), max_sentences or len(source))

    def clean(ids: np.ndarray) -> list[int]:
        return [int(i) for i in ids if i >= FIRST_PIECE]

    pairs = [(clean(source[i]), clean(target[i])) for i in tqdm(range(count), desc="reading pairs", unit=" pairs",
                                                                disable=not progress)]
    table = lexical_probabilities(pairs, iterations, progress)
    target_counts = np.bincount(np.concatenate([np.asarray(t, dtype=np.int64) for _, t in pairs] or [np.zeros(0, int)]),
                                minlength=data.tgt_vocab_size)
    always, candidates = shortlist_candidates(table, target_counts, best, frequent)
    source_processor, target_processor = data.tokenizer(src_lang), data.tokenizer(tgt_lang)
    lines = ["\t" + " ".join(_pieces(target_processor, always))]
    for source_id in sorted(candidates):
        piece = source_processor.id_to_piece(source_id)
        if piece.strip() != piece or "\t" in piece:
            continue  # a piece holding whitespace cannot be a key of the map
        lines.append(f"{piece}\t{' '.join(_pieces(target_processor, candidates[source_id]))}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        Path(tmp).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    # How much the map leaves of the vocabulary, on the validation sentences, one at a time and in
    # batches as translate forms them (+ 3: unk, bos and eos, which CTranslate2 always allows).
    valid = TokenArray(Path(data_dir) / f"valid.{src_lang}", data.src_vocab_size)
    allowed = [set(always).union(*(candidates.get(int(i), []) for i in valid[k])) for k in range(len(valid))]
    by_length = sorted(range(len(valid)), key=lambda k: len(valid[k]))
    batches = [set().union(*(allowed[k] for k in by_length[start : start + BATCH_SENTENCES]))
               for start in range(0, len(by_length), BATCH_SENTENCES)]
    return ShortlistReport(output, count, len(lines) - 1, len(always),
                           float(np.mean([len(a) + 3 for a in allowed])) if allowed else 0.0,
                           float(np.mean([len(b) + 3 for b in batches])) if batches else 0.0)


def read_vocabulary_map(path: str | os.PathLike, target_vocabulary: set[str]) -> list[tuple[list[str], list[str]]]:
    """The lines of a vocabulary map as (source pieces, target pieces), checked before CTranslate2
    reads it (it maps an unknown piece to unk silently): every line ``source<TAB>targets``, every
    target a piece of the model's target vocabulary. An error names the file and line."""
    from nmt_lightning.evaluation import read_lines

    rules = []
    for number, line in enumerate(read_lines(path), 1):
        if line.count("\t") != 1:
            raise ValueError(f"{path}:{number}: a vocabulary map line is 'source pieces<TAB>target pieces', "
                             f"this one has {line.count(chr(9))} tabs")
        key, targets = line.split("\t")
        pieces = [piece for piece in targets.split(" ") if piece]
        unknown = [piece for piece in pieces if piece not in target_vocabulary]
        if unknown:
            raise ValueError(f"{path}:{number}: {unknown[0]!r} is not a piece of the model's target vocabulary "
                             f"(a map built for another model?)")
        rules.append((key.split(" ") if key else [], pieces))
    return rules


class Shortlist:
    """A vocabulary map read for our decoder: the target ids a batch of source ids may produce.

    As CTranslate2 reads it: a line's source side is an n-gram of source pieces, matched against
    every position of every sentence of the batch; the candidates are the union of the matched
    lines' targets, the empty source's targets, and unk, bos and eos (here pad too, which only
    finished hypotheses continue with)."""

    def __init__(self, rules: dict[tuple[int, ...], list[int]], always: Sequence[int]) -> None:
        self.rules = rules
        self.longest = max((len(key) for key in rules), default=0)
        self.always = sorted({*SPECIAL_IDS, *always})

    @classmethod
    def read(cls, path: str | os.PathLike, tokenization) -> "Shortlist":
        """The map ``path`` with pieces turned into the ids of ``tokenization``'s sentencepiece
        models; a target piece the model does not know is an error naming the line."""
        source, target = tokenization._processor("src"), tokenization._processor("tgt")
        target_pieces = {target.id_to_piece(i): i for i in range(target.get_piece_size())}
        source_pieces = {source.id_to_piece(i): i for i in range(source.get_piece_size())}
        rules: dict[tuple[int, ...], list[int]] = {}
        always: list[int] = []
        for pieces, targets in read_vocabulary_map(path, set(target_pieces)):
            ids = [target_pieces[piece] for piece in targets]
            if not pieces:
                always += ids
                continue
            if all(piece in source_pieces for piece in pieces):  # a piece the model never sees never matches
                rules.setdefault(tuple(source_pieces[piece] for piece in pieces), []).extend(ids)
        return cls(rules, always)

    def candidates(self, source: torch.Tensor) -> torch.Tensor:
        """source (B, S) ids (0 pads) -> the sorted candidate ids (C,), beginning with 0..3."""
        found = set(self.always)
        for sentence in source.tolist():
            tokens = [token for token in sentence if token >= FIRST_PIECE]
            for start in range(len(tokens)):
                for length in range(1, min(self.longest, len(tokens) - start) + 1):
                    found.update(self.rules.get(tuple(tokens[start : start + length]), ()))
        return torch.tensor(sorted(found), dtype=torch.long)
