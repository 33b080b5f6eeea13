"""Greedy and batched beam search over a ``Transformer``, with or without the key/value cache.

Beam search keeps ``beam`` hypotheses per sentence; a hypothesis that emitted eos stays in
its slot and is only extended with pad at no cost, so finished and open hypotheses compete
on the same footing. The winner maximises ``log p / length ** length_penalty`` (fairseq's
--lenpen; 0 means raw log-probability). Greedy search is the beam of one.
Output length is capped at ``max_len_a * source_length + max_len_b`` per sentence. A sentence
whose hypotheses have all finished leaves the batch (its result is final), so long sentences do
not keep short ones computing; that made translation about a third faster on the test split.
Each step takes every hypothesis's best ``beam`` tokens first (``top_k_of_rows``, faster than
torch.topk over a vocabulary) and ranks a sentence's K * K candidates, instead of adding scores
to, masking and ranking all its K * V log-probabilities. With a shortlist (``vocabulary``) the
output layer computes only the candidate ids' logits (CTranslate2's vocabulary map, read for our
decoder by ``nmt_lightning.shortlist.Shortlist``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from nmt_lightning.bpe import BOS_ID, EOS_ID, PAD_ID, SPECIAL_IDS
from nmt_lightning.model import Transformer


@dataclass
class SearchResult:
    tokens: list[list[int]]  # one id list per sentence, without bos/eos/pad
    scores: torch.Tensor  # (B,) length-normalised log-probabilities of the returned hypotheses


def _max_lengths(source: torch.Tensor, max_len_a: float, max_len_b: int, model: Transformer) -> torch.Tensor:
    source_lengths = (source != PAD_ID).sum(1)
    limit = (max_len_a * source_lengths.float() + max_len_b).long()
    return limit.clamp(min=1, max=model.config.max_positions - 1)


def _step_logits(model: Transformer, tokens: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor,
                 caches, step: int, projection: Optional[nn.Module] = None) -> torch.Tensor:
    """Logits of the next token after ``tokens[:, :step + 1]`` (N, V) in fp32, from the cache or
    by re-running the whole prefix (``projection``: over a shortlist's C ids, (N, C))."""
    if caches is not None:
        logits = model.decode_step(tokens[:, step : step + 1], memory, mask, caches, step, projection)
    else:
        logits = model.decode(tokens[:, : step + 1], memory, mask, projection=projection)[:, -1]
    return logits.float()


@torch.no_grad()
def beam_search(model: Transformer, source: torch.Tensor, beam: int = 4, length_penalty: float = 1.0,
                max_len_a: float = 1.2, max_len_b: int = 10, use_cache: bool = True,
                min_length: int = 0, vocabulary: Optional[torch.Tensor] = None) -> SearchResult:
    """Translate ``source`` (B, S) with a beam of ``beam`` hypotheses per sentence; eos is
    forbidden before ``min_length`` tokens (eos included), unless the length cap comes first.
    ``vocabulary``: the only target ids the batch may produce (a shortlist: sorted, beginning
    with the special ids 0..3), so the output layer computes C logits instead of V.

    A sentence leaves the batch as soon as all its hypotheses have finished, so the remaining
    steps only compute the sentences still open (its result cannot change any more).
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    if min_length < 0:
        raise ValueError(f"min_length must be >= 0, got {min_length}")
    batch, device = source.shape[0], source.device
    projection = None
    if vocabulary is not None:
        if vocabulary[: len(SPECIAL_IDS)].tolist() != list(SPECIAL_IDS):
            raise ValueError(f"a shortlist vocabulary begins with the special ids {list(SPECIAL_IDS)}")
        vocabulary = vocabulary.to(device)
        projection = model.restricted_projection(vocabulary)  # position c: id vocabulary[c]; the special ids keep theirs
    # One encoder output per sentence, shared by its hypotheses (rows b * beam + k): the decoder
    # groups their cross-attention queries, so the encoder keys/values are not copied per beam.
    memory, mask = model.encode(source)
    max_lengths = _max_lengths(source, max_len_a, max_len_b, model).repeat_interleave(beam)
    steps = int(max_lengths.max())
    tokens = torch.full((batch * beam, steps + 1), PAD_ID, dtype=torch.long, device=device)
    tokens[:, 0] = BOS_ID
    # Only the first copy of each sentence is live at step 0, so the beam does not fill with duplicates.
    scores = torch.full((batch, beam), float("-inf"), device=device)
    scores[:, 0] = 0.0
    scores = scores.view(-1)
    lengths = torch.zeros(batch * beam, dtype=torch.long, device=device)  # tokens emitted incl. eos
    finished = torch.zeros(batch * beam, dtype=torch.bool, device=device)
    caches = model.new_cache() if use_cache else None
    open_sentences = torch.arange(batch, device=device)  # original index of each sentence still in the batch
    best_tokens: list[list[int]] = [[] for _ in range(batch)]
    best_scores = torch.zeros(batch, device=device)
    for step in range(steps):
        logits = _step_logits(model, tokens, memory, mask, caches, step, projection)  # (n*K, V), n open sentences
        count = len(open_sentences)
        row_scores, row_tokens = _best_continuations(logits, scores, finished, ~finished & (step + 1 >= max_lengths),
                                                     step + 1 < min_length, beam)  # (n*K, K) each
        # The best K of a sentence's K*K candidates are its best K of all K*V: no hypothesis
        # contributes more than K of them, and those are its own top K.
        top_scores, top_indices = row_scores.view(count, beam * beam).topk(beam, dim=1)  # (n, K)
        origin = (top_indices // beam) + torch.arange(count, device=device).unsqueeze(1) * beam
        next_tokens = row_tokens.view(count, beam * beam).gather(1, top_indices).view(-1)
        if vocabulary is not None:  # positions in the shortlist -> target ids
            next_tokens = vocabulary.index_select(0, next_tokens)
        origin = origin.view(-1)
        tokens = tokens.index_select(0, origin)
        tokens[:, step + 1] = next_tokens
        was_finished = finished.index_select(0, origin)
        lengths = lengths.index_select(0, origin) + (~was_finished).long()
        finished = was_finished | (next_tokens == EOS_ID)
        scores = top_scores.view(-1)
        if caches is not None:
            model.reorder_cache(caches, origin)
        done = finished.view(count, beam).all(1)  # (n,) sentences whose every hypothesis has ended
        if bool(done.any()):
            normalised = scores / lengths.clamp(min=1).float() ** length_penalty if length_penalty else scores
            winners = normalised.view(count, beam).argmax(1) + torch.arange(count, device=device) * beam
            for index in done.nonzero().flatten().tolist():
                row = int(winners[index])
                best_tokens[int(open_sentences[index])] = _hypothesis(tokens[row, 1:].tolist())
                best_scores[open_sentences[index]] = normalised[row]
            if bool(done.all()):
                break
            keep = (~done).nonzero().flatten()
            rows = (keep.unsqueeze(1) * beam + torch.arange(beam, device=device)).flatten()  # their hypotheses
            open_sentences = open_sentences.index_select(0, keep)
            tokens, scores, lengths, finished, max_lengths = (
                value.index_select(0, rows) for value in (tokens, scores, lengths, finished, max_lengths))
            memory, mask = memory.index_select(0, keep), mask.index_select(0, keep)
            if caches is not None:
                model.reorder_cache(caches, rows, encoder_order=keep)
    return SearchResult(best_tokens, best_scores)


def _hypothesis(ids: list[int]) -> list[int]:
    """The ids before eos (every hypothesis ends in eos: the length cap forces it)."""
    return ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids


def _best_continuations(logits: torch.Tensor, scores: torch.Tensor, finished: torch.Tensor, at_limit: torch.Tensor,
                        too_short: bool, beam: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each hypothesis's ``beam`` best continuations from its logits (N, V): (scores (N, K) = its
    score + log p(token), tokens (N, K)).

    Live hypotheses never emit pad or bos, nor eos while ``too_short``; one at its length cap
    can only emit eos (at its own probability); a finished one continues with pad at no cost.
    Only the small (N, K) results are masked and added to, never a copy of (N, V).
    """
    log_probs = torch.log_softmax(logits, dim=-1)  # (N, V)
    eos = log_probs[:, EOS_ID : EOS_ID + 1].clone()  # (N, 1), before eos is ruled out below
    banned = [PAD_ID, BOS_ID] + ([EOS_ID] if too_short else [])  # the length cap wins over min_length
    log_probs[:, banned] = float("-inf")
    best, tokens = top_k_of_rows(log_probs, beam)  # (N, K)
    # Rows with a single continuation: eos at a length cap, pad (at no cost) once finished.
    only = torch.full_like(best, float("-inf"))
    only[:, :1] = torch.where(at_limit.unsqueeze(1), eos, torch.zeros_like(eos))
    single = (at_limit | finished).unsqueeze(1)
    best = torch.where(single, only, best) + scores.unsqueeze(1)
    forced_token = torch.where(at_limit, EOS_ID, PAD_ID).unsqueeze(1)
    tokens = torch.where(single, forced_token.expand_as(tokens), tokens)
    return best, tokens


def top_k_of_rows(values: torch.Tensor, k: int, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``values.topk(k, dim=-1)`` for values (N, V) with k much smaller than V: (largest (N, k)
    in descending order, their indices (N, k)).

    torch.topk scans every row with a scalar loop (about 0.6 ms for 128 rows of 8,000 on two
    CPU cores, more than the int8 output projection that produced them). Here a vectorised
    max per block of ``block`` columns comes first: a row's k largest values lie in its k
    blocks with the largest maxima (a value outside them would have k larger ones above it),
    so topk runs only over k * block candidates. About 2.5x as fast at that size. Equal values
    may come out in another order than torch.topk's.
    """
    rows, width = values.shape
    if width < 4 * k * block:
        return values.topk(k, dim=-1)
    if width % block:  # pad with -inf up to whole blocks: never among the k largest
        values = torch.nn.functional.pad(values, (0, block - width % block), value=float("-inf"))
    blocks = values.reshape(rows, -1, block)  # (N, V / block, block)
    top_blocks = blocks.amax(dim=-1).topk(k, dim=-1).indices  # (N, k)
    candidates = blocks.gather(1, top_blocks.unsqueeze(-1).expand(rows, k, block)).flatten(1)  # (N, k * block)
    best, position = candidates.topk(k, dim=-1)
    return best, top_blocks.gather(1, position // block) * block + position % block


def greedy_search(model: Transformer, source: torch.Tensor, max_len_a: float = 1.2, max_len_b: int = 10,
                  use_cache: bool = True, vocabulary: Optional[torch.Tensor] = None) -> SearchResult:
    """Pick the most probable token at every step (the validation-time decoder): a beam of one,
    scored by log-probability per token."""
    return beam_search(model, source, beam=1, length_penalty=1.0, max_len_a=max_len_a, max_len_b=max_len_b,
                       use_cache=use_cache, vocabulary=vocabulary)
