"""Two method choices measured: Quant-Noise pq's gradient, and what late rewinding rewinds.

    python recipes/benchmarks/method_choices.py --out runs/method_choices

1. **Quant-Noise ``pq``: straight-through or dropout gradient.** Fan et al. (and fairseq) pass
   the noisy weight's gradient straight through to every block; differentiating the dropout
   instead gives dropped blocks no gradient and kept ones 1 / (1 - p) of theirs. Each variant
   runs the Quant-Noise table's iPQ row (``quant_noise.py``'s ``ipq_quant_noise``): from the same
   fp32 model, ``--steps`` of fine-tuning with Quant-Noise pq (p = 0.1), then ``--ipq-steps`` of
   iPQ (feed-forward, embeddings, attention) with Quant-Noise pq on the layers still dense.
2. **Late rewinding: the schedule continues from step k, or restarts.** Frankle et al. (2020)
   rewind the weights and the learning-rate schedule to step k; restarting the schedule warms
   up again each round. Each variant is the lottery benchmark's late-rewinding ticket
   (``lottery_ticket.py``: rounds of ``--round-steps``, k = ``--rewind-step``, every nn.Linear
   and the tied embedding pruned by global magnitude, 0.2 ** (r / 2) kept after r prunings),
   read at 20% and 8.9% of the weights remaining.

Every pair is compared on the whole test split (beam 4) with sacrebleu's paired bootstrap test.
The fp32 model of (1) is the tiny recipe's (1,400 steps), trained here unless ``--base`` names
one. Runs, hypotheses and scores are cached under ``--out``: an interrupted run continues where
it stopped when the same command runs again. Writes ``--out``/method_choices.{md,csv}.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import lottery_ticket  # noqa: E402  (recipes/benchmarks/lottery_ticket.py)
from quant_noise import FINETUNE, FINETUNED, TINY, callback_yaml, ipq  # noqa: E402
from side_by_side import cached, cpu_description, prepared_test_split, run_fit, write_table  # noqa: E402

TINY_LAST = Path("runs/libreoffice_en_cs_tiny/checkpoints/last.ckpt")  # tiny.yaml's, relative to its run directory
TINY_STEPS = 1400
PQ_GRADIENTS = ("straight_through", "dropout")
SCHEDULES = ("continue", "restart")
LEVEL_ROUNDS = {0.2: 2, 0.2 ** 1.5: 3}  # fraction remaining -> prunings (the curve's 20% and 8.9%)


def quant_noise_pq(gradient: str) -> str:
    return callback_yaml("callbacks.QuantNoise", p=0.1, scheme="pq", block_size=8, block_sizes={"*attn.*": 4},
                         include=["model.*"], per_channel=True, seed=0, pq_gradient=gradient)


class Runs:
    """The trainings of both comparisons (each cached in ``--out``/runs/<name>)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._base_lock = threading.Lock()

    def threads(self) -> Optional[int]:
        return 1 if self.args.jobs > 1 else None

    def log(self, name: str) -> Optional[Path]:
        if self.args.jobs == 1:
            return None
        (self.args.out / "runs" / name).mkdir(parents=True, exist_ok=True)
        return self.args.out / "runs" / name / "fit.log"

    def base(self) -> Path:
        with self._base_lock:
            if self.args.base is not None:
                return self.args.base
            return run_fit(self.args.out, "base", [TINY], [], [f"--data.data_dir={self.args.data_dir}"], TINY_LAST,
                           TINY_STEPS, threads=self.threads(), log=self.log("base")).resolve()

    def finetune(self, name: str, start: Path, add_ons: list[str], steps: int) -> Path:
        overrides = [f"--data.data_dir={self.args.data_dir}", f"--model.init_from={start}",
                     "--model.val_bleu_sentences=100"]
        return run_fit(self.args.out, name, [TINY, FINETUNE], add_ons, overrides, FINETUNED, steps,
                       threads=self.threads(), log=self.log(name)).resolve()

    def ipq_row(self, gradient: str) -> Path:
        noised = self.finetune(f"quant_noise_pq_{gradient}", self.base(), [quant_noise_pq(gradient)], self.args.steps)
        return self.finetune(f"quant_noise_ipq_{gradient}", noised, [ipq(self.args, 16), quant_noise_pq(gradient)],
                             self.args.ipq_steps)

    def ticket(self, schedule: str) -> Path:
        """The late-rewinding ticket's run directory, trained to its 8.9% round."""
        ticket = lottery_ticket.ticket(self.args, self.args.rewind_step)
        ticket["init_args"]["schedule"] = schedule
        rounds = max(LEVEL_ROUNDS.values()) + 1
        return lottery_ticket.run(self.args, f"ticket_late_rewinding_{schedule}", [ticket], rounds,
                                  parallel=self.args.jobs > 1)


def translate_and_score(args: argparse.Namespace, key: str, checkpoint: Path, quantize: Optional[str]) -> list[str]:
    """The test split's translations (beam 4) by the export of ``checkpoint`` (cached as text)."""
    from nmt_lightning.translation_file import export_checkpoint, load_exported
    from nmt_lightning.translate import translate_lines

    hypotheses = args.out / "hypotheses" / f"{key}.cs"
    if not hypotheses.is_file():
        exported = args.out / "exports" / f"{key}.safetensors"
        exported.parent.mkdir(parents=True, exist_ok=True)
        export_checkpoint(checkpoint, exported, quantize)
        print(f"translating the test split: {key}", file=sys.stderr, flush=True)
        lines = translate_lines(load_exported(exported), args.test_split[0], beam=4)
        hypotheses.parent.mkdir(parents=True, exist_ok=True)
        hypotheses.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return hypotheses.read_text(encoding="utf-8").splitlines()


