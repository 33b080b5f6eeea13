"""Which layers product quantization hurts most: post-training iPQ of one group of layers at a time.

    python recipes/benchmarks/ipq_sensitivity.py --checkpoint runs/libreoffice_en_cs_tiny/checkpoints/last.ckpt

Each row quantizes only its group (k-means codebooks of 256 words, no fine-tuning; the rest of
the model stays fp32) and translates the first ``--sentences`` test sentences. The gap to the
fp32 row is what fine-tuning (and Quant-Noise before it) has to win back for that group; it
shows where a larger codebook or block budget would pay. Writes OUT/ipq_sensitivity.md and .csv.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the callbacks package lives at the top of the repository

from side_by_side import cpu_description, prepared_test_split, write_table  # noqa: E402

ATTENTION = ["*attn.*"]
GROUPS = [  # (row, stage globs, block size)
    ("feed-forward, blocks of 8", ["*.ffn.*"], 8),
    ("embeddings + output projection, blocks of 8", ["*embed*", "*output_projection"], 8),
    ("attention, blocks of 4", ATTENTION, 4),
    ("attention, blocks of 8", ATTENTION, 8),
    ("all (the default post-training iPQ)", None, None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "runs/libreoffice_en_cs_tiny/checkpoints/last.ckpt")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data/libreoffice_en_cs")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/ipq_sensitivity")
    parser.add_argument("--sentences", type=int, default=300, help="the first N test sentences")
    parser.add_argument("--beam", type=int, default=1)
    args = parser.parse_args()
    if not args.checkpoint.is_file():
        sys.exit(f"--checkpoint {args.checkpoint}: no such file (train the main job first)")

    from callbacks import IterativeProductQuantization
    from nmt_lightning.loading import load_translation_module
    from nmt_lightning.evaluation import score
    from nmt_lightning.translate import translate_lines

    sources, references = prepared_test_split(args.data_dir, args.sentences)

    def evaluate(module: torch.nn.Module) -> tuple[float, float]:
        found = score(translate_lines(module, sources, beam=args.beam, progress=False), references)
        return found.bleu, found.chrf

    baseline = evaluate(load_translation_module(args.checkpoint))
    rows = [["none (fp32)", f"{baseline[0]:.2f}", f"{baseline[1]:.2f}", "0.00"]]
    for name, stages, block_size in GROUPS:
        module = load_translation_module(args.checkpoint)
        settings = {} if stages is None else {"stages": [stages], "block_size": block_size, "block_sizes": {}}
        IterativeProductQuantization(**settings).quantize_post_training(module)
        bleu, chrf = evaluate(module)
        rows.append([name, f"{bleu:.2f}", f"{chrf:.2f}", f"{bleu - baseline[0]:+.2f}"])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    text = write_table(args.out / "ipq_sensitivity.csv", ["quantized group", "BLEU", "chrF2", "BLEU vs fp32"], rows)
    text += ["", f"{args.checkpoint}; first {len(references)} test sentences, beam {args.beam}; 256 codewords, "
                 f"no fine-tuning; {torch.get_num_threads()} threads on {cpu_description()}."]
    (args.out / "ipq_sensitivity.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    print("\n".join(text))


if __name__ == "__main__":
    main()
