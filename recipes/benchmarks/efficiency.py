"""Fast CPU models measured as the WMT efficiency task does: quality, bytes, latency, throughput, memory.

    python recipes/benchmarks/efficiency.py --out runs/efficiency \\
        --model teacher=runs/study/runs/teacher/runs/converged/checkpoints/last.ckpt \\
        --model "student 6+2=runs/libreoffice_en_cs_student_6_2/checkpoints/last.ckpt"

For every model (a Lightning checkpoint; the first is the reference) and every engine:

- ``ours fp32`` / ``ours int8``: our decoder on the export as trained, and with post-training
  int8 (a QAT-trained model: its trained grid); ``ours fp32 + shortlist``: the fp32 export
  computing only the shortlist's logits;
- ``CTranslate2 float32`` / ``CTranslate2 int8`` and ``CTranslate2 int8 + shortlist`` (the
  vocabulary map of ``nmt-lightning shortlist --best --frequent`` with ``--shortlist-best`` and
  ``--shortlist-frequent``, built once from ``--data-dir``; another setting needs another ``--out``);

it measures, each in a fresh process (torch and CTranslate2 each bring their own OpenMP and MKL):

1. quality: BLEU and chrF2 of the whole test split, beam ``--beam`` (cached translations);
2. bytes on disk of what is deployed (the export file, the CTranslate2 directory);
3. latency: one thread, one sentence at a time, the first ``--latency-sentences`` test
   sentences; median and 90th percentile milliseconds per sentence;
4. throughput: ``--threads`` threads (our decoder: torch's threads; CTranslate2: one batch per
   thread), batches of 32, sentences/s over the first ``--sentences`` sentences;
5. peak memory: the worker's maximum resident set size;
6. exactness: each model's ``CTranslate2 float32`` conversion and our fp32 export decode the
   whole test split greedily; the identical translations are counted (``--out``/greedy).

Latency and throughput are measured in ``--rounds`` rounds, the models taking turns in an order
that rotates each round; a value is the median round, a ratio the median of the rounds' ratios.

Every ratio is to the reference's ``CTranslate2 float32`` row, from the same run. Every result
is cached in ``--out``: an interrupted run continues where it stopped. Writes
``--out``/efficiency.md, .csv and efficiency.png (BLEU against latency and against bytes).
``--quality-only`` measures only steps 1 and 2 (``--out``/quality.md), e.g. for a model's other
seeds, whose speed is the first seed's.
Never time anything while another job trains on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from side_by_side import cached, cpu_description, file_slug, reproduce_line, write_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ("ours fp32", "ours fp32 + shortlist", "ours int8", "CTranslate2 float32", "CTranslate2 int8",
           "CTranslate2 int8 + shortlist")
REFERENCE_ENGINE = "CTranslate2 float32"
THROUGHPUT_BATCH = 32  # sentences a batch of the throughput (latency: one)


@dataclass(frozen=True)
class Row:
    model: str
    engine: str
    path: Path  # what the worker loads: an export file or a CTranslate2 directory
    vocabulary_map: Optional[Path] = None  # the shortlist it translates with (CTranslate2: stored with the model)

    @property
    def name(self) -> str:
        return f"{self.model}, {self.engine}"

    @property
    def kind(self) -> str:
        return "ctranslate2" if self.engine.startswith("CTranslate2") else "ours"


def bytes_on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else path.stat().st_size


def export_path(args: argparse.Namespace, model: str, quantize: Optional[str]) -> Path:
    """Where ``model``'s export as trained (``quantize`` None) or post-training int8 is deployed."""
    return args.out / "deployed" / f"{file_slug(model)}.{quantize or 'trained'}.safetensors"


