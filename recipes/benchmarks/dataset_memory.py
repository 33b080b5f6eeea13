"""Peak memory of the training-time dataset on a synthetic corpus of CzEng-like size.

    python recipes/benchmarks/dataset_memory.py --pairs 2000000 --workdir /tmp/memmap-bench

Writes ``--pairs`` synthetic sentence pairs (random ids, 5-60 tokens a side) with the same
writer ``prepare`` uses, then, in a fresh process, builds the ParallelTokenDataset and the
TokenBatchSampler exactly as TranslationDataModule does and collates one full epoch of
batches. It reports the resident memory after imports, and the peak during the epoch, split
into anonymous memory (what the process allocated: this is what must not grow with the
corpus) and file-backed pages of the memory maps (page cache the kernel can drop at will).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write_corpus(workdir: Path, pairs: int, vocab_size: int, seed: int = 0) -> None:
    from nmt_lightning.binarized import TokenArrayWriter

    rng = np.random.default_rng(seed)
    chunk = 100_000
    for lang in ("en", "cs"):
        with TokenArrayWriter(workdir / f"train.{lang}", vocab_size) as writer:
            for start in range(0, pairs, chunk):
                n = min(chunk, pairs - start)
                lengths = rng.integers(5, 61, size=n)
                writer.add_flat(rng.integers(4, vocab_size, size=int(lengths.sum())), lengths)


def memory_kib() -> dict[str, int]:
    """Current RSS split from /proc/self/status, and the peak (VmHWM), in KiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


def measure(workdir: Path, vocab_size: int, max_tokens: int, batches: int | None) -> dict:
    import torch  # noqa: F401  (imported before the baseline, as in training)

    from nmt_lightning.data.dataset import ParallelTokenDataset
    from nmt_lightning.data.sampler import TokenBatchSampler

    baseline = memory_kib()
    started = time.perf_counter()
    dataset = ParallelTokenDataset(workdir, "train", "en", "cs", vocab_size, vocab_size)
    source_lengths, target_lengths = dataset.lengths()
    sampler = TokenBatchSampler(source_lengths, target_lengths, max_tokens=max_tokens, seed=1)
    peak_anon, peak_file, seen, count = 0, 0, 0, 0
    for count, indices in enumerate(sampler, 1):
        batch = dataset[indices]
        seen += len(batch["indices"])
        if count % 200 == 0:
            now = memory_kib()
            peak_anon, peak_file = max(peak_anon, now["RssAnon"]), max(peak_file, now["RssFile"])
        if batches is not None and count >= batches:
            break
    now = memory_kib()
    return {
        "pairs": len(dataset),
        "batches": count,
        "pairs_seen": seen,
        "seconds": round(time.perf_counter() - started, 1),
        "baseline_rss_mib": round(baseline["VmRSS"] / 1024, 1),
        "baseline_anon_mib": round(baseline["RssAnon"] / 1024, 1),
        "peak_anon_mib": round(max(peak_anon, now["RssAnon"]) / 1024, 1),
        "anon_growth_mib": round((max(peak_anon, now["RssAnon"]) - baseline["RssAnon"]) / 1024, 1),
        "peak_file_backed_mib": round(max(peak_file, now["RssFile"]) / 1024, 1),
        "peak_rss_mib": round(now["VmHWM"] / 1024, 1),
        "data_on_disk_mib": round(sum(p.stat().st_size for p in workdir.glob("train.*")) / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2_000_000)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=None, help="stop after this many batches (default: a full epoch)")
    parser.add_argument("--workdir", default="/tmp/nmt-dataset-memory")
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if args.measure_only:
        print(json.dumps(measure(workdir, args.vocab_size, args.max_tokens, args.batches)))
        return
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    write_corpus(workdir, args.pairs, args.vocab_size)
    print(f"wrote {args.pairs} synthetic pairs in {time.perf_counter() - started:.1f}s to {workdir}", flush=True)
    # A fresh process, so nothing from writing is counted.
    command = [sys.executable, __file__, "--measure-only", "--workdir", str(workdir), "--vocab-size", str(args.vocab_size),
               "--max-tokens", str(args.max_tokens)] + (["--batches", str(args.batches)] if args.batches else [])
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    print("| " + " | ".join(result) + " |")
    print("|" + "---|" * len(result))
    print("| " + " | ".join(str(v) for v in result.values()) + " |")


if __name__ == "__main__":
    main()
