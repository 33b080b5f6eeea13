"""Training throughput of TranslationModule under Lightning against a plain PyTorch loop.

    python recipes/benchmarks/training_throughput.py --data-dir data/libreoffice_en_cs --steps 40 --repeats 3

Both run the same model architecture (fresh weights from one seed), the same optimizer and
schedule, and the very same list of token batches, in one process, alternating A/B/A/B so
machine noise hits both. Reports the median target tokens/s of each and their ratio.
Lightning's Trainer runs with no logger, checkpointing, progress bar or validation, as the
comparison is about the training step.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from torch.utils.data import DataLoader

from nmt_lightning.data import TranslationDataModule
from side_by_side import median_table  # recipes/benchmarks/side_by_side.py
from nmt_lightning.module import TranslationModule, inverse_sqrt_schedule


def plain_loop(module: TranslationModule, batches: list[dict]) -> float:
    """Seconds for one pass of a hand-written loop over ``batches``."""
    hp = module.hparams
    optimizer = torch.optim.Adam(module.parameters(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, inverse_sqrt_schedule(hp.warmup_steps))
    module.train()
    started = time.perf_counter()
    for batch in batches:
        logits = module.model(batch["source"], batch["decoder_input"])
        smoothed, _, tokens = module.token_losses(logits, batch["target"])
        (smoothed / tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return time.perf_counter() - started


class _Timer(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.started


def lightning_loop(module: TranslationModule, batches: list[dict], callbacks: tuple = ()) -> float:
    """Seconds for one pass of Lightning's Trainer over ``batches`` (with ``callbacks``, e.g. Quant-Noise)."""
    timer = _Timer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[timer, *callbacks])
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return timer.seconds


def first_batches(data_dir: str, count: int, max_tokens: int) -> tuple[TranslationDataModule, list[dict], int]:
    """(the data module, its first ``count`` training batches, their target tokens): the same
    work for every loop compared."""
    datamodule = TranslationDataModule(str(data_dir), max_tokens=max_tokens)
    datamodule.setup("fit")
    iterator = iter(datamodule.train_dataloader())
    batches = [next(iterator) for _ in range(count)]
    return datamodule, batches, sum(int((b["target"] != 0).sum()) for b in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data/libreoffice_en_cs")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    datamodule, batches, target_tokens = first_batches(args.data_dir, args.steps, args.max_tokens)

    def fresh() -> TranslationModule:
        torch.manual_seed(0)
        return TranslationModule(datamodule.src_vocab_size, datamodule.tgt_vocab_size, preset=args.preset,
                                 val_bleu=False)

    plain_loop(fresh(), batches[:3])  # warm-up: allocator, kernels
    rates: dict[str, list[float]] = {"plain PyTorch": [], "Lightning": []}
    for _ in range(args.repeats):
        rates["plain PyTorch"].append(target_tokens / plain_loop(fresh(), batches))
        rates["Lightning"].append(target_tokens / lightning_loop(fresh(), batches))
    medians, table = median_table("loop", rates, "target tokens/s", digits=0)
    print(f"\n{args.steps} steps, {target_tokens} target tokens, preset {args.preset}, {torch.get_num_threads()} threads")
    print(table)
    print(f"Lightning / plain = {medians['Lightning'] / medians['plain PyTorch']:.3f}")


if __name__ == "__main__":
    main()