def deployed_rows(args: argparse.Namespace, models: dict[str, Path]) -> list[Row]:
    """Export and convert every model for each of ``--engines`` (cached in ``--out``/deployed)."""
    from nmt_lightning.deploy import convert_to_ctranslate2
    from nmt_lightning.shortlist import DEFAULT_BEST, DEFAULT_FREQUENT, build_shortlist
    from nmt_lightning.translation_file import export_checkpoint

    deployed = args.out / "deployed"
    deployed.mkdir(parents=True, exist_ok=True)
    vocabulary_map = deployed / "vmap.txt"
    if any("shortlist" in engine for engine in args.engines):
        # The map's settings are recorded beside it: the cached shortlist rows were measured with it.
        settings, record = {"best": args.shortlist_best, "frequent": args.shortlist_frequent}, deployed / "vmap.json"
        if vocabulary_map.is_file():
            # a map written before its record was built with the defaults
            built = json.loads(record.read_text()) if record.is_file() else {"best": DEFAULT_BEST,
                                                                              "frequent": DEFAULT_FREQUENT}
            if built != settings:
                sys.exit(f"{vocabulary_map}: built with --shortlist-best {built['best']} --shortlist-frequent "
                         f"{built['frequent']}, and its rows measured with it; give another --out for other settings")
        else:
            record.write_text(json.dumps(settings) + "\n", encoding="utf-8")
            build_shortlist(args.data_dir, vocabulary_map, best=args.shortlist_best, frequent=args.shortlist_frequent,
                            progress=True)
    rows = []
    for model, path in models.items():
        slug = file_slug(model)
        exports = {}
        for engine, quantize in (("ours fp32", None), ("ours int8", "int8")):
            exports[engine] = export_path(args, model, quantize)
            needed = engine in args.engines or engine == "ours fp32"  # every conversion starts from the fp32 export
            if needed and not exports[engine].is_file():
                export_checkpoint(path, exports[engine], quantize)
            rows.append(Row(model, engine, exports[engine]))
        rows.append(Row(model, "ours fp32 + shortlist", exports["ours fp32"], vocabulary_map))
        for engine, quantization, vmap in (("CTranslate2 float32", "float32", None), ("CTranslate2 int8", "int8", None),
                                           ("CTranslate2 int8 + shortlist", "int8", vocabulary_map)):
            directory = deployed / f"{slug}.{file_slug(engine)}"
            if engine in args.engines and not (directory / "model.bin").is_file():
                convert_to_ctranslate2(exports["ours fp32"], directory, quantization, force=True, vocabulary_map=vmap)
            rows.append(Row(model, engine, directory, vmap))
    return [row for row in rows if row.engine in args.engines]


def run_worker(row: Row, mode: str, input_path: Path, output: Path, threads: int, beam: int) -> dict:
    """Translate ``input_path`` in a fresh process; its JSON report (seconds, per-sentence times, memory)."""
    return worker_report(Path(__file__), row, mode, input_path, threads, beam, ["--output", str(output)])


def worker_report(script: Path, row: Row, mode: str, input_path: Path, threads: int, beam: int,
                  extra: list[str]) -> dict:
    """Run ``script worker`` on ``row`` in a fresh process with ``threads`` threads (its options from
    ``add_worker_options``, and ``extra``); the JSON report it prints last."""
    command = [sys.executable, str(script), "worker", "--kind", row.kind, "--path", str(row.path), "--mode", mode,
               "--input", str(input_path), "--threads", str(threads), "--beam", str(beam), *extra]
    if row.vocabulary_map is not None:
        command += ["--shortlist", "--vocabulary-map", str(row.vocabulary_map)]
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads))
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=environment)
    if result.returncode != 0:
        raise RuntimeError(f"{row.name}: the worker failed (its error is above)")
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_resident_bytes() -> int:
    """This process's own peak resident set. Linux: VmHWM, the high-water mark of the memory map
    that exec created. Not getrusage's ru_maxrss: Linux carries it over an exec, so a worker
    started by a large parent would report the parent's peak (seen: every row the driver's 2.7 GB)."""
    try:
        status = Path("/proc/self/status").read_text(encoding="utf-8")
    except OSError:  # not Linux: ru_maxrss is this process's own (bytes on macOS, kilobytes elsewhere)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))


