"""How fast torch's own Transformer layers run after StructuredPruning, as load_module gives them back.

    python recipes/benchmarks/pruned_attention_speed.py --out runs/pruned_attention_speed

An nn.Transformer (batch first) of each ``--width`` loses half of every attention's heads and
every layer's feed-forward neurons (StructuredPruning, magnitude importance, one pruning step
at learning rate 0, so the weights stay the random ones), is exported with ``export_module`` and
loaded with ``load_module`` in two ways:

- **cut**: the file without the removed heads and neurons; each nn.MultiheadAttention becomes a
  PrunedMultiheadAttention of the kept heads (scaled_dot_product_attention), the feed-forward
  layers are smaller nn.Linear;
- **zeros**: the record as earlier versions wrote it (``cut: False``): torch's attentions keep
  their shapes with the removed heads zeroed (so torch's fused inference paths stay on), the
  feed-forward layers are cut as above.

against the **dense** model (torch's layers and fast paths as they are). Each is timed in
evaluation without gradients on batches of ``--batch`` source and target sequences of
``--length`` positions (the sources padded to lengths spread down to half), for the encoder
alone and the whole teacher-forced forward, on 1 and 2 threads: the median over ``--rounds``
rounds of ``--repeats`` calls each, the models taking turns. Run it while nothing else runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from side_by_side import cpu_description, reproduce_line  # noqa: E402  (recipes/benchmarks/side_by_side.py)

# d_model, heads, feed-forward neurons; "smoke": the test suite's
WIDTHS = {"tiny": (256, 4, 1024), "base": (512, 8, 2048), "smoke": (32, 4, 64)}


def build(width: str, layers: int) -> nn.Module:
    import lightning as L

    d_model, heads, neurons = WIDTHS[width]

    class Seq2Seq(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = nn.Transformer(d_model, heads, layers, layers, neurons, dropout=0.0, batch_first=True)

        def forward(self, source: torch.Tensor, target: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
            mask = nn.Transformer.generate_square_subsequent_mask(target.shape[1])
            return self.transformer(source, target, tgt_mask=mask, tgt_is_causal=True, src_key_padding_mask=padding,
                                    memory_key_padding_mask=padding)

        def training_step(self, batch, batch_index):
            source, target = batch
            padding = torch.zeros(source.shape[:2], dtype=torch.bool)
            return self(source, target, padding).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)  # the pruning decides; the weights stay

    return Seq2Seq()


def pruned_files(width: str, layers: int, out: Path) -> tuple[Path, Path]:
    """(the cut file, the zeros file) of the model ``dense_model`` builds."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from callbacks import StructuredPruning
    from nmt_lightning.checkpoint_reading import read_checkpoint
    from nmt_lightning.export import export_module

    dense = dense_model(width, layers)
    d_model = WIDTHS[width][0]
    pairs = TensorDataset(torch.randn(8, 6, d_model), torch.randn(8, 6, d_model))
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=str(out),
                        callbacks=[StructuredPruning(importance="magnitude", start_step=1, end_step=1)])
    trainer.fit(dense, DataLoader(pairs, batch_size=4))
    checkpoint_path = out / f"{width}.ckpt"
    trainer.save_checkpoint(checkpoint_path)
    checkpoint = dict(read_checkpoint(checkpoint_path))  # the safe loader export_module uses
    cut, zeros = out / f"{width}_cut.safetensors", out / f"{width}_zeros.safetensors"
    export_module(checkpoint, build(width, layers), cut)
    for record in checkpoint["compression_structure"].values():
        if record.get("fused_rows"):
            record["cut"] = False
    export_module(checkpoint, build(width, layers), zeros)
    return cut, zeros


def dense_model(width: str, layers: int) -> nn.Module:
    """The model before pruning (seeded: the same weights every call)."""
    torch.manual_seed(0)
    return build(width, layers)


def batch(width: str, sentences: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    d_model = WIDTHS[width][0]
    source = torch.randn(sentences, length, d_model, generator=generator)
    target = torch.randn(sentences, length, d_model, generator=generator)
    lengths = torch.linspace(length, length // 2, sentences).round().long()  # left-aligned, as the nested path wants
    padding = torch.arange(length)[None, :] >= lengths[:, None]
    return source, target, padding


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/pruned_attention_speed"))
    parser.add_argument("--width", nargs="+", choices=sorted(WIDTHS), default=["tiny", "base"])
    parser.add_argument("--layers", type=int, default=6, help="encoder and decoder layers (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from nmt_lightning.export import load_module

    lines = [f"Measured {date.today().isoformat()}, {cpu_description()}; {args.batch} sequences of {args.length} "
             f"positions, {args.layers}+{args.layers} layers, median of {args.rounds} rounds x {args.repeats} calls "
             f"(ms per call).", "",
             "| width | threads | part | dense (torch) | half removed, zeros (torch's attention) | half removed, cut "
             "(PrunedMultiheadAttention) | cut vs dense | cut vs zeros |", "|---|---|---|---|---|---|---|---|"]
    for width in args.width:
        cut_file, zeros_file = pruned_files(width, args.layers, args.out)
        models = {"dense": dense_model(width, args.layers).eval(),
                  "zeros": load_module(build(width, args.layers), zeros_file),
                  "cut": load_module(build(width, args.layers), cut_file)}
        source, target, padding = batch(width, args.batch, args.length)
        parts = {"encoder": lambda m: m.transformer.encoder(source, src_key_padding_mask=padding),
                 "encoder + decoder": lambda m: m(source, target, padding)}
        with torch.no_grad():  # one pruned model in two forms (the padded positions aside: the nested path zeroes them)
            apart = (models["cut"](source, target, padding) - models["zeros"](source, target, padding))[~padding]
        if apart.abs().max() > 1e-3:
            raise SystemExit(f"{width}: the cut and the zeroed model compute differently ({apart.abs().max():.2e})")
        for threads in args.threads:
            torch.set_num_threads(threads)
            for part, call in parts.items():
                times: dict[str, list[float]] = {name: [] for name in models}
                with torch.no_grad():
                    for name, model in models.items():  # warm-up
                        call(model)
                    for _ in range(args.rounds):
                        for name, model in models.items():
                            started = time.perf_counter()
                            for _ in range(args.repeats):
                                call(model)
                            times[name].append(1000 * (time.perf_counter() - started) / args.repeats)
                median = {name: statistics.median(values) for name, values in times.items()}
                lines.append(f"| {width} | {threads} | {part} | {median['dense']:.2f} | {median['zeros']:.2f} | "
                             f"{median['cut']:.2f} | {median['dense'] / median['cut']:.2f}x | "
                             f"{median['zeros'] / median['cut']:.2f}x |")
                print(lines[-1], flush=True)
    lines += ["", reproduce_line(Path(__file__).name, argv)]
    (args.out / "pruned_attention_speed.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
