"""The compression study: every method of the library against a fair control, from converged models.

    python recipes/benchmarks/study.py                        # trains what is missing, then docs/results.md
    python recipes/benchmarks/study.py --only references      # just the converged base and teacher
    python recipes/benchmarks/study.py --only page            # the page from what is trained (no training)
    python recipes/benchmarks/study.py --only speed           # CTranslate2 int8 speed of every row (alone!)

What runs, with which budget and control, is ``recipes/benchmarks/study_plan.py``; the page is
``study_page.py``. Stages, in order (a stage trains only what is missing; every run, export,
translation, score, paired test and speed round is cached under ``--out``, so an interrupted
study continues where it stopped when the same command runs again, and a finished one rewrites
its page from the caches in a few minutes):

1. ``references``: the tiny 3+3 base and the 6+6 teacher, trained until validation BLEU is on a
   plateau (``recipes/libreoffice_en_cs/converged.yaml``), side by side on a core each;
2. ``qat``, ``quant_noise``, ``distillation``, ``mobilebert``, ``lottery``: the tables' runs,
   ``--jobs`` at a time (each on cores / jobs threads), each starting from the references;
3. ``scores``: every row exported as it deploys and translated (test split, beam 4), then
   sacrebleu's paired bootstrap test for every comparison, per seed;
4. ``speed``: each row's CTranslate2 int8 conversion, sentences/s on 2 threads (models taking
   turns; run it while nothing else runs: two jobs on two cores slow each other several-fold);
5. ``page``: ``--page`` (docs/results.md), the tables as CSV and the figures under ``--out``.

``--smoke STEPS`` runs the whole study with every budget set to STEPS and a small model (the
test suite does that on its tiny corpus); its page says so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import study_page  # noqa: E402  (recipes/benchmarks/study_page.py)
from side_by_side import cached, checkpoint_step, file_slug, run_fit, sequence_kd_data  # noqa: E402
from study_plan import PLATEAU, Budget, Plan, Row, Run, plan  # noqa: E402

STAGES = ("references", "qat", "quant_noise", "distillation", "mobilebert", "lottery", "fast_students", "scores", "speed",
          "page")
SMOKE_MODEL = ["--model.d_model=32", "--model.ffn_dim=64", "--model.heads=2"]
SMOKE_BOTTLENECK = [*SMOKE_MODEL, "--model.bottleneck_dim=16", "--model.embedding_dim=16"]


class Study:
    """Trains and scores the plan's runs under ``out``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, args.out
        self.budget = Budget().scaled(args.smoke, args.smoke_seeds) if args.smoke else Budget()
        self.plan: Plan = plan(self.budget, str(self.result("teacher")))
        self.log = self.out / "study.log"

    # ------------------------------------------------------------------ where things are
    def result(self, name: str) -> Path:
        """The final checkpoint of run ``name`` (whether it exists yet or not)."""
        kinds = {"base": "reference", "teacher": "teacher"}
        run = Run(name, kinds[name], (), 0) if name in kinds else self.plan.runs[name]
        return (self.out / "runs" / name / run.result).resolve()

    def finished(self, name: str) -> bool:
        run = self.plan.runs[name]
        if run.kind in ("reference", "teacher") and not self.args.smoke:
            return (self.out / "runs" / name / PLATEAU).is_file()
        return checkpoint_step(self.result(name)) >= run.steps

    def table_of(self, run: Run) -> str:
        """The table a run serves: its rows' (or, for a run others only start from, theirs)."""
        for row in self.plan.rows:
            if row.run == run.name:
                return row.table
        later = next((other for other in self.plan.runs.values() if other.start == run.name), None)
        return self.table_of(later) if later is not None else "references"

    def dependencies(self, run: Run) -> list[str]:
        needs = [run.start] if run.start else []
        needs += [text.split("<masks of ", 1)[1].split(">", 1)[0] for text in run.add_ons if "<masks of " in text]
        if any(str(self.result("teacher")) in text for text in run.add_ons) or run.data:
            needs.append("teacher")
        if run.name != "base" and run.kind not in ("reference", "teacher") and not run.start:
            needs.append("base")  # everything is judged against the converged base: train it first
        return needs

    # ------------------------------------------------------------------ training
    def overrides(self, run: Run) -> list[str]:
        data = self.sequence_kd_data() if run.data == "sequence_kd" else self.args.data_dir
        if run.kind in ("reference", "teacher"):  # the recipe's seed and its 500 validation sentences
            options = [f"--data.data_dir={data}"]
        else:
            options = [f"--data.data_dir={data}", f"--seed_everything={run.seed}", f"--data.seed={run.seed}",
                       "--model.val_bleu_sentences=100", *run.overrides]
        if run.start:
            options.append(f"--model.init_from={self.result(run.start)}")
            if run.init_layers:
                options.append(f"--model.init_layers={run.init_layers}")
        if self.args.accelerator:
            options.append(f"--trainer.accelerator={self.args.accelerator}")
        if self.args.smoke:
            options += SMOKE_BOTTLENECK if run.kind == "bottleneck" else SMOKE_MODEL
            options += ["--trainer.limit_val_batches=1", "--model.val_bleu_sentences=4"]
        return options

    def add_ons(self, run: Run) -> list[str]:
        texts = []
        for text in run.add_ons:
            while "<masks of " in text:
                name = text.split("<masks of ", 1)[1].split(">", 1)[0]
                text = text.replace(f"<masks of {name}>", str(self.result(name)))
            texts.append(text)
        return texts

    def train(self, name: str, threads: Optional[int]) -> Path:
        run = self.plan.runs[name]
        run_dir = self.out / "runs" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        configs = [ROOT / config for config in run.configs]
        finished = None if self.args.smoke else (Path(PLATEAU) if run.kind in ("reference", "teacher") else None)
        return run_fit(self.out, name, configs, self.add_ons(run), self.overrides(run), Path(run.result), run.steps,
                       finished=finished, threads=threads, log=run_dir / "train.log" if threads else None)

    def train_all(self, tables: set[str]) -> None:
        """Every run of ``tables`` (and what they start from), ``--jobs`` at a time, dependencies first."""
        wanted = {name for name, run in self.plan.runs.items() if self.table_of(run) in tables}
        pending = set(wanted)
        while True:  # add what the wanted runs start from
            extra = {need for name in pending for need in self.dependencies(self.plan.runs[name])} - pending
            if not extra:
                break
            pending |= extra
        pending = {name for name in pending if not self.finished(name)}
        threads = 1 if self.args.jobs > 1 else None
        running: dict[Future, str] = {}
        with ThreadPoolExecutor(max_workers=self.args.jobs) as pool:
            while pending or running:
                ready = sorted(name for name in pending
                               if all(self.finished(need) for need in self.dependencies(self.plan.runs[name])))
                for name in ready[: self.args.jobs - len(running)]:
                    pending.discard(name)
                    self.note(f"training {name} ({self.plan.runs[name].steps:,} steps)")
                    running[pool.submit(self.train, name, threads)] = name
                if not running:
                    raise SystemExit(f"study: nothing can start: {sorted(pending)} wait for runs that did not finish")
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    name = running.pop(future)
                    future.result()  # a failed run stops the study, naming its log
                    self.note(f"finished {name}")

    def sequence_kd_data(self) -> Path:
        """The teacher's beam-4 translations of the training source, prepared with its BPE."""
        source = None
        if self.args.smoke:  # a smoke test translates a sample of the training set
            source = self.out / "sequence_kd" / "sample" / "train"
            source.parent.mkdir(parents=True, exist_ok=True)
            for side in ("en", "cs"):
                lines = (self.args.data_dir / f"train.{side}").read_text(encoding="utf-8").splitlines(True)[:200]
                Path(f"{source}.{side}").write_text("".join(lines), encoding="utf-8")
        return sequence_kd_data(self.out / "sequence_kd" / "data", self.out / "sequence_kd" / "corpus" / "train",
                                self.result("teacher"), self.args.data_dir, source)

    def note(self, text: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}"
        print(line, file=sys.stderr, flush=True)
        with open(self.log, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    # ------------------------------------------------------------------ scoring
    def score(self, row: Row) -> Optional[dict]:
        """The row's test scores (and bytes on disk), or None while its run is not finished."""
        if not self.finished(row.run):
            return None
        from nmt_lightning.evaluation import read_lines, score
        from nmt_lightning.translation_file import export_checkpoint, load_exported
        from nmt_lightning.translate import translate_lines

        slug = file_slug(f"{row.run}_{row.export or 'as_trained'}")
        exported = self.out / "exports" / f"{slug}.safetensors"
        hypotheses = self.out / "hypotheses" / f"{slug}.cs"
        sources = read_lines(self.args.data_dir / "test.en")[: self.args.test_sentences]
        references = read_lines(self.args.data_dir / "test.cs")[: self.args.test_sentences]

        def compute() -> dict:
            if not exported.is_file():
                exported.parent.mkdir(parents=True, exist_ok=True)
                export_checkpoint(self.result(row.run), exported, row.export)
            if not hypotheses.is_file():
                self.note(f"translating the test split: {row.run} ({row.export or 'as trained'})")
                lines = translate_lines(load_exported(exported).to(self.translation_device()), sources, beam=4,
                                        progress=False)
                hypotheses.parent.mkdir(parents=True, exist_ok=True)
                hypotheses.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            found = score(read_lines(hypotheses), references)
            return {"bleu": found.bleu, "chrf": found.chrf, "bytes": exported.stat().st_size,
                    "translated_on": self.translation_device(),
                    "hypotheses": str(hypotheses.relative_to(self.out)), "step": checkpoint_step(self.result(row.run))}

        return cached(self.out / "scores" / f"{slug}.json", compute)

    def translation_device(self) -> str:
        """Where the test split is translated: the GPU when the study trains there, else the CPU."""
        import torch

        return "cuda" if self.args.accelerator in ("gpu", "auto") and torch.cuda.is_available() else "cpu"

    def paired(self, system: dict, baseline: dict) -> dict:
        """sacrebleu's paired bootstrap test of one seed's system row against its baseline row."""
        from nmt_lightning.evaluation import paired_comparison, read_lines

        references = read_lines(self.args.data_dir / "test.cs")[: self.args.test_sentences]
        key = file_slug(f"{system['hypotheses']}_vs_{baseline['hypotheses']}")
        return cached(self.out / "comparisons" / f"{key}.json", lambda: paired_comparison(
            read_lines(self.out / baseline["hypotheses"]), read_lines(self.out / system["hypotheses"]),
            references).as_dict())

    def speed(self, row: Row) -> Optional[dict]:
        """The row's CTranslate2 int8 speed as measured in the speed stage (None if not measured)."""
        path = self.out / "speed" / f"{file_slug(row.run)}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def measure_speed(self) -> None:
        """Each finished row's model converted to CTranslate2 int8 and timed in its own process
        (2 threads, beam 4, ``--speed-sentences`` test sentences), the models taking turns for
        ``--speed-rounds`` rounds; the median round per model is cached in OUT/speed."""
        try:
            from nmt_lightning.deploy import convert_to_ctranslate2, require_ctranslate2
            require_ctranslate2()
        except (ImportError, RuntimeError) as error:
            self.note(f"speed: CTranslate2 is not installed ({error}); no speed column")
            return
        models: dict[str, Path] = {}
        for run_name in sorted({row.run for row in self.plan.rows if self.finished(row.run)}):
            path = self.out / "speed" / f"{file_slug(run_name)}.json"
            if path.is_file():
                continue
            directory = self.out / "ctranslate2" / file_slug(run_name)
            try:
                if not (directory / "model.bin").is_file():
                    convert_to_ctranslate2(self.result(run_name), directory, "int8", force=True)
                models[run_name] = directory
            except Exception as error:  # noqa: BLE001 - the reason goes on the page
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"sentences_per_second": None, "reason": str(error).splitlines()[0]}))
        rounds: dict[str, list[float]] = {name: [] for name in models}
        for round_ in range(self.args.speed_rounds):
            for name, directory in list(models.items())[round_ % max(1, len(models)):] + \
                    list(models.items())[: round_ % max(1, len(models))]:
                command = [sys.executable, str(Path(__file__).with_name("study_speed.py")), str(directory),
                           str(self.args.data_dir / "test.en"), str(self.args.speed_sentences)]
                result = subprocess.run(command, check=True, capture_output=True, text=True)
                rounds[name].append(json.loads(result.stdout.strip().splitlines()[-1])["sentences_per_second"])
                self.note(f"speed round {round_ + 1}: {name}: {rounds[name][-1]:.1f} sentences/s")
        from statistics import median
        for name, values in rounds.items():
            path = self.out / "speed" / f"{file_slug(name)}.json"
            path.write_text(json.dumps({"sentences_per_second": median(values), "rounds": values,
                                        "sentences": self.args.speed_sentences, "threads": 2}))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="where every run is cached (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=Path("data/libreoffice_en_cs"), help="the prepared corpus (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained side by side, each on cores/jobs threads (default: %(default)s)")
    parser.add_argument("--only", choices=STAGES, help="one stage only")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "results.md", help="the page written (default: %(default)s)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md",
                        help="whose summary (between its study markers) is rewritten (default: %(default)s)")
    parser.add_argument("--test-sentences", type=int, default=None, help="score the first N test sentences (default: all)")
    parser.add_argument("--speed-sentences", type=int, default=500, help="test sentences per speed round (default: %(default)s)")
    parser.add_argument("--speed-rounds", type=int, default=3, help="speed rounds, models taking turns (default: %(default)s)")
    parser.add_argument("--accelerator", choices=["cpu", "gpu", "auto"], default=None,
                        help="where every run trains (default: the recipes' cpu); the page names it per reference")
    parser.add_argument("--smoke", type=int, default=0, help="every budget this many steps and a small model (a test)")
    parser.add_argument("--smoke-seeds", type=int, default=2, help="seeds of the headline rows with --smoke")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.smoke < 0 or args.smoke_seeds < 1:
        parser.error("--smoke must be >= 0 and --smoke-seeds >= 1")
    if not (args.data_dir / "prepare.json").is_file():
        parser.error(f"--data-dir: {args.data_dir} is not prepared; run "
                     f"nmt-lightning prepare --corpus libreoffice --src en --tgt cs --out {args.data_dir}")
    args.out, args.data_dir = args.out.resolve(), args.data_dir.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    study = Study(args)
    tables = {"references", "qat", "quant_noise", "distillation", "mobilebert", "lottery", "fast_students"}
    if args.only is None or args.only in tables:
        study.train_all({args.only} if args.only else tables)
    if args.only == "speed":
        study.measure_speed()
    if args.only in (None, "scores", "page", "speed") or args.only in tables:
        study_page.write(study, args)


if __name__ == "__main__":
    main()
