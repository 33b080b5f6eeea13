"""Compression callbacks under Lightning's precisions: training speed and loss, with and without.

    python recipes/benchmarks/compression_precision.py --data-dir data/libreoffice_en_cs --steps 400 \\
        --precisions 32-true 16-mixed bf16-mixed --methods plain qat quant-noise distillation \\
        --out runs/compression_precision

For every precision, the tiny model trains once per method from the same seed on the same
batches: plain; 8-bit QAT from step 0 (``QuantizationAwareTraining``); Quant-Noise int8 with
p = 0.1 on blocks of 8 (``QuantNoise``); word-level KD from a 6+6 teacher of the tiny width
(``KnowledgeDistillation``; ``--teacher`` names its checkpoint, else one is trained here for
``--teacher-steps`` steps in fp32, enough to time the teacher's forward pass, not to teach).
Reported per run: target tokens/s after ``--warmup`` steps (the device synchronised at both
ends) and against plain training at the same precision, the mean training loss of the last 100
steps, the validation nll of the model as trained (fake-quantized for QAT), and whether every
parameter and every QAT activation range is finite. A discarded plain run at each precision
comes first (measured: without it, whichever run came first was 2-4x slower on an H100). Meant for a GPU (``--accelerator gpu``);
on CPU only 32-true and bf16-mixed apply.
Writes OUT/compression_precision.md and .csv.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the callbacks package lives at the top of the repository

from callbacks import KnowledgeDistillation, QuantizationAwareTraining, QuantNoise  # noqa: E402
from nmt_lightning.data import TranslationDataModule  # noqa: E402
from nmt_lightning.module import TranslationModule  # noqa: E402


class _Throughput(L.Callback):
    """Target tokens/s from step ``warmup`` on, and the training losses of every step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.tokens, self.losses = warmup, 0, []
        self.started: Optional[float] = None
        self.seconds = float("nan")

    @staticmethod
    def _synchronize(module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            self._synchronize(pl_module)
            self.started = time.perf_counter()
        if trainer.global_step >= self.warmup:
            self.tokens += int((batch["target"] != pl_module.model.config.pad_id).sum())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._synchronize(pl_module)
        if self.started is not None:
            self.seconds = time.perf_counter() - self.started


@dataclass
class Run:
    precision: str
    method: str
    tokens_per_second: float
    train_loss: float
    val_nll: float
    finite: bool


def module_for(data: TranslationDataModule, **overrides) -> TranslationModule:
    return TranslationModule(src_vocab_size=data.src_vocab_size, tgt_vocab_size=data.tgt_vocab_size, preset="tiny",
                             pre_norm=True, lr=0.002, warmup_steps=400, val_bleu=False, **overrides)


def trainer_options(args: argparse.Namespace, precision: str) -> dict:
    return dict(accelerator=args.accelerator, devices=1, precision=precision, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False)


def teacher_checkpoint(args: argparse.Namespace) -> str:
    """``--teacher``, or a 6+6 model of the tiny width trained ``--teacher-steps`` steps here."""
    if args.teacher:
        return args.teacher
    path = Path(args.out) / "teacher.ckpt"
    if not path.is_file():
        L.seed_everything(args.seed, verbose=False)
        data = TranslationDataModule(args.data_dir, src_lang=args.src, tgt_lang=args.tgt, max_tokens=args.max_tokens,
                                     seed=args.seed)
        teacher = module_for(data, encoder_layers=6, decoder_layers=6)
        trainer = L.Trainer(max_steps=args.teacher_steps, limit_val_batches=0, num_sanity_val_steps=0,
                            **trainer_options(args, "32-true"))
        trainer.fit(teacher, datamodule=data)
        trainer.save_checkpoint(path)
    return str(path)


METHODS: dict[str, Callable[[argparse.Namespace], list[L.Callback]]] = {
    "plain": lambda args: [],
    "qat": lambda args: [QuantizationAwareTraining(bits=8)],
    "quant-noise": lambda args: [QuantNoise(p=0.1, scheme="int8", block_size=8)],
    "distillation": lambda args: [KnowledgeDistillation(teacher_checkpoint(args))],
}


def train_once(args: argparse.Namespace, precision: str, method: str) -> Run:
    callbacks = METHODS[method](args)  # (trains the teacher first, if it must)
    L.seed_everything(args.seed, verbose=False)
    data = TranslationDataModule(args.data_dir, src_lang=args.src, tgt_lang=args.tgt, max_tokens=args.max_tokens,
                                 seed=args.seed)
    module = module_for(data)
    meter = _Throughput(args.warmup)
    common = trainer_options(args, precision)
    trainer = L.Trainer(max_steps=args.steps, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[meter, *callbacks], **common)
    trainer.fit(module, datamodule=data)
    # The model as trained: QAT modules stay in place with fake quantization on.
    val_nll = float(L.Trainer(**common).validate(module, datamodule=data, verbose=False)[0]["val/nll"])
    tensors = [*module.parameters(), *(b for n, b in module.named_buffers() if n.endswith("input_quantizer.absmax"))]
    finite = all(bool(torch.isfinite(t).all()) for t in tensors)
    last = meter.losses[-100:]
    return Run(precision, method, meter.tokens / meter.seconds, sum(last) / len(last), val_nll, finite)


def write_table(runs: list[Run], out: Path, notes: list[str]) -> str:
    header = ["precision", "method", "target tokens/s", "speed vs plain", "train loss (last 100 steps)", "valid nll",
              "all finite"]
    plain = {run.precision: run for run in runs if run.method == "plain"}
    table = [[run.precision, run.method, f"{run.tokens_per_second:,.0f}",
              f"{run.tokens_per_second / plain[run.precision].tokens_per_second:.2f}x" if run.precision in plain else "",
              f"{run.train_loss:.3f}", f"{run.val_nll:.3f}", "yes" if run.finite else "NO"] for run in runs]
    markdown = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                          *("| " + " | ".join(line) + " |" for line in table), "", *notes]) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compression_precision.md").write_text(markdown, encoding="utf-8")
    with open(out / "compression_precision.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([[cell.replace(",", "") for cell in line] for line in table])
    return markdown


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data/libreoffice_en_cs", help="prepared data (default: %(default)s)")
    parser.add_argument("--src", default="en")
    parser.add_argument("--tgt", default="cs")
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "16-mixed", "bf16-mixed"])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=50, help="steps left out of the speed (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="tokens per batch, as tiny.yaml")
    parser.add_argument("--teacher", help="the distillation teacher's checkpoint (default: train a 6+6 one here)")
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="runs/compression_precision")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup + 100:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup + 100 ({args.warmup + 100})")
    if "plain" not in args.methods:
        args.methods.insert(0, "plain")  # every speed is relative to it
    device = torch.cuda.get_device_name(0) if args.accelerator in ("gpu", "cuda") and torch.cuda.is_available() else "CPU"
    notes = [f"Tiny model, {args.steps} steps of {args.max_tokens} tokens from seed {args.seed} on {device}, "
             f"torch {torch.__version__}, lightning {L.__version__}; speed from step {args.warmup} on.",
             "Reproduce: python recipes/benchmarks/compression_precision.py "
             + " ".join(sys.argv[1:] if argv is None else argv)]
    runs: list[Run] = []
    for precision in args.precisions:
        # On a GPU the first run of a process is slow for hundreds of steps (kernels chosen for
        # every new batch shape; batches vary in length), so a discarded plain run goes first.
        train_once(args, precision, "plain")
        for method in args.methods:
            runs.append(train_once(args, precision, method))
            print(write_table(runs, Path(args.out), notes), flush=True)


if __name__ == "__main__":
    main()
