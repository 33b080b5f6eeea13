"""``nmt-lightning prepare``: raw parallel text -> clean text splits -> BPE -> memory-mapped ids.

The work is three stages, each recorded in ``DIR/prepare.json`` with a fingerprint of its
inputs and options:

1. text:   ``DIR/{train,valid,test}.{src,tgt}``, one untokenized sentence a line;
2. bpe:    ``DIR/spm.model`` (joint) or ``DIR/spm.{lang}.model``, trained on train only;
3. binary: ``DIR/{split}.{lang}.bin/.idx``, ids for both languages (either direction reads them).

A re-run with the same inputs and options reuses every stage whose fingerprint matches.
Each stage writes to temporary files and moves them into place only once all of them are
complete, after removing its entry from the manifest: an interrupted or failed run leaves the
previous files and a manifest that never claims a half-written stage is done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

from tqdm import tqdm

from nmt_lightning.atomic import atomic_open
from nmt_lightning.binarized import TokenArrayWriter
from nmt_lightning.bpe import TextNormalizer, chunked, load_sentencepiece, train_sentencepiece
from nmt_lightning.corpora.cleaning import DropCounts, PairFilter, deduplicate, held_out_split, normalise_whitespace
from nmt_lightning.corpora.parallel_text import find_side, read_parallel
from nmt_lightning.corpora.sacrebleu_sets import PREFIX as SACREBLEU_PREFIX
from nmt_lightning.corpora.sacrebleu_sets import is_sacrebleu_name, sacrebleu_files, sacrebleu_pairs
from nmt_lightning.errors import CorpusError

SPLITS = ("train", "valid", "test")
MANIFEST = "prepare.json"


@dataclass
class PrepareConfig:
    """Everything ``prepare`` needs; the CLI flags map one to one onto these fields."""

    out_dir: str
    src: str = "en"
    tgt: str = "cs"
    corpus: Optional[str] = None  # "libreoffice", or None for --train/--valid/--test
    train: Optional[str] = None  # file prefix: PREFIX.src / PREFIX.tgt (plain or .gz)
    valid: Optional[str] = None  # file prefix or sacrebleu:NAME
    test: Optional[str] = None
    help_root: Optional[str] = None  # an unpacked LibreOffice help tree (skips apt-get)
    cache_dir: str = str(Path.home() / ".cache" / "nmt_lightning")
    valid_size: int = 1000  # held out from the LibreOffice corpus
    test_size: int = 2000
    seed: int = 1
    max_words: int = 250
    max_length_ratio: float = 9.0
    vocab_size: int = 8000
    joint_vocab: bool = True
    moses_normalize: bool = False
    spm_input_sentence_size: int = 2_000_000
    bpe_from: Optional[str] = None  # a prepared data directory whose sentencepiece models are reused
    encode_chunk: int = 10_000

    def validate(self) -> None:
        if self.src == self.tgt:
            raise ValueError(f"--src and --tgt must differ, both are '{self.src}'")
        if self.corpus is not None:
            if self.corpus != "libreoffice":
                raise ValueError(f"--corpus must be 'libreoffice', got '{self.corpus}'")
            if self.train or self.valid or self.test:
                raise ValueError("give either --corpus or --train/--valid/--test, not both")
        elif not (self.train and self.valid and self.test):
            raise ValueError("give --corpus libreoffice, or all of --train, --valid and --test")
        if self.train and is_sacrebleu_name(self.train):
            raise ValueError("--train must be a file prefix; sacrebleu test sets are for --valid/--test")
        PairFilter(self.max_words, self.max_length_ratio)  # validates the limits
        if self.vocab_size < 8:
            raise ValueError(f"--vocab-size must be >= 8, got {self.vocab_size}")
        if self.bpe_from is not None:
            self.adopt_bpe(reused_bpe(Path(self.bpe_from), self.langs))

    def adopt_bpe(self, reused: dict) -> None:
        """With --bpe-from, the vocabulary layout and normalisation are the reused models' own."""
        self.joint_vocab, self.moses_normalize = reused["joint"], reused["moses_normalize"]

    @property
    def langs(self) -> tuple[str, str]:
        return (self.src, self.tgt)


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_identity(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


class Manifest:
    """``DIR/prepare.json``: stage fingerprints, statistics and what a reader needs to know."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / MANIFEST
        self.data: dict = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.data.setdefault("stages", {})
        self.data.setdefault("stats", {})

    def is_done(self, stage: str, fingerprint: str) -> bool:
        return self.data["stages"].get(stage) == fingerprint

    def invalidate_from(self, stage: str) -> None:
        """Forget ``stage`` and every later one (their inputs are about to change)."""
        names = ["text", "bpe", "binary"]
        for name in names[names.index(stage):]:
            self.data["stages"].pop(name, None)
        self.save()

    def complete(self, stage: str, fingerprint: str, **entries: object) -> None:
        self.data["stages"][stage] = fingerprint
        self.data.update(entries)
        self.save()

    def save(self) -> None:
        with atomic_open(self.path) as handle:
            json.dump(self.data, handle, indent=2, ensure_ascii=False)
            handle.write("\n")


# ----------------------------------------------------------------------------- stage 1: text


def _text_inputs_identity(config: PrepareConfig) -> list:
    if config.corpus == "libreoffice":
        return ["libreoffice", config.help_root, config.valid_size, config.test_size, config.seed]
    identity: list = []
    for split in SPLITS:
        spec = getattr(config, split)
        if is_sacrebleu_name(spec):
            identity.append([split, spec, [_file_identity(p) for p in sacrebleu_files(spec[len(SACREBLEU_PREFIX):], config.src, config.tgt)]])
        else:
            identity.append([split, [_file_identity(find_side(spec, lang)) for lang in config.langs]])
    return identity


def _libreoffice_splits(config: PrepareConfig) -> tuple[dict[str, list[tuple[str, str]]], dict[str, dict]]:
    from nmt_lightning.corpora.libreoffice import aligned_paragraphs, fetch_help_tree

    if config.help_root:
        help_root, packages = config.help_root, [{"help_root": str(Path(config.help_root).resolve())}]
    else:
        help_root, packages = fetch_help_tree(Path(config.cache_dir) / "libreoffice", list(config.langs))
    aligned = aligned_paragraphs(help_root, config.src, config.tgt)
    counts = DropCounts()
    pairs = deduplicate(((normalise_whitespace(s), normalise_whitespace(t)) for _, s, t in aligned), counts)
    length_filter = PairFilter(config.max_words, config.max_length_ratio)
    kept = []
    for source, target in pairs:
        reason = length_filter.reason_to_drop(source, target)
        if reason:
            counts.dropped[reason] += 1
        else:
            kept.append((source, target))
    splits = held_out_split(kept, config.valid_size, config.test_size, config.seed, counts)
    return splits, {"corpus": {"read": counts.read, "kept": counts.kept, "dropped": dict(counts.dropped),
                               "sources": packages}}


def _pairs_of(config: PrepareConfig, split: str) -> Iterator[tuple[int, str, str]]:
    spec = getattr(config, split)
    if is_sacrebleu_name(spec):
        return sacrebleu_pairs(spec, config.src, config.tgt)
    return read_parallel(find_side(spec, config.src), find_side(spec, config.tgt))


def _write_text_stage(config: PrepareConfig, out_dir: Path, manifest: Manifest, fingerprint: str) -> None:
    stats: dict[str, dict] = {}
    with contextlib.ExitStack() as files:
        handles = {
            (split, lang): files.enter_context(atomic_open(out_dir / f"{split}.{lang}"))
            for split in SPLITS
            for lang in config.langs
        }

        def write(split: str, source: str, target: str) -> None:
            handles[split, config.src].write(source + "\n")
            handles[split, config.tgt].write(target + "\n")

        if config.corpus == "libreoffice":
            splits, stats = _libreoffice_splits(config)
            for split, pairs in splits.items():
                for source, target in pairs:
                    write(split, source, target)
                stats[split] = {"pairs": len(pairs)}
        else:
            # Valid/test first: train must not contain their source sentences.
            held_out_sources: set[str] = set()
            length_filter = PairFilter(config.max_words, config.max_length_ratio)
            for split in ("valid", "test", "train"):
                counts = DropCounts()
                for _, source, target in tqdm(_pairs_of(config, split), desc=f"reading {split}", unit=" pairs", mininterval=1.0):
                    counts.read += 1
                    source, target = normalise_whitespace(source), normalise_whitespace(target)
                    if split == "train":
                        reason = length_filter.reason_to_drop(source, target)
                        if reason is None and source in held_out_sources:
                            reason = "source also in valid/test"
                    else:
                        # Held-out sets keep every non-empty pair: filtering would change the benchmark.
                        reason = "empty line" if not source or not target else None
                        held_out_sources.add(source)
                    if reason:
                        counts.dropped[reason] += 1
                        continue
                    counts.kept += 1
                    write(split, source, target)
                if counts.kept == 0:
                    raise CorpusError(f"{getattr(config, split)}: no usable pairs left in the {split} split ({counts.summary(split)})")
                stats[split] = {"pairs": counts.kept, "read": counts.read, "dropped": dict(counts.dropped)}
        # Every file is complete: only now let them replace what a previous run left.
        manifest.invalidate_from("text")
    for split in SPLITS:
        for lang in config.langs:
            with open(out_dir / f"{split}.{lang}", encoding="utf-8") as handle:
                stats[split][f"words.{lang}"] = sum(len(line.split()) for line in handle)
    manifest.complete("text", fingerprint, text_stats=stats)


# ----------------------------------------------------------------------------- stage 2: bpe


def spm_model_paths(out_dir: Path, langs: tuple[str, str], joint: bool) -> dict[str, Path]:
    """The sentencepiece model of each language (the same file twice when joint)."""
    return {lang: out_dir / ("spm.model" if joint else f"spm.{lang}.model") for lang in langs}


def _normalised_lines(path: Path, normalizer: TextNormalizer) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            yield normalizer(line.rstrip("\n"))


def reused_bpe(data_dir: Path, langs: tuple[str, str]) -> dict:
    """The sentencepiece models of the prepared directory ``data_dir`` (--bpe-from): a
    distilled or added corpus must keep the token ids its teacher or base model was trained on."""
    manifest_path = data_dir / MANIFEST
    if not manifest_path.is_file():
        raise CorpusError(f"--bpe-from {data_dir}: not a prepared data directory (no {MANIFEST})")
    data = json.loads(manifest_path.read_text(encoding="utf-8"))
    models = data.get("spm_models") or {}
    if set(models) != set(langs):
        raise CorpusError(f"--bpe-from {data_dir}: its sentencepiece models are for {sorted(models) or 'nothing'}, "
                          f"this corpus is {'-'.join(langs)}")
    paths = {lang: data_dir / name for lang, name in models.items()}
    for path in paths.values():
        if not path.is_file():
            raise CorpusError(f"--bpe-from {data_dir}: {path.name} is missing")
    return {"paths": paths, "joint": len(set(models.values())) == 1,
            "moses_normalize": bool(data.get("moses_normalize", False)),
            "identity": [_file_identity(path) for path in paths.values()]}


def _copy_bpe(config: PrepareConfig, models: dict[str, Path]) -> None:
    reused = reused_bpe(Path(config.bpe_from), config.langs)
    for lang, destination in models.items():
        print(f"reusing sentencepiece model {reused['paths'][lang]} ({lang})", flush=True)
        with atomic_open(destination, "wb") as handle:
            handle.write(reused["paths"][lang].read_bytes())


def _write_bpe_stage(config: PrepareConfig, out_dir: Path, manifest: Manifest, fingerprint: str) -> None:
    models = spm_model_paths(out_dir, config.langs, config.joint_vocab)
    groups = [list(config.langs)] if config.joint_vocab else [[lang] for lang in config.langs]
    manifest.invalidate_from("bpe")
    if config.bpe_from is not None:
        _copy_bpe(config, models)
        groups = []
    for langs in groups:
        def sentences() -> Iterator[str]:
            for lang in langs:
                yield from _normalised_lines(out_dir / f"train.{lang}", TextNormalizer(lang, config.moses_normalize))

        print(f"training sentencepiece BPE ({'+'.join(langs)}, vocab {config.vocab_size}) on train ...", flush=True)
        train_sentencepiece(sentences(), models[langs[0]], config.vocab_size, config.spm_input_sentence_size)
    load_sentencepiece.cache_clear()
    vocab = {lang: load_sentencepiece(path).get_piece_size() for lang, path in models.items()}
    manifest.complete(
        "bpe",
        fingerprint,
        spm_models={lang: path.name for lang, path in models.items()},
        vocab_size=vocab,
        moses_normalize=config.moses_normalize,
        languages=list(config.langs),
    )


# ----------------------------------------------------------------------------- stage 3: binary


def _write_binary_stage(config: PrepareConfig, out_dir: Path, manifest: Manifest, fingerprint: str) -> None:
    models = spm_model_paths(out_dir, config.langs, config.joint_vocab)
    token_stats: dict[str, dict[str, int]] = {}
    with contextlib.ExitStack() as files:
        for split in SPLITS:
            for lang in config.langs:
                processor = load_sentencepiece(models[lang])
                normalizer = TextNormalizer(lang, config.moses_normalize)
                writer = files.enter_context(TokenArrayWriter(out_dir / f"{split}.{lang}", processor.get_piece_size()))
                lines = _normalised_lines(out_dir / f"{split}.{lang}", normalizer)
                progress = tqdm(desc=f"encoding {split}.{lang}", unit=" lines", mininterval=1.0)
                for chunk in chunked(lines, config.encode_chunk):
                    writer.add(processor.encode(chunk, out_type=int))
                    progress.update(len(chunk))
                progress.close()
                token_stats.setdefault(split, {})[f"tokens.{lang}"] = writer.num_tokens
        manifest.invalidate_from("binary")
    manifest.complete("binary", fingerprint, token_stats=token_stats)


# ----------------------------------------------------------------------------- driver


def prepare(config: PrepareConfig) -> dict:
    """Run (or reuse) the three stages; returns the manifest contents."""
    config.validate()
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out_dir)
    started = time.perf_counter()

    text_fp = _fingerprint("text", _text_inputs_identity(config), config.langs, config.max_words, config.max_length_ratio)
    reused = reused_bpe(Path(config.bpe_from), config.langs)["identity"] if config.bpe_from else None
    bpe_fp = _fingerprint("bpe", text_fp, config.vocab_size, config.joint_vocab, config.moses_normalize,
                          config.spm_input_sentence_size, reused)
    binary_fp = _fingerprint("binary", bpe_fp, 1)
    stages = [("text", text_fp, _write_text_stage), ("bpe", bpe_fp, _write_bpe_stage), ("binary", binary_fp, _write_binary_stage)]
    for name, fingerprint, write_stage in stages:
        if manifest.is_done(name, fingerprint):
            print(f"[{name}] up to date, reusing {out_dir}", flush=True)
            continue
        stage_started = time.perf_counter()
        write_stage(config, out_dir, manifest, fingerprint)
        print(f"[{name}] done in {time.perf_counter() - stage_started:.1f}s", flush=True)
    manifest.data["config"] = {k: v for k, v in asdict(config).items() if k != "encode_chunk"}
    manifest.save()
    print(format_summary(manifest.data), flush=True)
    print(f"prepare finished in {time.perf_counter() - started:.1f}s: {out_dir}", flush=True)
    return manifest.data


def format_summary(data: dict) -> str:
    """A markdown table of the prepared splits: pairs, words and BPE tokens per language."""
    langs = data["languages"]
    text_stats, token_stats = data["text_stats"], data["token_stats"]
    lines = []
    if "corpus" in text_stats:
        corpus = text_stats["corpus"]
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(corpus["dropped"].items()))
        for source in corpus.get("sources", []):
            lines.append("built from " + (f"{source['package']} {source['version']} (sha256 {source['sha256']})"
                                          if "package" in source else f"the help tree {source['help_root']}"))
        lines.append(f"aligned pairs read: {corpus['read']}; dropped: {dropped}")
    header = ["split", "pairs"] + [f"words {l}" for l in langs] + [f"BPE tokens {l}" for l in langs]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for split in SPLITS:
        row = [split, text_stats[split]["pairs"]]
        row += [text_stats[split][f"words.{l}"] for l in langs]
        row += [token_stats[split][f"tokens.{l}"] for l in langs]
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
        dropped = text_stats[split].get("dropped")
        if dropped:
            lines.append(f"  {split} dropped: " + ", ".join(f"{n} {why}" for why, n in sorted(dropped.items())))
    lines.append(f"vocabulary: {data['vocab_size']} ({'joint' if len(set(data['spm_models'].values())) == 1 else 'separate'})")
    return "\n".join(lines)
