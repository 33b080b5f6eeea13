"""What a vocabulary shortlist's size buys and costs: each model's CTranslate2 int8 deployment with
vocabulary maps of several sizes, against the same deployment without one, measured side by side.

    python recipes/benchmarks/shortlist_sweep.py --out runs/shortlist_sweep \\
        --model "teacher 6+6=runs/libreoffice_en_cs_teacher/checkpoints/last.ckpt" \\
        --model "student 6+2=runs/libreoffice_en_cs_student_6_2/checkpoints/last.ckpt" \\
        --setting 50:100 --setting 20:100 --setting 10:100 --setting 5:100

A setting ``BEST:FREQUENT`` is ``nmt-lightning shortlist --best BEST --frequent FREQUENT``: the
``BEST`` target pieces of each source piece by IBM Model 1's lexical probability, and the
``FREQUENT`` most frequent target pieces always. CTranslate2 restricts a batch's output layer to
the union of its sentences' candidates, so what a map leaves depends on the batch: the table gives
the mean number of target pieces a validation sentence and a batch of 32 allow.

For every model (a Lightning checkpoint) it converts the fp32 export to CTranslate2 int8 once
without a map and once with each setting's map, then measures as ``efficiency.py`` does (its
workers, each in a fresh process): BLEU and chrF2 of the whole test split (beam ``--beam``),
sacrebleu's paired bootstrap test of each map against no map, one-thread batch-1 latency and
``--threads``-thread throughput in batches of 32, ``--rounds`` rounds with every row taking turns.
A gain is the median over the rounds of the ratio of a row to its model's row without a map in the
same round. The issue's target for the shortlist is a throughput gain of at least 1.2x at no more
than 0.3 BLEU lost; the last column says whether a row meets both.

Everything is cached in ``--out`` (maps, conversions, translations, rounds): an interrupted run
continues. Writes ``--out``/shortlist_sweep.md, .csv, .json and .png (throughput gain against
the BLEU change, and against the pieces a batch allows). Never time anything while another job
trains on the same machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficiency import (Row, add_timing_options, check_timing_options, export_path, quality, speed_rounds,  # noqa: E402
                        translation_path)
from side_by_side import cached, cpu_description, file_slug, reproduce_line, write_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ENGINE = "CTranslate2 int8"
DEFAULT_SETTINGS = ("50:100", "20:100", "10:100", "5:100")
TARGET_GAIN, TARGET_LOSS = 1.2, 0.3  # the shortlist target: >= 1.2x throughput at <= 0.3 BLEU lost


def parse_setting(text: str) -> tuple[int, int]:
    """``BEST:FREQUENT`` -> (best >= 1, frequent >= 0); a ValueError names what is wrong."""
    best, colon, frequent = text.partition(":")
    try:
        setting = int(best), int(frequent)
    except ValueError:
        raise ValueError(f"--setting {text!r}: give BEST:FREQUENT, two integers (e.g. 10:100)") from None
    if not colon or setting[0] < 1 or setting[1] < 0:
        raise ValueError(f"--setting {text!r}: BEST must be >= 1 and FREQUENT >= 0 (e.g. 10:100)")
    return setting


def engine_name(setting: Optional[tuple[int, int]]) -> str:
    return ENGINE if setting is None else f"{ENGINE} + shortlist {setting[0]}/{setting[1]}"


def build_map(args: argparse.Namespace, setting: tuple[int, int]) -> tuple[Path, dict]:
    """(the map of ``setting``, how many target pieces it allows a validation sentence and batch), cached."""
    from nmt_lightning.shortlist import build_shortlist

    path = args.out / "maps" / f"best{setting[0]}_frequent{setting[1]}.txt"

    def compute() -> dict:
        report = build_shortlist(args.data_dir, path, best=setting[0], frequent=setting[1], progress=True)
        return {"sentence": report.mean_candidates, "batch": report.mean_batch_candidates}

    return path, cached(path.with_suffix(".json"), compute)


def deployed_rows(args: argparse.Namespace, models: dict[str, Path], maps: dict[tuple[int, int], Path]) -> list[Row]:
    """Each model's CTranslate2 int8 conversion without a map, then with each map (cached in ``--out``/deployed)."""
    from nmt_lightning.deploy import convert_to_ctranslate2
    from nmt_lightning.translation_file import export_checkpoint

    rows = []
    for model, checkpoint in models.items():
        exported = export_path(args, model, None)
        if not exported.is_file():
            exported.parent.mkdir(parents=True, exist_ok=True)
            export_checkpoint(checkpoint, exported, None)
        for setting in [None, *maps]:
            vocabulary_map = None if setting is None else maps[setting]
            directory = args.out / "deployed" / f"{file_slug(model)}.{file_slug(engine_name(setting))}"
            if not (directory / "model.bin").is_file():
                convert_to_ctranslate2(exported, directory, "int8", force=True, vocabulary_map=vocabulary_map)
            rows.append(Row(model, engine_name(setting), directory, vocabulary_map))
    return rows


