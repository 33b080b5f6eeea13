"""Translation speed (sentences/s) with and without the key/value cache, side by side.

    python recipes/benchmarks/translation_speed.py --checkpoint runs/libreoffice_en_cs_tiny/checkpoints/last.ckpt \
        --input data/libreoffice_en_cs/test.en --sentences 300 --beam 4 --repeats 3

Runs cached and uncached beam search alternately on the same sentences and batch size, and
reports the medians, their ratio, and whether both produced the same translations.
"""

from __future__ import annotations

import argparse
import time

import torch

from nmt_lightning.loading import load_translation_module
from nmt_lightning.translate import translate_lines
from side_by_side import median_table  # recipes/benchmarks/side_by_side.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    module = load_translation_module(args.checkpoint)
    lines = open(args.input, encoding="utf-8").read().splitlines()[: args.sentences]
    speeds: dict[str, list[float]] = {"with cache": [], "without cache": []}
    outputs: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for name, use_cache in (("with cache", True), ("without cache", False)):
            started = time.perf_counter()
            outputs[name] = translate_lines(module, lines, beam=args.beam, batch_size=args.batch_size, progress=False,
                                            use_cache=use_cache)
            speeds[name].append(len(lines) / (time.perf_counter() - started))
    medians, table = median_table("decoder", speeds, "sentences/s", digits=2)
    same = sum(a == b for a, b in zip(outputs["with cache"], outputs["without cache"]))
    print(f"{len(lines)} sentences, beam {args.beam}, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(table)
    print(f"cache speed-up = {medians['with cache'] / medians['without cache']:.2f}x; identical translations: {same}/{len(lines)}")


if __name__ == "__main__":
    main()
