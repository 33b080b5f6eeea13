"""Translating with a CTranslate2 directory written by ``nmt-lightning export --format ctranslate2``.

The same text in and out as ``nmt_lightning.translate.translate_lines``: the same sentencepiece
models and Moses normalisation, sources cut to the same length and ending with eos, batches of
sentences of similar length, beam search with the model's length penalty, greedy search for a
beam of one, pad and bos never generated. One difference: CTranslate2 takes one length cap per
batch, so each batch decodes up to the largest of its sentences' caps (``max_len_a * source +
max_len_b``; batches are sorted by length, so the caps within one are close), and a longer
hypothesis is then cut at its own sentence's cap. For greedy search that is exactly our result;
beam search may rank such a hypothesis differently. A sentence reaches the cap only when the
model fails to end it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from nmt_lightning.bpe import BOS_ID, EOS_ID, PAD_ID
from nmt_lightning.deploy.ctranslate2_files import is_ctranslate2_model, read_settings, require_ctranslate2
from nmt_lightning.tokenization import Tokenization


def _device(device: str) -> tuple[str, int]:
    """torch's "cpu", "cuda", "cuda:1" as CTranslate2's (device, device_index)."""
    name, _, index = device.partition(":")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: CTranslate2 runs on cpu or cuda[:N]")
    return name, int(index or 0)


class CTranslate2Model:
    """A converted model with its tokenization and decoding defaults.

    threads: CPU threads in all (default: torch's, so a side-by-side comparison with our
        decoder uses as many cores).
    parallel_batches: batches translated at the same time, each with threads / parallel_batches
        threads (CTranslate2's inter_threads and intra_threads). Default on CPU: one batch per
        thread. The tiny model's matrices are too small to share between threads: on 2 cores one
        batch on 2 threads ran at half the speed of two batches on one thread each (see
        docs/benchmarks.md). Default on a GPU: 1.
    compute_type: CTranslate2's (default: the stored weight type; e.g. "int8_float16" on a GPU
        from an int8 directory).
    shortlist: restrict each batch's output vocabulary with the directory's vocabulary map
        (``vmap.txt``, ``nmt-lightning shortlist``); default: when the directory has one.

    Load it in its own process when comparing speeds with our decoder: both bundle OpenMP and
    MKL, and in one process torch's matrix products ran at about 60% of their speed once a
    CTranslate2 translator existed.
    """

    def __init__(self, directory: str | os.PathLike, device: str = "cpu", threads: Optional[int] = None,
                 parallel_batches: Optional[int] = None, compute_type: str = "default",
                 shortlist: Optional[bool] = None) -> None:
        ctranslate2 = require_ctranslate2()
        self.directory = Path(directory)
        if not is_ctranslate2_model(self.directory):
            raise ValueError(f"{self.directory}: not a CTranslate2 model directory (no model.bin)")
        self.settings = read_settings(self.directory)
        files = self.settings["tokenization"]
        self.tokenization = Tokenization(
            src_lang=files["src_lang"], tgt_lang=files["tgt_lang"], moses_normalize=files["moses_normalize"],
            src_model=(self.directory / files["src_model"]).read_bytes(),
            tgt_model=(self.directory / files["tgt_model"]).read_bytes())
        self.decoding = self.settings["decoding"]
        has_map = (self.directory / "vmap.txt").is_file()
        if shortlist and not has_map:
            raise ValueError(f"{self.directory}: no vocabulary map (vmap.txt) to shortlist with; convert with one "
                             f"('nmt-lightning export --format ctranslate2 --vocabulary-map ...')")
        self.shortlist = has_map if shortlist is None else shortlist  # default: the map when the model has one
        name, index = _device(device)
        threads = threads or torch.get_num_threads()
        parallel_batches = parallel_batches or (threads if name == "cpu" else 1)
        if threads < 1 or parallel_batches < 1:
            raise ValueError(f"threads and parallel_batches must be >= 1, got {threads} and {parallel_batches}")
        self.device, self.threads, self.parallel_batches = device, threads, parallel_batches
        self.translator = ctranslate2.Translator(str(self.directory), device=name, device_index=index,
                                                 compute_type=compute_type, inter_threads=parallel_batches,
                                                 intra_threads=max(1, threads // parallel_batches))
        target = self.tokenization._processor("tgt")
        self._banned = [[target.id_to_piece(PAD_ID)], [target.id_to_piece(BOS_ID)]]

    def _cap(self, source_tokens: int) -> int:
        """Tokens the decoder may produce before eos, for a source of ``source_tokens`` (eos
        included): our cap counts eos, CTranslate2's does not."""
        limit = int(self.decoding["max_len_a"] * source_tokens + self.decoding["max_len_b"])
        return max(1, min(limit, self.decoding["max_positions"] - 1)) - 1

    def translate_lines(self, lines: list[str], beam: int = 4, batch_size: int = 32, progress: bool = True,
                        length_penalty: Optional[float] = None, max_output_tokens: Optional[int] = None) -> list[str]:
        """Translate ``lines``, returned in the same order; greedy search when ``beam == 1``.
        ``max_output_tokens`` stops every search after that many tokens (eos not counted) where the
        length cap would allow more: 1 runs the encoder and one decoder step (a timing's bound)."""
        if beam < 1 or batch_size < 1:
            raise ValueError(f"beam and batch_size must be >= 1, got beam={beam}, batch_size={batch_size}")
        if max_output_tokens is not None and (isinstance(max_output_tokens, bool) or max_output_tokens < 1):
            raise ValueError(f"max_output_tokens must be None or >= 1, got {max_output_tokens}")
        source = self.tokenization._processor("src")
        target = self.tokenization._processor("tgt")
        limit = self.decoding["max_positions"] - 1
        pieces = [source.id_to_piece(ids[:limit]) for ids in self.tokenization.encode_source(lines)]
        order = sorted(range(len(pieces)), key=lambda i: len(pieces[i]))
        penalty = self.decoding["length_penalty"] if length_penalty is None else length_penalty
        chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

        def cap(source_tokens: int) -> int:
            found = self._cap(source_tokens)
            return found if max_output_tokens is None else min(found, max_output_tokens)

        # Every batch is queued at once (asynchronous), so parallel_batches of them run together;
        # each keeps its own length cap.
        pending = [self.translator.translate_batch(
            [pieces[i] for i in chunk], beam_size=beam, length_penalty=penalty, max_input_length=0,
            max_decoding_length=max(cap(len(pieces[i]) + 1) for i in chunk),  # + 1: the eos CTranslate2 adds
            min_decoding_length=0, suppress_sequences=self._banned, use_vmap=self.shortlist,
            asynchronous=True) for chunk in chunks]
        results = [""] * len(lines)
        with tqdm(total=len(lines), desc="translating (CTranslate2)", unit=" sent", file=sys.stderr,
                  disable=not progress) as bar:
            for chunk, futures in zip(chunks, pending):
                hypotheses = [[target.piece_to_id(piece) for piece in future.result().hypotheses[0]]
                              for future in futures]
                # A hypothesis longer than its own sentence's cap (it ran under the batch's larger
                # cap) is cut there: for greedy search exactly what our decoder returns.
                hypotheses = [ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids for ids in hypotheses]
                hypotheses = [ids[: cap(len(pieces[i]) + 1)] for i, ids in zip(chunk, hypotheses)]
                for index, text in zip(chunk, self.tokenization.decode(hypotheses)):
                    results[index] = text
                bar.update(len(chunk))
        return results