def compare(args: argparse.Namespace, name: str, baseline: tuple[str, list[str]], system: tuple[str, list[str]]) -> dict:
    from nmt_lightning.evaluation import paired_comparison

    def test() -> dict:
        return paired_comparison(baseline[1], system[1], args.test_split[1]).as_dict()

    return {"comparison": name, "baseline": baseline[0], "system": system[0],
            **cached(args.out / "comparisons" / f"{name}.json", test)}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/method_choices"))
    parser.add_argument("--data-dir", type=Path, default=Path("data/libreoffice_en_cs"))
    parser.add_argument("--base", type=Path, help="the fp32 model of the Quant-Noise rows (default: train the tiny recipe)")
    parser.add_argument("--steps", type=int, default=300, help="Quant-Noise pq fine-tuning steps (default: %(default)s)")
    parser.add_argument("--ipq-steps", type=int, default=600, help="iPQ steps, a third per stage (default: %(default)s)")
    parser.add_argument("--round-steps", type=int, default=1000, help="steps of a lottery round (default: %(default)s)")
    parser.add_argument("--rewind-step", type=int, default=40, help="k of late rewinding (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each (default: %(default)s)")
    parser.add_argument("--only", choices=["quant_noise", "lottery"], help="one of the two comparisons")
    parser.add_argument("--test-sentences", type=int, help="score the first N test sentences only (default: all)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.steps < 1 or args.ipq_steps < 3 or args.round_steps < 2 or not 0 <= args.rewind_step < args.round_steps:
        parser.error("--jobs and --steps >= 1, --ipq-steps >= 3, --round-steps >= 2 and 0 <= --rewind-step < --round-steps")
    args.out, args.data_dir = args.out.resolve(), args.data_dir.resolve()
    args.base = args.base.resolve() if args.base else None
    if args.base is not None and not args.base.is_file():
        parser.error(f"--base: {args.base}: no such checkpoint")
    args.val_sentences, args.test_split = 100, prepared_test_split(args.data_dir, args.test_sentences)
    args.out.mkdir(parents=True, exist_ok=True)

    runs = Runs(args)
    tasks: dict[str, Callable[[], Path]] = {}
    if args.only in (None, "lottery"):
        tasks.update({f"lottery_{s}": (lambda s=s: runs.ticket(s)) for s in SCHEDULES})
    if args.only in (None, "quant_noise"):
        tasks.update({f"pq_{g}": (lambda g=g: runs.ipq_row(g)) for g in PQ_GRADIENTS})
    order = sorted(tasks, key=lambda name: name.startswith("pq_"))  # the long lottery runs first
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {name: pool.submit(tasks[name]) for name in order}
        trained = {name: future.result() for name, future in futures.items()}

    rows, comparisons = [], []
    if "pq_straight_through" in trained:
        pair = [(f"iPQ, Quant-Noise pq, {g.replace('_', '-')} gradient", translate_and_score(args, f"ipq_{g}", trained[f"pq_{g}"], None))
                for g in PQ_GRADIENTS]
        comparisons.append(compare(args, "pq_gradient", pair[1], pair[0]))
    for fraction, prunings in LEVEL_ROUNDS.items():
        if "lottery_continue" not in trained:
            break
        pair = [(f"ticket at {fraction:.1%}, schedule {s}s from step k" if s == "continue" else
                 f"ticket at {fraction:.1%}, schedule restarts", translate_and_score(
                     args, f"ticket_{s}_{fraction:.3f}",
                     lottery_ticket.round_checkpoint(trained[f"lottery_{s}"], args, prunings), "fp32"))
                for s in SCHEDULES]
        comparisons.append(compare(args, f"rewind_schedule_{fraction:.3f}", pair[1], pair[0]))
    for c in comparisons:
        rows.append([c["baseline"], c["system"], f"{c['baseline_bleu']:.2f}", f"{c['system_bleu']:.2f}",
                     f"{c['system_bleu'] - c['baseline_bleu']:+.2f}", f"{c['bleu_p_value']:.3f}",
                     f"{c['baseline_chrf']:.2f}", f"{c['system_chrf']:.2f}", f"{c['chrf_p_value']:.3f}"])
    header = ["baseline", "system (the paper's choice)", "BLEU baseline", "BLEU system", "difference", "p (BLEU)",
              "chrF2 baseline", "chrF2 system", "p (chrF2)"]
    text = write_table(args.out / "method_choices.csv", header, rows)
    text += ["", f"Test split ({len(args.test_split[1])} sentences), beam 4; p: sacrebleu's paired bootstrap "
                 f"(1,000 resamples) of the system against the baseline; one training seed per row. CPU: "
                 f"{cpu_description()}.",
             f"Quant-Noise: p = 0.1, {args.steps} steps of pq noise then {args.ipq_steps} of iPQ with it, from "
             f"{args.base or 'the tiny recipe (1,400 steps)'}. Lottery: rounds of {args.round_steps} steps, k = "
             f"{args.rewind_step}, warm-up of the tiny recipe (400 steps).",
             f"Reproduce: python recipes/benchmarks/method_choices.py --out {args.out}"
             + ("" if args.base is None else f" --base {args.base}")]
    (args.out / "method_choices.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    (args.out / "method_choices.json").write_text(json.dumps(comparisons, indent=1) + "\n", encoding="utf-8")
    print("\n".join(text))


if __name__ == "__main__":
    main()
