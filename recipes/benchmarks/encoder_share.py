"""How much of a CTranslate2 model's batched beam search the encoder takes.

    python recipes/benchmarks/encoder_share.py --out runs/encoder_share \\
        --model "teacher 6+6=runs/fast_students/efficiency/deployed/teacher_6_6.CTranslate2_float32" \\
        --model "student 6+2=runs/fast_students/efficiency/deployed/student_6_2.CTranslate2_int8"

A shallow decoder removes decoder time only: beam search runs the decoder once per output token
and the encoder once per sentence. For each CTranslate2 directory (as ``efficiency.py`` converts
them) this times what the throughput of ``efficiency.py`` times (``CTranslate2Model.translate_lines``
of the first ``--sentences`` test sentences: sorted by length, batches of 32, one batch per thread
on ``--threads`` threads, beam ``--beam``, tokenization included), whole and cut to one output
token (``max_output_tokens=1``: the encoder, plus one decoder step); the models take turns,
``--rounds`` rounds, medians. The encoder's share is the cut search's time over the whole
search's: an upper bound, as it also holds the first decoder step and the tokenization. No
shortlist. Writes ``--out``/encoder_share.md. Never time
anything while another job trains on the same machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficiency import THROUGHPUT_BATCH  # noqa: E402
from side_by_side import cpu_description, reproduce_line, write_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def search(model, lines: list[str], beam: int, one_token: bool) -> tuple[float, list[str]]:
    """(wall time, translations) of ``lines`` by the deployed translator, as efficiency.py's
    throughput translates them; ``one_token``: every search cut after one output token."""
    started = time.perf_counter()
    found = model.translate_lines(lines, beam=beam, batch_size=THROUGHPUT_BATCH, progress=False,
                                  max_output_tokens=1 if one_token else None)
    return time.perf_counter() - started, found


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/encoder_share")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data/libreoffice_en_cs")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIRECTORY",
                        help="a CTranslate2 directory written by nmt-lightning export; repeat")
    parser.add_argument("--sentences", type=int, default=500, help="test sentences (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="threads, one batch each (default: %(default)s)")
    parser.add_argument("--beam", type=int, default=4, help="beam size (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the models taking turns (default: %(default)s)")
    args = parser.parse_args(argv)
    from nmt_lightning.deploy import CTranslate2Model
    from nmt_lightning.evaluation import read_lines

    if not args.model:
        parser.error("give the models: --model NAME=DIRECTORY (a CTranslate2 directory)")
    if min(args.sentences, args.threads, args.beam, args.rounds) < 1:
        parser.error("--sentences, --threads, --beam and --rounds must be >= 1")
    directories = {}
    for item in args.model:
        name, _, directory = item.partition("=")
        if not name or not directory or not (Path(directory) / "model.bin").is_file():
            parser.error(f"--model {item}: give NAME=DIRECTORY of a CTranslate2 model (with model.bin)")
        directories[name] = directory
    if not (args.data_dir / "test.en").is_file():
        parser.error(f"--data-dir {args.data_dir}: not a prepared corpus (no test.en; run nmt-lightning prepare)")
    lines = read_lines(args.data_dir / "test.en")[: args.sentences]
    models = {name: CTranslate2Model(directory, threads=args.threads, shortlist=False)
              for name, directory in directories.items()}
    times: dict[str, dict[str, list[float]]] = {name: {"whole": [], "one token": []} for name in models}
    for name, model in models.items():  # warm-up
        search(model, lines[:THROUGHPUT_BATCH], args.beam, one_token=False)
    for round_index in range(args.rounds):
        names = list(models)[round_index % len(models):] + list(models)[: round_index % len(models)]
        for name in names:
            for kind in ("whole", "one token"):
                times[name][kind].append(search(models[name], lines, args.beam, kind == "one token")[0])
    header = ["model", "sentences/s, whole search", "sentences/s, one output token", "encoder share (at most)"]
    rows = []
    for name in models:
        whole, one = statistics.median(times[name]["whole"]), statistics.median(times[name]["one token"])
        rows.append([name, f"{len(lines) / whole:.1f}", f"{len(lines) / one:.1f}", f"{100 * one / whole:.0f}%"])
    args.out.mkdir(parents=True, exist_ok=True)
    text = write_table(args.out / "encoder_share.csv", header, rows)
    text += ["", f"The first {len(lines)} test sentences of {args.data_dir.name}, sorted by length, batches of "
                 f"{THROUGHPUT_BATCH}, one per thread on {args.threads} threads, beam {args.beam}, no shortlist; "
                 f"the median of {args.rounds} rounds, the models taking turns. Measured {time.strftime('%Y-%m-%d')} "
                 f"on {cpu_description()}.",
             "", reproduce_line("encoder_share.py", argv)]
    (args.out / "encoder_share.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    print("\n".join(text))


if __name__ == "__main__":
    main()