def worker(args: argparse.Namespace) -> None:
    """Load one model, warm it up, translate the input as asked, print a JSON report."""
    import torch

    from nmt_lightning.evaluation import read_lines

    torch.set_num_threads(args.threads)
    lines = read_lines(args.input)
    if args.kind == "ctranslate2":
        from nmt_lightning.deploy import CTranslate2Model

        model = CTranslate2Model(args.path, threads=args.threads, shortlist=args.shortlist)

        def translate(batch: list[str], batch_size: int) -> list[str]:
            return model.translate_lines(batch, beam=args.beam, batch_size=batch_size, progress=False)
    else:
        from nmt_lightning.loading import load_for_translation
        from nmt_lightning.shortlist import Shortlist
        from nmt_lightning.translate import translate_lines

        module = load_for_translation(args.path, "cpu")  # an export file: no Lightning import in the worker
        shortlist = Shortlist.read(args.vocabulary_map, module.tokenization) if args.shortlist else None

        def translate(batch: list[str], batch_size: int) -> list[str]:
            return translate_lines(module, batch, beam=args.beam, batch_size=batch_size, progress=False,
                                   shortlist=shortlist)
    batch_size = 1 if args.mode == "latency" else THROUGHPUT_BATCH
    translate(lines[:batch_size * 2], batch_size)  # warm-up: lazy initialisation is not timed
    report: dict = {}
    if args.mode == "latency":
        times, translations = [], []
        for line in lines:
            started = time.perf_counter()
            translations += translate([line], 1)
            times.append(time.perf_counter() - started)
        report["milliseconds"] = [1000 * t for t in times]
    else:
        started = time.perf_counter()
        translations = translate(lines, batch_size)
        report["seconds"] = time.perf_counter() - started
    report["peak_rss_bytes"] = peak_resident_bytes()
    Path(args.output).write_text("".join(line + "\n" for line in translations), encoding="utf-8")
    print(json.dumps(report))


def sentences_file(args: argparse.Namespace, count: Optional[int], name: str) -> Path:
    lines = (args.data_dir / "test.en").read_text(encoding="utf-8").splitlines()
    path = args.out / f"{name}.en"
    path.write_text("".join(line + "\n" for line in lines[:count]), encoding="utf-8")
    return path


def translation_path(out: Path, row_name: str) -> Path:
    """Where ``quality`` writes the translation of the whole test split by the row named ``row_name``
    (``Row.name``: "MODEL, ENGINE") of a run writing into ``out``."""
    return out / "translations" / f"{file_slug(row_name)}.cs"


def quality(args: argparse.Namespace, row: Row) -> dict:
    """BLEU and chrF2 of the whole test split (cached)."""
    from nmt_lightning.evaluation import read_lines, score

    def compute() -> dict:
        hypotheses = translation_path(args.out, row.name)
        hypotheses.parent.mkdir(parents=True, exist_ok=True)
        print(f"translating the test split: {row.name}", file=sys.stderr, flush=True)
        run_worker(row, "throughput", sentences_file(args, None, "test"), hypotheses, args.threads, args.beam)
        found = score(read_lines(hypotheses), read_lines(args.data_dir / "test.cs"))
        return {"bleu": found.bleu, "chrf": found.chrf}

    return cached(args.out / "quality" / f"{file_slug(row.name)}.json", compute)