def paired_test(args: argparse.Namespace, baseline: Row, system: Row) -> dict:
    """sacrebleu's paired bootstrap test of ``system``'s test translation against ``baseline``'s (cached)."""
    from nmt_lightning.evaluation import paired_comparison, read_lines

    def translation(row: Row) -> list[str]:
        return read_lines(translation_path(args.out, row.name))

    return cached(args.out / "paired" / f"{file_slug(system.name)}.json", lambda: paired_comparison(
        translation(baseline), translation(system), read_lines(args.data_dir / "test.cs")).as_dict())


def target_vocabulary(data_dir: Path) -> int:
    """The target pieces of the prepared corpus: what an output layer without a shortlist computes."""
    from nmt_lightning.data import TranslationDataModule

    return TranslationDataModule(str(data_dir)).tgt_vocab_size


def plot(path: Path, table: list[dict], vocabulary: int) -> None:
    """Throughput gain against the BLEU change and against the pieces a batch allows (no map: the whole
    vocabulary), a line per model through its settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for model in dict.fromkeys(entry["model"] for entry in table):
        entries = [entry for entry in table if entry["model"] == model]
        for axis, x in zip(axes, ("bleu_change", "batch_pieces")):
            xs = [vocabulary if e[x] is None else e[x] for e in entries]
            line = axis.plot(xs, [e["throughput_gain"] for e in entries], marker="o", label=model)[0]
            for entry, at in zip(entries, xs):
                axis.annotate(entry["shortlist"], (at, entry["throughput_gain"]), fontsize=6,
                              xytext=(3, 2), textcoords="offset points", color=line.get_color())
    axes[0].axvline(-TARGET_LOSS, color="grey", linestyle="--", linewidth=0.8)
    axes[0].set_xlabel("BLEU change against no shortlist (test split)")
    axes[1].set_xlabel("target pieces a batch of 32 allows (validation split, mean)")
    axes[1].set_xscale("log")
    for axis in axes:
        axis.axhline(TARGET_GAIN, color="grey", linestyle="--", linewidth=0.8)
        axis.set_ylabel(f"throughput gain over {ENGINE} without a shortlist")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/shortlist_sweep")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data/libreoffice_en_cs",
                        help="a prepared corpus: the maps' training pairs, the validation and test splits")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="a model to measure (a Lightning checkpoint); repeat")
    parser.add_argument("--setting", action="append", default=[], metavar="BEST:FREQUENT",
                        help=f"a map's candidates per source piece and always-allowed pieces; repeat "
                             f"(default: {' '.join(DEFAULT_SETTINGS)})")
    add_timing_options(parser)
    args = parser.parse_args(argv)
    try:
        settings = [parse_setting(text) for text in args.setting or DEFAULT_SETTINGS]
    except ValueError as error:
        parser.error(str(error))
    if len(set(settings)) != len(settings):
        parser.error("--setting: a setting is given twice")
    check_timing_options(parser, args)
    models = {}
    for item in args.model:
        name, _, path = item.partition("=")
        if not name or not path or not Path(path).is_file():
            parser.error(f"--model {item}: give NAME=PATH of an existing checkpoint")
        if name in models:
            parser.error(f"--model {name}: a name is given twice")
        models[name] = Path(path).resolve()
    if not models:
        parser.error("give the models to measure: --model NAME=PATH")
    if not (args.data_dir / "test.en").is_file():
        parser.error(f"--data-dir {args.data_dir}: no test.en (prepare the corpus first: nmt-lightning prepare)")
    args.out.mkdir(parents=True, exist_ok=True)
    # What --out was built from: its maps, conversions and translations are cached by name.
    record, given = args.out / "sweep.json", {"data_dir": str(args.data_dir.resolve()),
                                              "models": {name: str(path) for name, path in models.items()}}
    built = json.loads(record.read_text()) if record.is_file() else {"data_dir": given["data_dir"], "models": {}}
    if built["data_dir"] != given["data_dir"]:
        parser.error(f"--data-dir {args.data_dir}: {args.out} holds maps of {built['data_dir']}; give another --out")
    for name, path in given["models"].items():
        if built["models"].get(name, path) != path:
            parser.error(f"--model {name}: {args.out} holds the model {built['models'][name]} under that name; "
                         f"give it another name or another --out")
    built["models"].update(given["models"])
    record.write_text(json.dumps(built, indent=1))

    maps, allowed = {}, {}
    for setting in settings:
        maps[setting], allowed[setting] = build_map(args, setting)
    rows = deployed_rows(args, models, maps)
    scores = {row.name: quality(args, row) for row in rows}
    speeds = speed_rounds(args, rows)

    def gain(row: Row, baseline: Row, value) -> float:  # median over rounds of value(row) / value(baseline)
        return statistics.median(value(a) / value(b) for a, b in zip(speeds[row.name], speeds[baseline.name]))

    def median_ms(measured: dict) -> float:
        return statistics.median(measured["milliseconds"])

    table = []
    for model in models:
        baseline = next(row for row in rows if row.model == model and row.vocabulary_map is None)
        for row, setting in zip([r for r in rows if r.model == model], [None, *settings]):
            found = scores[row.name]
            entry = {"model": model, "shortlist": "none" if setting is None else f"{setting[0]}/{setting[1]}",
                     "sentence_pieces": None if setting is None else allowed[setting]["sentence"],
                     "batch_pieces": None if setting is None else allowed[setting]["batch"],
                     "bleu": found["bleu"], "chrf": found["chrf"],
                     "bleu_change": found["bleu"] - scores[baseline.name]["bleu"],
                     "p_value": None if setting is None else paired_test(args, baseline, row)["bleu_p_value"],
                     "sentences_per_second": statistics.median(r["sentences_per_second"] for r in speeds[row.name]),
                     "throughput_gain": gain(row, baseline, lambda r: r["sentences_per_second"]),
                     "latency_median_ms": statistics.median(median_ms(r) for r in speeds[row.name]),
                     "latency_gain": gain(row, baseline, lambda r: 1 / median_ms(r))}
            entry["meets_target"] = (setting is not None and entry["throughput_gain"] >= TARGET_GAIN
                                     and entry["bleu_change"] >= -TARGET_LOSS)
            table.append(entry)
    header = ["model", "shortlist (best/frequent)", "target pieces a sentence / a batch of 32 allows", "BLEU", "chrF2",
              "BLEU change", "p-value", "sentences/s", "throughput gain", "latency median (ms)", "latency gain",
              f">= {TARGET_GAIN}x at <= {TARGET_LOSS} BLEU lost"]
    text_rows = [[e["model"], e["shortlist"],
                  "all" if e["batch_pieces"] is None else f"{e['sentence_pieces']:.0f} / {e['batch_pieces']:.0f}",
                  f"{e['bleu']:.2f}", f"{e['chrf']:.2f}", f"{e['bleu_change']:+.2f}",
                  "" if e["p_value"] is None else f"{e['p_value']:.4f}", f"{e['sentences_per_second']:.1f}",
                  f"{e['throughput_gain']:.2f}x", f"{e['latency_median_ms']:.1f}", f"{e['latency_gain']:.2f}x",
                  "" if e["shortlist"] == "none" else ("yes" if e["meets_target"] else "no")] for e in table]
    lines = write_table(args.out / "shortlist_sweep.csv", header, text_rows)
    lines += ["", f"{ENGINE} (CTranslate2 {version('ctranslate2')}), test split of {args.data_dir.name}, beam "
                  f"{args.beam}. Gains are to the same model's {ENGINE} without a shortlist, medians of the "
                  f"per-round ratios. Latency: 1 thread, one sentence at a time, the first {args.latency_sentences} "
                  f"test sentences. Throughput: {args.threads} threads, batches of 32, the first {args.sentences} "
                  f"sentences. {args.rounds} rounds, the rows taking turns. p-value: sacrebleu's paired bootstrap "
                  f"test of the BLEU change. Target pieces allowed: the means over the validation split's sentences "
                  f"and over its batches of 32 sentences of similar length (CTranslate2 takes a batch's union), of "
                  f"{target_vocabulary(args.data_dir):,} pieces. Measured {time.strftime('%Y-%m-%d')} on {cpu_description()}.",
              "", reproduce_line("shortlist_sweep.py", argv)]
    (args.out / "shortlist_sweep.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (args.out / "shortlist_sweep.json").write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    plot(args.out / "shortlist_sweep.png", table, target_vocabulary(args.data_dir))
    print("\n".join(lines))


def version(package: str) -> str:
    from importlib.metadata import version as installed

    return installed(package)


if __name__ == "__main__":
    main()
