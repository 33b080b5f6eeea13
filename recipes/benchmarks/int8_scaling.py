"""How the CPU speed-up of int8 grows with the model: tiny, base and big, fp32 against int8.

    python recipes/benchmarks/int8_scaling.py --data-dir data/libreoffice_en_cs --presets tiny base big

The embedded corpus trains only the tiny model on CPU, and there int8 decodes 1.8-1.9x as fast as
fp32 on a CPU with VNNI (recipes/benchmarks/int8_quantization.py shows why not more: only the
linear layers get faster, and they are under two thirds of the fp32 decoding time). This script
asks how that changes with width.
For each preset it builds a model with random weights and the corpus's vocabulary, makes its
post-training int8 copy (the same int8 grid and dynamic ``Int8Linear`` as
``nmt-lightning export --quantize int8``) and translates the same test sentences with both,
taking turns. The translations of an untrained model mean nothing, so it times decoding at a
fixed output length instead: every sentence runs to ``--steps`` target tokens (eos is forbidden
until then), identical work for fp32 and int8. The table gives sentences/s, the ratio, and the
share of fp32 time spent in linear layers, as markdown (``--out``) and on stdout.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from int8_quantization import time_in_linear_layers  # noqa: E402  (recipes/benchmarks/)
from nmt_lightning.data import TranslationDataModule  # noqa: E402
from nmt_lightning.decoding import beam_search  # noqa: E402
from nmt_lightning.export.codecs.int8_kernels import Int8Weight, quantize_weight, use_int8_linears  # noqa: E402
from nmt_lightning.model import Transformer  # noqa: E402
from nmt_lightning.model.transformer import PRESETS  # noqa: E402
from nmt_lightning.translate import source_batches  # noqa: E402


def int8_copy(model: Transformer) -> Transformer:
    """Post-training int8: every nn.Linear (the output projection too) on the per-tensor grid."""
    quantized = copy.deepcopy(model)
    weights = {name: Int8Weight(*quantize_weight(layer.weight.detach().float(), bits=8, per_channel=False))
               for name, layer in quantized.named_modules() if isinstance(layer, torch.nn.Linear)}
    use_int8_linears(quantized, weights)
    return quantized.eval()


def decode_all(model: Transformer, batches: list[torch.Tensor], beam: int, steps: int) -> None:
    """Beam search over every batch, each sentence decoding exactly ``steps`` tokens."""
    for source in batches:
        # max_len_b caps every sentence at ``steps`` tokens and min_length keeps eos out until then.
        beam_search(model, source, beam=beam, max_len_a=0.0, max_len_b=steps, min_length=steps)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data/libreoffice_en_cs", help="prepared data (default: %(default)s)")
    parser.add_argument("--src", default="en")
    parser.add_argument("--tgt", default="cs")
    parser.add_argument("--presets", nargs="+", default=["tiny", "base", "big"], choices=sorted(PRESETS))
    parser.add_argument("--sentences", type=int, default=64, help="test sentences per round (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="target tokens decoded per sentence (default: %(default)s)")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args(argv)

    data = TranslationDataModule(args.data_dir, src_lang=args.src, tgt_lang=args.tgt)
    tokenizer = data.tokenizer(args.src)
    lines = Path(args.data_dir, f"test.{args.src}").read_text(encoding="utf-8").splitlines()[: args.sentences]
    token_ids = [tokenizer.encode(line) for line in lines]

    header = ("| preset | d_model | parameters | fp32 sentences/s | int8 sentences/s | int8 vs fp32 "
              "| fp32 time in linear layers |\n|---|---|---|---|---|---|---|")
    rows = []
    for preset in args.presets:
        torch.manual_seed(0)
        fp32 = Transformer.from_preset(preset, data.src_vocab_size, data.tgt_vocab_size, dropout=0.0).eval()
        models = {"fp32": fp32, "int8": int8_copy(fp32)}
        batches = [source for _, source in source_batches(token_ids, args.batch_size, fp32.config.max_positions - 1)]
        speeds: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            decode_all(fp32, batches[:1], args.beam, 2)  # warm-up
            for _ in range(args.rounds):
                for name, model in models.items():
                    started = time.perf_counter()
                    decode_all(model, batches, args.beam, args.steps)
                    speeds[name].append(len(lines) / (time.perf_counter() - started))
            total, inside = time_in_linear_layers(fp32, lambda: decode_all(fp32, batches, args.beam, args.steps))
        fp32_speed, int8_speed = (statistics.median(speeds[name]) for name in ("fp32", "int8"))
        rows.append(f"| {preset} | {fp32.config.d_model} | {fp32.num_parameters() / 1e6:.1f}M | {fp32_speed:.2f} "
                    f"| {int8_speed:.2f} | {int8_speed / fp32_speed:.2f}x | {sum(inside.values()) / total:.0%} |")
        print(rows[-1], flush=True)
    table = "\n".join([header, *rows, "",
                       f"Random weights, vocabulary of {args.data_dir}; {len(lines)} test sentences, beam {args.beam}, "
                       f"batch {args.batch_size}, {args.steps} target tokens each; median of {args.rounds} rounds, "
                       f"models taking turns; {torch.get_num_threads()} CPU threads, torch {torch.__version__}."])
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