def greedy_agreement(args: argparse.Namespace, rows: list[Row]) -> dict[str, dict]:
    """Model -> how its ``CTranslate2 float32`` conversion decodes against our decoder: both
    translate the whole test split greedily (beam 1, where a difference cannot hide in the beam)
    and the identical translations are counted (cached). The conversion holds the same matrices,
    so only float rounding at a near-tie of two tokens may pick another word."""
    from nmt_lightning.evaluation import read_lines

    test = sentences_file(args, None, "test")
    found = {}
    for row in rows:
        if row.engine != "CTranslate2 float32":
            continue
        ours = Row(row.model, "ours fp32", export_path(args, row.model, None))  # always exported

        def compute(ours: Row = ours, converted: Row = row) -> dict:  # bound now: called at once by cached
            translated = []
            for side in (ours, converted):
                path = args.out / "greedy" / f"{file_slug(side.name)}.cs"
                path.parent.mkdir(parents=True, exist_ok=True)
                print(f"translating the test split greedily: {side.name}", file=sys.stderr, flush=True)
                run_worker(side, "throughput", test, path, args.threads, 1)
                translated.append(read_lines(path))
            return {"identical": sum(a == b for a, b in zip(*translated)), "sentences": len(translated[0])}

        found[row.model] = cached(args.out / "greedy" / f"{file_slug(row.model)}.json", compute)
    return found


