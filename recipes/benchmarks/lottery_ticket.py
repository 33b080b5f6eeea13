"""The seed's lottery-ticket curves for translation: BLEU against the fraction of weights remaining.

    python recipes/benchmarks/lottery_ticket.py --out runs/lottery_ticket  # about 4.5 hours on 2 CPU cores

Every model is the tiny 3+3 Transformer on the LibreOffice en->cs corpus, trained with the tiny
recipe in rounds of ``--round-steps`` steps (default 1000), all nn.Linear weights and the
(tied) embedding pruned by magnitude over the whole model. The levels: 100% of the weights,
then 0.2 ** (r / 2) after r prunings: 44.7%, 20%, 8.9%, 4.0%.

| method | how each level is reached |
|---|---|
| dense | the first round of the late-rewinding run (no pruning yet: one round of plain training) |
| ticket, late rewinding | iterative: 4 prunings, survivors reset to step ``--rewind-step`` each time |
| ticket, rewinding to init | the same, reset to the initialisation (Frankle & Carbin's ticket) |
| random reinit (control) | the late-rewinding ticket's masks, fresh random survivors, one round |
| one-shot | one pruning after one round straight to 20%, 8.9% or 4.0%, late rewinding, one round |
| magnitude pruning | no rewinding: gradual pruning to the level while training one round (Zhu & Gupta) |

Budget: 24 rounds (5 + 5 + 4 + 6 + 4) and a test translation per point. After the
late-rewinding ticket (alone, on every core) the runs are independent and ``--jobs`` (default 2)
of them train at a time, each with its share of the cores and its log in its run directory: on
2 cores two 1-thread trainings make 2.25 steps/s together where one 2-thread training makes
1.77. Measured on 2 cores: about 4 hours of training (18 minutes a round per run, two at a
time) and 20 minutes of scoring; ``--jobs 1`` is an estimated 5 to 6 hours (the issue's limit is
6); ``--round-steps`` scales it. Every run saves a checkpoint at the end of each round and every
200 steps, and resumes from the newest when interrupted;
scores are cached per point: rerun the same command to continue. Writes OUT/lottery_ticket_table.md
and .csv, OUT/lottery_ticket.png (one line per method, x = weights remaining on a log scale,
y = BLEU; needs matplotlib) and the export sizes at 80% sparsity (fp32 and int8 values).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from side_by_side import cached, prepared_test_split, write_table  # noqa: E402  (recipes/benchmarks/side_by_side.py)

TINY = ROOT / "recipes/libreoffice_en_cs/tiny.yaml"
PRUNINGS = 4
FINAL_SPARSITY = 1.0 - 0.2 ** (PRUNINGS / 2)  # kept after r prunings: 0.2 ** (r / 2)
LEVELS = [0.2 ** (r / 2) for r in range(PRUNINGS + 1)]  # fractions of the weights remaining
ONE_SHOT_LEVELS = LEVELS[2:]
PROGRESS_STEPS = 200  # how often a run saves the state it resumes from after an interruption
PRUNE = {"include": ["model.*"], "prune_embeddings": True, "scope": "global"}


def callback(class_path: str, **init_args) -> dict:
    return {"class_path": class_path, "init_args": init_args}


def round_saver(args: argparse.Namespace) -> dict:
    """A checkpoint at the end of every round (the points of the curves; resume points)."""
    return callback("lightning.pytorch.callbacks.ModelCheckpoint", dirpath="rounds", filename="step{step}",
                    every_n_train_steps=args.round_steps, save_top_k=-1, auto_insert_metric_name=False)


def progress_saver() -> dict:
    """The latest state every ``PROGRESS_STEPS`` steps (only the newest kept): an interrupted
    round resumes from there instead of from its start."""
    return callback("lightning.pytorch.callbacks.ModelCheckpoint", dirpath="progress", filename="step{step}",
                    every_n_train_steps=PROGRESS_STEPS, save_top_k=1, auto_insert_metric_name=False)


def resume_point(run_dir: Path) -> Optional[Path]:
    """The checkpoint of ``run_dir`` with the most steps, round or progress, or None."""
    saved = [*run_dir.glob("rounds/step*.ckpt"), *run_dir.glob("progress/step*.ckpt")]
    return max(saved, key=lambda p: int(p.stem[4:]), default=None)


def run(args: argparse.Namespace, name: str, callbacks: list[dict], rounds: int, parallel: bool = False) -> Path:
    """``nmt-lightning fit`` of the tiny recipe for ``rounds`` rounds in OUT/runs/<name>,
    continued from its newest checkpoint (round or progress) if one exists; returns the run directory.
    ``parallel``: one of ``--jobs`` runs at a time, with its share of the cores and its output
    in OUT/runs/<name>/fit.log."""
    run_dir = args.out / "runs" / name
    steps = rounds * args.round_steps
    final = run_dir / "rounds" / f"step{steps}.ckpt"
    if final.is_file():
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    add_on = run_dir / "add_on.yaml"
    add_on.write_text(json.dumps({"trainer": {"callbacks+": [*callbacks, round_saver(args), progress_saver()]}}) + "\n",
                      encoding="utf-8")
    latest = resume_point(run_dir)
    command = [sys.executable, "-m", "nmt_lightning.cli", "fit", "--config", str(TINY), "--config", str(add_on),
               f"--data.data_dir={args.data_dir}", f"--trainer.max_steps={steps}", "--trainer.max_time=null",
               "--trainer.check_val_every_n_epoch=null", f"--trainer.val_check_interval={args.round_steps}",
               "--model.test_output=null", f"--model.val_bleu_sentences={args.val_sentences}",
               "--trainer.limit_val_batches=1.0" if args.val_sentences >= 300 else "--trainer.limit_val_batches=1"]
    if latest is not None:
        command.append(f"--ckpt_path={latest}")
    print(f"$ (cd {run_dir} && nmt-lightning {' '.join(command[3:])})", file=sys.stderr, flush=True)
    if not parallel:
        subprocess.run(command, cwd=run_dir, check=True)
        return run_dir
    environment = dict(os.environ)
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    with open(run_dir / "fit.log", "a", encoding="utf-8") as log:
        subprocess.run(command, cwd=run_dir, check=True, env=environment, stdout=log, stderr=subprocess.STDOUT)
    return run_dir


def round_checkpoint(run_dir: Path, args: argparse.Namespace, round_: int) -> Path:
    """The model at the end of training round ``round_`` (0-based): trained weights and the masks of ``round_`` prunings."""
    return run_dir / "rounds" / f"step{(round_ + 1) * args.round_steps}.ckpt"


def ticket(args: argparse.Namespace, rewind_step: int) -> dict:
    return callback("callbacks.LotteryTicketPruning", sparsity=FINAL_SPARSITY, rounds=PRUNINGS,
                    round_steps=args.round_steps, rewind_step=rewind_step, **PRUNE)


def points(args: argparse.Namespace) -> dict[str, list[tuple[float, Path]]]:
    """Method -> [(fraction remaining, checkpoint)], training what is missing: the late-rewinding
    ticket first (the controls take its masks), then the other runs, ``--jobs`` at a time."""
    late = run(args, "ticket_late_rewinding", [ticket(args, args.rewind_step)], PRUNINGS + 1)
    runs: dict[str, tuple[list[dict], int]] = {"ticket_rewinding_to_init": ([ticket(args, 0)], PRUNINGS + 1)}
    for r in range(1, PRUNINGS + 1):
        runs[f"random_reinit_{r}"] = ([callback(
            "callbacks.LotteryTicketPruning", sparsity=FINAL_SPARSITY, rounds=0, round_steps=args.round_steps,
            reinitialize=True, masks_from=str(round_checkpoint(late, args, r).resolve()), seed=r, **PRUNE)], 1)
    for level in ONE_SHOT_LEVELS:
        runs[f"one_shot_{level:.3f}"] = ([callback(
            "callbacks.LotteryTicketPruning", sparsity=1.0 - level, rounds=1, round_steps=args.round_steps,
            rewind_step=args.rewind_step, **PRUNE)], 2)
    for level in LEVELS[1:]:
        runs[f"magnitude_{level:.3f}"] = ([callback(
            "callbacks.MagnitudePruning", sparsity=1.0 - level, start_step=args.round_steps // 10,
            end_step=args.round_steps * 3 // 4, frequency=max(1, args.round_steps // 20), **PRUNE)], 1)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = dict(zip(runs, pool.map(lambda name: run(args, name, *runs[name], parallel=args.jobs > 1), runs)))
    return {
        "dense": [(1.0, round_checkpoint(late, args, 0))],
        "ticket, late rewinding": [(LEVELS[r], round_checkpoint(late, args, r)) for r in range(1, PRUNINGS + 1)],
        "ticket, rewinding to init": [(LEVELS[r], round_checkpoint(done["ticket_rewinding_to_init"], args, r))
                                      for r in range(1, PRUNINGS + 1)],
        "random reinit (control)": [(LEVELS[r], round_checkpoint(done[f"random_reinit_{r}"], args, 0))
                                    for r in range(1, PRUNINGS + 1)],
        "one-shot": [(level, round_checkpoint(done[f"one_shot_{level:.3f}"], args, 1)) for level in ONE_SHOT_LEVELS],
        "magnitude pruning": [(level, round_checkpoint(done[f"magnitude_{level:.3f}"], args, 0))
                              for level in LEVELS[1:]],
    }


def bleu(args: argparse.Namespace, checkpoint: Path) -> dict:
    """Test BLEU/chrF (beam 4) of the sparse fp32 export of ``checkpoint`` (cached)."""
    from nmt_lightning.evaluation import score
    from nmt_lightning.translation_file import export_checkpoint, load_exported
    from nmt_lightning.translate import translate_lines

    key = "_".join(checkpoint.relative_to(args.out / "runs").with_suffix("").parts)

    def evaluate() -> dict:
        exported = export_checkpoint(checkpoint, args.out / "exports" / f"{key}.safetensors", "fp32")
        sources, references = args.test_split
        print(f"translating the test split: {key}", file=sys.stderr, flush=True)
        found = score(translate_lines(load_exported(exported.output), sources, beam=4), references)
        return {"bleu": found.bleu, "chrf": found.chrf, "bytes": exported.bytes_on_disk}

    return cached(args.out / "scores" / f"{key}.json", evaluate)


def export_sizes(args: argparse.Namespace, dense: Path, sparse: Path) -> dict[str, int]:
    """Bytes on disk of the dense fp32 model and of the 80%-sparse ticket with fp32 and int8 values."""
    from nmt_lightning.translation_file import export_checkpoint

    sizes = {}
    for label, checkpoint, quantize in (("dense fp32", dense, "fp32"), ("80% sparse, fp32 values", sparse, "fp32"),
                                        ("80% sparse, int8 values", sparse, "int8")):
        path = args.out / "exports" / f"size_{label.replace(' ', '_').replace(',', '').replace('%', '')}.safetensors"
        sizes[label] = export_checkpoint(checkpoint, path, quantize).bytes_on_disk
    return sizes


def plot(curves: dict[str, list[tuple[float, dict]]], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    dense = curves["dense"][0][1]["bleu"]
    axes.axhline(dense, color="black", linestyle=":", label=f"dense ({dense:.2f})")
    axes.plot([100], [dense], marker="s", color="black")
    for method, series in curves.items():
        if method == "dense":
            continue
        x = [100 * level for level, _ in series]
        axes.plot(x, [result["bleu"] for _, result in series], marker="o", label=method)
    axes.set_xscale("log")
    axes.invert_xaxis()  # from dense (left) to sparse (right), as the seed's figures
    axes.set_xticks([100 * level for level in LEVELS])  # the levels themselves, where the points are
    axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:.3g}"))
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_xlabel("weights remaining (%, log scale)")
    axes.set_ylabel("BLEU (test, beam 4)")
    axes.set_title("LibreOffice en→cs, tiny Transformer: lottery tickets")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/lottery_ticket")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data/libreoffice_en_cs")
    parser.add_argument("--round-steps", type=int, default=1000, help="training steps of one round")
    parser.add_argument("--rewind-step", type=int, default=40, help="k of late rewinding (4%% of a round)")
    parser.add_argument("--test-sentences", type=int, help="score the first N test sentences only (default: all)")
    parser.add_argument("--val-sentences", type=int, default=300,
                        help="validation BLEU at the end of each round on the first N sentences (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs trained at a time after the first ticket, sharing the cores (default: %(default)s)")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    args.out, args.data_dir = args.out.resolve(), args.data_dir.resolve()
    args.test_split = prepared_test_split(args.data_dir, args.test_sentences)  # read once, scored per checkpoint
    args.out.mkdir(parents=True, exist_ok=True)

    curves = {method: [(level, bleu(args, checkpoint)) for level, checkpoint in series]
              for method, series in points(args).items()}
    dense_bleu = curves["dense"][0][1]["bleu"]
    header = ["method", *(f"{100 * level:.1f}% left" for level in LEVELS)]
    rows = []
    for method, series in curves.items():
        by_level = {round(level, 6): result for level, result in series}
        rows.append([method, *(f"{by_level[round(level, 6)]['bleu']:.2f}" if round(level, 6) in by_level else ""
                               for level in LEVELS)])
    text = write_table(args.out / "lottery_ticket_table.csv", header, rows)
    late = args.out / "runs" / "ticket_late_rewinding"
    sizes = export_sizes(args, round_checkpoint(late, args, 0), round_checkpoint(late, args, 2))
    text += [
        "",
        f"BLEU (test split, beam 4). Rounds of {args.round_steps} steps of the tiny recipe; late rewinding to step "
        f"{args.rewind_step}; every nn.Linear weight and the tied embedding pruned by global magnitude. Dense: "
        f"{dense_bleu:.2f}.",
        "Export at 80% sparsity (the late-rewinding ticket at 20% remaining): "
        + ", ".join(f"{label} {size:,} bytes ({size / sizes['dense fp32']:.1%} of dense fp32)" for label, size in sizes.items()),
        f"Reproduce: python recipes/benchmarks/lottery_ticket.py --out {args.out} --round-steps {args.round_steps} "
        f"--rewind-step {args.rewind_step}",
    ]
    (args.out / "lottery_ticket_table.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    print("\n".join(text))
    plot(curves, args.out / "lottery_ticket.png")


if __name__ == "__main__":
    main()
