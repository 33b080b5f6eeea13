"""Sequence-level knowledge distillation data (Kim & Rush 2016): the teacher's translations.

``distill_corpus`` translates the source side of a corpus with the teacher (beam search) and
writes a parallel corpus ``OUTPUT.SRC`` (the source lines, unchanged) / ``OUTPUT.TGT`` (the
teacher's translations) that ``nmt-lightning prepare --train OUTPUT`` takes.

Long corpora take hours, so the work is cut into fixed chunks of ``chunk_lines`` input lines
that are appended, whole, to ``OUTPUT.TGT.partial`` and fsync'ed; a small state file beside it
records the chunks done and what produced them (teacher file, input file, beam, ...). A rerun
of the same command continues after the last whole chunk; a rerun with anything changed starts
over. Every chunk is translated with the same batches whether or not the run was interrupted,
so the result is the same file as one uninterrupted run. The final files appear (atomic
rename) only when every line is translated.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from nmt_lightning.atomic import atomic_open
from nmt_lightning.corpora.parallel_text import find_side, read_side
from nmt_lightning.errors import CorpusError

STATE_SUFFIX = ".distill-state.json"


@dataclass(frozen=True)
class DistillSettings:
    """What decides the output; a resumed run must have the same."""

    teacher: list  # [resolved path, size, mtime_ns] of the teacher file
    source: list  # likewise for the source file
    beam: int
    batch_size: int
    chunk_lines: int


def _identity(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _load_state(path: Path, settings: DistillSettings) -> int:
    """Chunks already done by a run with the same settings (0 when there is none)."""
    if not path.is_file():
        return 0
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return 0
    if state.get("settings") != asdict(settings):
        print(f"distill-data: {path} was written with other settings; starting over", file=sys.stderr)
        return 0
    return int(state.get("chunks_done", 0))


def _save_state(path: Path, settings: DistillSettings, chunks_done: int) -> None:
    with atomic_open(path) as handle:
        json.dump({"settings": asdict(settings), "chunks_done": chunks_done}, handle, indent=2)


def _partial_lines(partial: Path, lines_done: int) -> None:
    """Cut the partial file to its first ``lines_done`` lines (a chunk cut off by a kill after
    its append but before the state update would otherwise appear twice)."""
    if not partial.exists():
        if lines_done:
            raise CorpusError(f"{partial}: missing, though its state file says {lines_done} lines were done")
        partial.touch()
        return
    size = 0
    with open(partial, "rb") as handle:
        for _ in range(lines_done):
            line = handle.readline()
            if not line.endswith(b"\n"):
                raise CorpusError(f"{partial}: shorter than the {lines_done} lines its state file records")
            size += len(line)
    os.truncate(partial, size)


Translate = Callable[[list[str]], list[str]]


def distill_corpus(translate: Translate, teacher_path: str | os.PathLike, input_prefix: str, output_prefix: str,
                   src_lang: str, tgt_lang: str, beam: int, batch_size: int, chunk_lines: int = 2000,
                   progress: bool = True) -> tuple[Path, Path]:
    """Write ``output_prefix.{src,tgt}`` from ``input_prefix.src``; ``translate(lines)`` is the
    teacher (beam and batch size already bound; they are recorded to refuse a mismatched resume)."""
    if chunk_lines < 1:
        raise ValueError(f"chunk_lines must be >= 1, got {chunk_lines}")
    source_path = find_side(input_prefix, src_lang)
    output_source, output_target = Path(f"{output_prefix}.{src_lang}"), Path(f"{output_prefix}.{tgt_lang}")
    if output_source.resolve() in (source_path.resolve(), Path(f"{input_prefix}.{src_lang}").resolve()):
        raise ValueError(f"--output {output_prefix} would overwrite the input {source_path}")
    lines = read_side(source_path)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise CorpusError(f"{source_path}:{number}: empty line; remove it (and its target) before distilling, "
                              f"or the two sides of the output would not say the same")
    output_target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(f"{output_target}.partial")
    state_path = Path(f"{output_target}{STATE_SUFFIX}")
    settings = DistillSettings(_identity(Path(teacher_path)), _identity(source_path), beam, batch_size, chunk_lines)
    chunks = [lines[start : start + chunk_lines] for start in range(0, len(lines), chunk_lines)]
    done = min(_load_state(state_path, settings), len(chunks))
    _partial_lines(partial, sum(len(chunk) for chunk in chunks[:done]))
    if done:
        print(f"distill-data: resuming after {done} of {len(chunks)} chunks ({state_path})", file=sys.stderr)
    with tqdm(total=len(lines), initial=sum(map(len, chunks[:done])), desc="distilling", unit=" sent",
              file=sys.stderr, disable=not progress) as bar:
        for index in range(done, len(chunks)):
            translations = translate(chunks[index])
            if len(translations) != len(chunks[index]):
                raise RuntimeError(f"the teacher returned {len(translations)} translations for {len(chunks[index])} lines")
            with open(partial, "a", encoding="utf-8") as handle:
                handle.writelines(" ".join(text.split()) + "\n" for text in translations)  # one line each, always
                handle.flush()
                os.fsync(handle.fileno())
            _save_state(state_path, settings, index + 1)
            bar.update(len(chunks[index]))
    with atomic_open(output_source) as handle:
        handle.writelines(line + "\n" for line in lines)
    os.replace(partial, output_target)
    state_path.unlink()
    with open(output_target, encoding="utf-8") as handle:
        empty = sum(1 for line in handle if not line.strip())
    if empty:
        print(f"distill-data: {empty} of {len(lines)} translations are empty (prepare drops those pairs)", file=sys.stderr)
    return output_source, output_target


def distill_with_checkpoint(checkpoint: str, input_prefix: str, output_prefix: str, beam: int = 4,
                            batch_size: int = 64, device: str = "cpu", chunk_lines: int = 2000,
                            progress: bool = True) -> tuple[Path, Path]:
    """``distill_corpus`` with a teacher loaded from a checkpoint or an ``export`` file (int8 is fastest on CPU)."""
    from nmt_lightning.loading import load_for_device
    from nmt_lightning.translate import translate_lines

    if beam < 1 or batch_size < 1:
        raise ValueError(f"--beam and --batch-size must be >= 1, got {beam} and {batch_size}")
    module = load_for_device(checkpoint, device)

    def translate(lines: list[str]) -> list[str]:
        return translate_lines(module, lines, beam=beam, batch_size=batch_size, progress=False)

    tokenization = module.tokenization
    return distill_corpus(translate, checkpoint, input_prefix, output_prefix, tokenization.src_lang,
                          tokenization.tgt_lang, beam, batch_size, chunk_lines, progress)