def speed_rounds(args: argparse.Namespace, rows: list[Row],
                 measure: Optional[Callable[[Row], dict]] = None) -> dict[str, list[dict]]:
    """Every row's latency (milliseconds per sentence) and throughput (sentences/s, peak memory)
    in each of ``--rounds`` rounds, the rows taking turns in an order that rotates each round, so
    every ratio compares rows measured side by side. A round is cached once every row has run in
    it; a round cut short is measured again whole. ``measure(row)``: one row's
    {"milliseconds": [...], "sentences_per_second": ...} (default: translating the test split's
    first sentences in fresh worker processes, with the peak memory)."""
    path = args.out / "speed_rounds.json"
    settings = [args.threads, args.sentences, args.latency_sentences, args.beam, sorted(row.name for row in rows)]
    rounds: list[dict] = json.loads(path.read_text()) if path.is_file() else []
    rounds = [r for r in rounds if r.get("settings") == settings]
    if measure is None:
        latency_input = sentences_file(args, args.latency_sentences, "latency")
        throughput_input = sentences_file(args, args.sentences, "throughput")
        count = len(throughput_input.read_text(encoding="utf-8").splitlines())

        def measure(row: Row) -> dict:
            latency = run_worker(row, "latency", latency_input, args.out / "latency_output.cs", 1, args.beam)
            throughput = run_worker(row, "throughput", throughput_input, args.out / "throughput_output.cs",
                                    args.threads, args.beam)
            return {"milliseconds": latency["milliseconds"], "sentences_per_second": count / throughput["seconds"],
                    "peak_rss_bytes": max(latency["peak_rss_bytes"], throughput["peak_rss_bytes"])}
    while len(rounds) < args.rounds:
        index, measured = len(rounds), {"settings": settings}
        shift = index % len(rows)
        for row in rows[shift:] + rows[:shift]:
            measured[row.name] = found = measure(row)
            print(f"round {index + 1}: {row.name}: {statistics.median(found['milliseconds']):.1f} ms a sentence, "
                  f"{found['sentences_per_second']:.1f} sentences/s", file=sys.stderr, flush=True)
        rounds.append(measured)
        path.write_text(json.dumps(rounds, indent=1))
    return {row.name: [r[row.name] for r in rounds[: args.rounds]] for row in rows}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def plot(path: Path, table: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for entry in table:
        for axis, x in zip(axes, ("latency_median_ms", "bytes")):
            axis.scatter(entry[x], entry["bleu"], s=18)
            axis.annotate(entry["name"], (entry[x], entry["bleu"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    axes[0].set_xlabel("median latency, 1 thread, batch 1 (ms per sentence)")
    axes[1].set_xlabel("bytes on disk")
    for axis in axes:
        axis.set_xscale("log")
        axis.set_ylabel("BLEU (test split)")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def write_quality_table(args: argparse.Namespace, rows: list[Row]) -> None:
    """``--quality-only``: every row's BLEU, chrF2 and bytes to ``--out``/quality.md and .csv."""
    table = [[row.model, row.engine, f"{found['bleu']:.2f}", f"{found['chrf']:.2f}", f"{bytes_on_disk(row.path):,}"]
             for row in rows for found in [quality(args, row)]]
    lines = write_table(args.out / "quality.csv", ["model", "engine", "BLEU", "chrF2", "bytes on disk"], table)
    lines += ["", f"Test split of {args.data_dir.name}, beam {args.beam}; translations in {args.out / 'translations'}."]
    (args.out / "quality.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def add_timing_options(parser: argparse.ArgumentParser) -> None:
    """The beam, threads, sentences and rounds of the quality, latency and throughput runs
    (shortlist_sweep.py takes these alone)."""
    parser.add_argument("--beam", type=int, default=4, help="beam size (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="threads of the throughput runs (default: %(default)s)")
    parser.add_argument("--sentences", type=int, default=500, help="test sentences per throughput round (default: %(default)s)")
    parser.add_argument("--latency-sentences", type=int, default=200,
                        help="test sentences translated one at a time (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (default: %(default)s)")


def check_timing_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a beam, thread count, sentence count or number of rounds below 1, naming them."""
    if min(args.beam, args.threads, args.sentences, args.latency_sentences, args.rounds) < 1:
        parser.error("--beam, --threads, --sentences, --latency-sentences and --rounds must be >= 1")


def add_measurement_options(parser: argparse.ArgumentParser) -> None:
    """The engines, the timing options and the shortlist settings (shape_speed.py takes them too)."""
    from nmt_lightning.shortlist import DEFAULT_BEST, DEFAULT_FREQUENT

    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    add_timing_options(parser)
    parser.add_argument("--shortlist-best", type=int, default=DEFAULT_BEST,
                        help="the shortlist's candidates per source piece ('nmt-lightning shortlist --best'; "
                             "default: %(default)s)")
    parser.add_argument("--shortlist-frequent", type=int, default=DEFAULT_FREQUENT,
                        help="target pieces the shortlist always allows ('--frequent'; default: %(default)s)")


def add_worker_options(parser: argparse.ArgumentParser, *extra: str) -> None:
    """The hidden options a worker process is started with (``run_worker``), and ``extra`` ones."""
    for option in ("--kind", "--path", "--input", "--vocabulary-map", *extra):
        parser.add_argument(option, help=argparse.SUPPRESS)
    parser.add_argument("--mode", dest="worker_mode", help=argparse.SUPPRESS)
    parser.add_argument("--shortlist", action="store_true", help=argparse.SUPPRESS)


def check_measurement_options(parser: argparse.ArgumentParser, args: argparse.Namespace, ratios: bool = True) -> None:
    """Refuse impossible measurement settings, naming them (``ratios``: the reference engine is needed)."""
    if ratios and REFERENCE_ENGINE not in args.engines:
        parser.error(f"--engines must include '{REFERENCE_ENGINE}': every ratio is to the reference's")
    check_timing_options(parser, args)
    if args.shortlist_best < 1:
        parser.error(f"--shortlist-best must be >= 1, got {args.shortlist_best}")
    if args.shortlist_frequent < 0:
        parser.error(f"--shortlist-frequent must be >= 0, got {args.shortlist_frequent}")


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="benchmark", choices=["benchmark", "worker"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/efficiency")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data/libreoffice_en_cs")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="a model to measure (a Lightning checkpoint); repeat; the first is the reference")
    add_measurement_options(parser)
    parser.add_argument("--quality-only", action="store_true",
                        help="only BLEU, chrF2 and bytes (no timing; --out/quality.md): e.g. the other seeds of a model")
    add_worker_options(parser, "--output")
    args = parser.parse_args(argv)
    if args.mode == "worker":
        args.mode = args.worker_mode
        worker(args)
        return
    if not args.model:
        parser.error("give the models to measure: --model NAME=PATH (the first is the reference)")
    models = {}
    for item in args.model:
        name, _, path = item.partition("=")
        if not name or not path or not Path(path).is_file():
            parser.error(f"--model {item}: give NAME=PATH of an existing checkpoint")
        models[name] = Path(path).resolve()
    check_measurement_options(parser, args, ratios=not args.quality_only)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = deployed_rows(args, models)
    if args.quality_only:
        write_quality_table(args, rows)
        return
    agreement = greedy_agreement(args, rows)  # before the timing: it translates, nothing is timed
    speeds = speed_rounds(args, rows)
    reference_name = Row(next(iter(models)), REFERENCE_ENGINE, Path()).name
    reference_rounds = speeds[reference_name]

    def per_round_ratio(row: Row, value) -> float:
        """The median over rounds of ``value(reference round) / value(row's round)``: both measured
        in the same round, so a slow round slows both."""
        return statistics.median(value(b) / value(a) for a, b in zip(speeds[row.name], reference_rounds))

    def median_ms(measured: dict) -> float:
        return statistics.median(measured["milliseconds"])

    table, rows_text = [], []
    for row in rows:
        found, rounds = quality(args, row), speeds[row.name]
        every_sentence = [ms for r in rounds for ms in r["milliseconds"]]
        table.append({"name": row.name, "bytes": bytes_on_disk(row.path), **found,
                      "latency_median_ms": statistics.median(median_ms(r) for r in rounds),
                      "latency_p90_ms": percentile(every_sentence, 0.9),
                      "latency_gain": per_round_ratio(row, median_ms),
                      "sentences_per_second": statistics.median(r["sentences_per_second"] for r in rounds),
                      "throughput_ratio": per_round_ratio(row, lambda r: 1 / r["sentences_per_second"]),
                      "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rounds)})
    reference = next(entry for entry in table if entry["name"] == reference_name)
    for row, entry in zip(rows, table):
        rows_text.append([row.model, row.engine, f"{entry['bleu']:.2f}", f"{entry['chrf']:.2f}",
                          f"{100 * entry['bleu'] / reference['bleu']:.1f}%" if reference["bleu"] else "n/a",
                          f"{entry['bytes']:,}", f"{entry['latency_median_ms']:.1f}", f"{entry['latency_p90_ms']:.1f}",
                          f"{entry['latency_gain']:.2f}x", f"{entry['sentences_per_second']:.1f}",
                          f"{entry['throughput_ratio']:.2f}x", f"{entry['peak_rss_bytes'] / 2 ** 20:.0f}"])
    header = ["model", "engine", "BLEU", "chrF2", "% of reference BLEU", "bytes on disk", "latency median (ms)",
              "latency p90 (ms)", "latency gain", "sentences/s", "throughput vs reference", "peak memory (MiB)"]
    lines = write_table(args.out / "efficiency.csv", header, rows_text)
    lines += ["", f"Reference: {reference_name}. Test split of {args.data_dir.name}, beam {args.beam}. Latency: 1 thread, "
                  f"one sentence at a time, the first {args.latency_sentences} test sentences, the median of the "
                  f"rounds' medians (p90: over every sentence of every round). Throughput: {args.threads} threads, "
                  f"batches of {THROUGHPUT_BATCH}, the first {args.sentences} sentences, the median round. "
                  f"{args.rounds} rounds, the models taking turns; ratios are medians of per-round ratios. Peak memory: the worker process's "
                  f"maximum resident set. Measured {time.strftime('%Y-%m-%d')} on {cpu_description()}."
              + (f" Shortlist: the {args.shortlist_best} best target pieces of each source piece and the "
                 f"{args.shortlist_frequent} most frequent (nmt-lightning shortlist)."
                 if any("shortlist" in row.engine for row in rows) else ""),
              "", "Greedy decoding of the whole test split, CTranslate2 float32 against ours fp32 (the conversion's "
                  "exactness), identical translations: " + "; ".join(
                      f"{model} {found['identical']}/{found['sentences']}" for model, found in agreement.items()) + ".",
              "", reproduce_line("efficiency.py", argv)]
    (args.out / "efficiency.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (args.out / "efficiency.json").write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    plot(args.out / "efficiency.png", table)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
