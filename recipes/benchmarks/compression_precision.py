"""Compression callbacks under Lightning's precisions: training speed and loss, with and without.

    python recipes/benchmarks/compression_precision.py --data-dir data/libreoffice_en_cs --steps 400 \\
        --precisions 32-true 16-mixed bf16-mixed --methods plain qat quant-noise distillation \\
        --out runs/compression_precision

For every precision, the ``--preset`` model (default tiny) trains once per method from the
same seed on the same batches: plain; 8-bit QAT from step 0 (``QuantizationAwareTraining``);
Quant-Noise int8 with p = 0.1 on blocks of 8 (``QuantNoise``; ``quant-noise-compiled``: the
same with ``compile=True``, its noise fused by torch.compile); word-level KD from a 6+6
teacher of the tiny width (``KnowledgeDistillation``; ``--teacher`` names its checkpoint, else one is trained here for
``--teacher-steps`` steps in fp32, enough to time the teacher's forward pass, not to teach);
lottery-ticket pruning to 75% in two rounds, rewinding to step 20 (``LotteryTicketPruning``);
iPQ in its three default stages, one every quarter of the run (``IterativeProductQuantization``);
and the ``tiny-bottleneck`` student of that teacher trained layer by layer (``ProgressiveKnowledgeTransfer``,
12 stages, then distillation in the last quarter; its speed is against the plain tiny model, not
a like-for-like ratio). Reported per run: target tokens/s after ``--warmup`` steps (the device
synchronised at both ends) and against plain training at the same precision, the mean training
loss of the last 100 steps, the validation nll of the model as trained (fake-quantized for QAT),
whether every parameter and every QAT activation range is finite, and the method's own invariant
(pruned weights exactly zero at the scheduled sparsity; every iPQ stage on its codebook; a layer
frozen in the next PKT stage unchanged by it). A discarded plain run at each precision
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

from callbacks import (IterativeProductQuantization, KnowledgeDistillation, LotteryTicketPruning,  # noqa: E402
                       ProgressiveKnowledgeTransfer, QuantizationAwareTraining, QuantNoise)
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
    invariant: str


def module_for(data: TranslationDataModule, **overrides) -> TranslationModule:
    return TranslationModule(src_vocab_size=data.src_vocab_size, tgt_vocab_size=data.tgt_vocab_size,
                             **{"preset": "tiny", "pre_norm": True, "lr": 0.002, "warmup_steps": 400, "val_bleu": False,
                                **overrides})


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


class _FrozenLayerWatch(L.Callback):
    """PKT: the parameters of encoder layer 1 when stage 2 begins and when it ends (frozen in between)."""

    def __init__(self, stage_steps: int) -> None:
        self.stage_steps = stage_steps
        self.at: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        if trainer.global_step in (self.stage_steps, 2 * self.stage_steps):
            self.at[trainer.global_step] = [p.detach().clone() for n, p in pl_module.named_parameters()
                                            if n.startswith("model.encoder_layers.0.")]


@dataclass
class Method:
    """The callbacks of one method, the model it trains (preset override) and its invariant."""

    callbacks: Callable[[argparse.Namespace], list[L.Callback]]
    invariant: Callable[[L.LightningModule, list[L.Callback]], str] = lambda module, callbacks: ""
    preset: Optional[str] = None  # None: --preset


def _pruned_weights_are_zero(module: L.LightningModule, callbacks: list[L.Callback]) -> str:
    pruning = next(c for c in callbacks if isinstance(c, LotteryTicketPruning))
    stray = sum(int((parameter.detach()[mask == 0] != 0).sum()) for _, parameter, mask in pruning.weights.masks())
    return f"sparsity {pruning.weights.sparsity():.3f} (round {pruning.round}); {stray} pruned weights nonzero"


def _codebooks_in_use(module: L.LightningModule, callbacks: list[L.Callback]) -> str:
    quantizer = next(c for c in callbacks if isinstance(c, IterativeProductQuantization))
    return f"{quantizer.quantized_stages}/{len(quantizer.stages)} stages on their codebooks"


def _frozen_layer_unchanged(module: L.LightningModule, callbacks: list[L.Callback]) -> str:
    transfer = next(c for c in callbacks if isinstance(c, ProgressiveKnowledgeTransfer))
    watch = next(c for c in callbacks if isinstance(c, _FrozenLayerWatch))
    if len(watch.at) < 2:
        return f"stage {transfer.stage}: run too short to watch stage 2"
    first, second = (watch.at[step] for step in sorted(watch.at))
    moved = sum(not torch.equal(a, b) for a, b in zip(first, second))
    return f"last stage {transfer.stage + 1}/{len(transfer.stages)}; encoder layer 1 changed in stage 2: {moved} tensors"


def _progressive_transfer(args: argparse.Namespace) -> list[L.Callback]:
    stage_steps = max(1, (3 * args.steps // 4) // 12)  # 12 layer stages in the first three quarters
    return [ProgressiveKnowledgeTransfer(teacher_checkpoint(args), stage_steps=stage_steps, feature_weight=100.0),
            _FrozenLayerWatch(stage_steps)]


METHODS: dict[str, Method] = {
    "plain": Method(lambda args: []),
    "qat": Method(lambda args: [QuantizationAwareTraining(bits=8)]),
    "quant-noise": Method(lambda args: [QuantNoise(p=0.1, scheme="int8", block_size=8)]),
    "quant-noise-compiled": Method(lambda args: [QuantNoise(p=0.1, scheme="int8", block_size=8, compile=True)]),
    "distillation": Method(lambda args: [KnowledgeDistillation(teacher_checkpoint(args))]),
    "lottery-ticket": Method(lambda args: [LotteryTicketPruning(sparsity=0.75, rounds=2, round_steps=args.steps * 3 // 8,
                                                                rewind_step=20)], _pruned_weights_are_zero),
    "ipq": Method(lambda args: [IterativeProductQuantization(steps_per_stage=args.steps // 4, start_step=args.steps // 4)],
                  _codebooks_in_use),
    "progressive-transfer": Method(_progressive_transfer, _frozen_layer_unchanged, preset="tiny-bottleneck"),
}


def train_once(args: argparse.Namespace, precision: str, method: str) -> Run:
    callbacks = METHODS[method].callbacks(args)  # (trains the teacher first, if it must)
    L.seed_everything(args.seed, verbose=False)
    data = TranslationDataModule(args.data_dir, src_lang=args.src, tgt_lang=args.tgt, max_tokens=args.max_tokens,
                                 seed=args.seed)
    module = module_for(data, preset=METHODS[method].preset or args.preset)
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
    return Run(precision, method, meter.tokens / meter.seconds, sum(last) / len(last), val_nll, finite,
               METHODS[method].invariant(module, callbacks))


def write_table(runs: list[Run], out: Path, notes: list[str]) -> str:
    header = ["precision", "method", "target tokens/s", "speed vs plain", "train loss (last 100 steps)", "valid nll",
              "all finite", "invariant"]
    plain = {run.precision: run for run in runs if run.method == "plain"}
    table = [[run.precision, run.method, f"{run.tokens_per_second:,.0f}",
              f"{run.tokens_per_second / plain[run.precision].tokens_per_second:.2f}x" if run.precision in plain else "",
              f"{run.train_loss:.3f}", f"{run.val_nll:.3f}", "yes" if run.finite else "NO",
              run.invariant] for run in runs]
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
    parser.add_argument("--preset", default="tiny", choices=["tiny", "base", "big"],
                        help="the model every method but PKT trains (PKT: the tiny-bottleneck student); on a GPU the "
                             "tiny model at 2,048 tokens a batch is bound by kernel launches, so a callback's "
                             "per-weight work weighs far more than at Transformer-base size (e.g. --preset base "
                             "--max-tokens 16384)")
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
    notes = [f"Model preset {args.preset}, {args.steps} steps of {args.max_tokens} tokens from seed {args.seed} on {device}, "
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
