"""Fast CPU models from a base you have: structured pruning against its control, the shallow-decoder
students of a teacher, all measured by ``efficiency.py``.

    python recipes/benchmarks/fast_students.py --out runs/fast_students \\
        [--base runs/libreoffice_en_cs_tiny/checkpoints/last.ckpt] \\
        [--teacher runs/libreoffice_en_cs_teacher/checkpoints/last.ckpt] [--seeds 1 2 3]

The compression study (``study.py``) measures the same rows from its converged references;
this driver measures them from any trained base and teacher, for a first look before the
references exist or on another corpus. It trains, each run cached and resumed after an
interruption (``side_by_side.run_fit``), ``--jobs`` side by side, for each of ``--seeds``:

- with ``--base``: ``control``, the base fine-tuned ``--steps`` steps in fp32 (``finetune.yaml``):
  the unpruned model of the same budget; ``structured``: the same from the same checkpoint, the
  same steps and seed, with ``StructuredPruning`` removing half of the heads and feed-forward
  neurons of every layer on the study's schedule (every tenth of the steps from the first tenth
  to seven tenths, then recovery);
- with ``--distill``: ``structured`` with word-level KD from the base alongside (the model being
  pruned learns from itself unpruned);
- with ``--teacher``: the 6+2 and 6+1 students (``--students``: the teacher's whole encoder and
  its decoder layers [2, 5] or [5], word-level KD), ``--student-steps`` steps each; with
  ``--encoder-layers E`` the E+2 and E+1 students instead, their encoder from E of the teacher's
  layers spread evenly up to its top one (``student_E_N``);
- with ``--prune-students``: each student again, the same start, KD, steps and seed, with
  ``StructuredPruning`` removing half of its heads and neurons on the same schedule (tested
  against the teacher and against the unpruned student); ``--decoder-prune F`` removes ``F`` of
  the decoder's instead, where beam search spends most of its time, and ``--encoder-prune F``
  ``F`` of the encoder's (each part half otherwise; two callbacks; runs
  ``student_6_N_pruned_encoderPP``, ``..._decoderPP`` or both);
- with ``--pruned-only`` (and ``--prune-students``): only the pruned students, tested against the
  teacher, when the unpruned students' runs are not needed (a second pruning fraction, say);
- with ``--sequence-kd``: the students (pruned or not) train on sequence-level KD data (Kim & Rush
  2016: the teacher's beam-4 translations of the training source, built once into
  ``--out``/sequence_kd, with the corpus' BPE and its valid and test splits), word-level KD from
  the teacher alongside as before; their runs are ``student_6_N_seqkd...``. Their fine-tunes, like
  the teacher's, train on the corpus' own references;
- with ``--finetune-steps N``: the teacher and each student go on ``N`` steps with the
  fine-tuning recipe (``finetune.yaml``: lr 0.001 after 100 warm-up steps, cross-entropy only).
  The inverse square root schedule never anneals, so such a low-rate phase adds BLEU to a model
  that stopped mid-schedule; every side gets the same phase, and the fine-tuned teacher becomes
  the reference of the efficiency table (``teacher_ft`` against ``student_6_N_ft``). A pruned
  student keeps its structure through it (``StructuredPruning(masks_from=...)``: its removed
  heads and neurons stay removed, nothing more is pruned) and is tested against the fine-tuned
  unpruned student (``student_6_N_pruned_ft`` against ``student_6_N_ft``).

A run of seed 1 is named as above, of another seed ``<name>_s<seed>``. Then
``efficiency.py`` measures the first seed's models on every engine into ``--out``/efficiency
(the first model, the teacher when given, else the control, is the reference of its ratios; run
it while nothing else runs); the other seeds' models are only translated (our decoder, fp32,
``--out``/seeds: their speed is the first seed's). sacrebleu's paired bootstrap test of each
compressed model against its comparison of the same seed (our decoder, fp32), and with several
seeds the mean and standard deviation of each one's BLEU, go to ``--out``/fast_students.md.
Arguments after ``--`` go to ``efficiency.py`` (e.g. ``-- --rounds 2``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import efficiency  # noqa: E402
from side_by_side import cached, run_fit, sequence_kd_data  # noqa: E402
from study_plan import (DECODER_LAYERS, ENCODER_LAYERS, FINETUNE, RESULT, STRUCTURED_FRACTION,  # noqa: E402
                        STUDENT_DECODER_LAYERS, TINY, distillation, kept_structure, structured_pruning)

ROOT = Path(__file__).resolve().parents[2]


NAMES = {"teacher": "teacher 6+6", "control": "unpruned (control)", "structured": "half heads and neurons removed",
         "structured_kd": "half removed, KD from the base", "teacher_ft": "teacher 6+6, fine-tuned"}
# a student's run: student_E_D[_seqkd][_pruned[_encoderPP][_decoderPP]][_ft]
STUDENT_RUN = re.compile(r"student_(?P<encoder_layers>\d+)_(?P<decoder_layers>\d+)(?P<sequence_kd>_seqkd)?"
                         r"(?:(?P<pruned>_pruned)(?:_encoder(?P<encoder>\d+(?:p\d+)?))?(?:_decoder(?P<decoder>\d+(?:p\d+)?))?)?"
                         r"(?P<tuned>_ft)?")
SEQUENCE_KD = "_seqkd"  # in the name of a student trained on sequence-level KD data
TEACHER_ENCODER_LAYERS = 6


def encoder_picks(layers: int) -> list[int]:
    """The teacher encoder layers an ``layers``-layer student encoder starts from: spread evenly,
    ending at the top one, as the decoder's ([2, 5] for 2, [5] for 1): 3 -> [1, 3, 5], 4 -> [1, 2, 3, 5]."""
    return [round((k + 1) * TEACHER_ENCODER_LAYERS / layers) - 1 for k in range(layers)]


def student(args: argparse.Namespace, decoder_layers: int) -> str:
    """The plain name of the E+N student: ``student_E_N`` (E: ``--encoder-layers``), or with
    ``--sequence-kd`` (another run) ``student_E_N_seqkd``."""
    return f"student_{args.encoder_layers}_{decoder_layers}" + (SEQUENCE_KD if args.sequence_kd else "")


def percent(fraction: float) -> str:
    """A fraction as a run name's percentage: 0.75 -> "75", 0.625 -> "62p5" (no dot in a file name)."""
    return f"{100 * fraction:g}".replace(".", "p")


def pruned(args: argparse.Namespace, decoder_layers: int) -> str:
    """The plain name of the pruned 6+N student: ``student_6_N_pruned``, or with ``--encoder-prune``
    or ``--decoder-prune`` (another run, so another name) ``student_6_N_pruned_encoderPP``,
    ``..._decoderPP`` or ``..._encoderPP_decoderPP``, PP that part's percentage."""
    suffix = "".join(f"_{part}{percent(fraction)}" for part, fraction in
                     (("encoder", args.encoder_prune), ("decoder", args.decoder_prune)) if fraction is not None)
    return f"{student(args, decoder_layers)}_pruned{suffix}"


def label(name: str) -> str:
    """A plain run name as the tables show it: ``NAMES``, or a student's shape, data, removed
    fractions and fine-tuning (``student_6_2_seqkd_pruned_decoder75_ft`` -> "student 6+2
    (sequence-level KD), encoder half, decoder 75% removed, fine-tuned")."""
    if name in NAMES:
        return NAMES[name]
    found = STUDENT_RUN.fullmatch(name)
    if found is None:
        raise ValueError(f"not a run name of fast_students.py: {name!r}")
    text = f"student {found['encoder_layers']}+{found['decoder_layers']}"
    text += " (sequence-level KD)" if found["sequence_kd"] else ""
    if found["pruned"]:
        encoder, decoder = ((found[part] or "50").replace("p", ".") for part in ("encoder", "decoder"))
        text += (", half removed" if encoder == decoder == "50" else
                 f", encoder {'half' if encoder == '50' else encoder + '%'}, "
                 f"decoder {'half' if decoder == '50' else decoder + '%'} removed")
    return text + (", fine-tuned" if found["tuned"] else "")


def sequence_kd_dir(args: argparse.Namespace) -> Path:
    """Where ``--sequence-kd``'s prepared data is."""
    return args.out / "sequence_kd" / "data"


def per_part(args: argparse.Namespace, callback_of) -> list[str]:
    """The StructuredPruning add-ons of a pruned student, ``callback_of(fraction, include)`` each:
    half of every layer's units, or with ``--encoder-prune`` / ``--decoder-prune`` one fraction for
    the encoder's and one for the decoder's (two callbacks; half where not given)."""
    if args.encoder_prune is None and args.decoder_prune is None:
        return [callback_of(STRUCTURED_FRACTION, ("model.*",))]
    encoder, decoder = (STRUCTURED_FRACTION if f is None else f for f in (args.encoder_prune, args.decoder_prune))
    return [callback_of(encoder, ENCODER_LAYERS), callback_of(decoder, DECODER_LAYERS)]


def run_name(name: str, seed: int) -> str:
    """Seed 1's run keeps the plain name (its cache predates seeds), another seed's is ``<name>_s<seed>``."""
    return name if seed == 1 else f"{name}_s{seed}"


def planned_for_seed(args: argparse.Namespace, seed: int) -> dict[str, dict]:
    """Plain name (``control``, ``student_6_2``...) -> what run_fit needs: configs, add-ons, overrides, result, steps."""
    common = [f"--data.data_dir={args.data_dir}", f"--seed_everything={seed}", f"--data.seed={seed}",
              "--model.val_bleu_sentences=100", *args.override]
    planned = {}
    if args.base is not None:
        finetune = {"configs": [ROOT / TINY, ROOT / FINETUNE], "result": Path(RESULT["finetune"]), "steps": args.steps,
                    "overrides": common + [f"--model.init_from={args.base.resolve()}"]}
        planned = {"control": {**finetune, "add_ons": []},
                   "structured": {**finetune, "add_ons": [structured_pruning(args.steps)]}}
        if args.distill:  # the unpruned base teaches the model it is pruned into (word-level KD)
            planned["structured_kd"] = {**finetune, "add_ons": [structured_pruning(args.steps),
                                                                distillation(str(args.base.resolve()))]}
    if args.teacher is not None:
        teacher = str(args.teacher.resolve())
        # with --finetune-steps: the same low-rate phase for the teacher and each student
        tuned = {"configs": [ROOT / TINY, ROOT / FINETUNE], "result": Path(RESULT["finetune"]),
                 "steps": args.finetune_steps, "add_ons": []}
        if args.finetune_steps and seed == args.seeds[0]:  # the teacher is one model: fine-tuned once
            planned["teacher_ft"] = {**tuned, "overrides": common + [
                "--model.encoder_layers=6", "--model.decoder_layers=6", f"--model.init_from={teacher}"]}
        # the students' training data: the corpus, or the teacher's translations of its source
        data = [f"--data.data_dir={sequence_kd_dir(args)}", *common[1:]] if args.sequence_kd else common
        for decoder_layers in args.students:
            name, picked = student(args, decoder_layers), STUDENT_DECODER_LAYERS[decoder_layers]
            shape = [f"--model.encoder_layers={args.encoder_layers}", f"--model.decoder_layers={decoder_layers}"]
            taught = {
                "configs": [ROOT / TINY], "result": Path(RESULT["student"]), "steps": args.student_steps,
                "add_ons": [distillation(teacher)],
                "overrides": data + shape + [f"--model.init_from={teacher}",
                                             f"--model.init_layers={{encoder: {encoder_picks(args.encoder_layers)}, "
                                             f"decoder: {picked}}}"]}
            variants = []  # the runs that get a fine-tune; with --pruned-only, the pruned ones alone
            if not args.pruned_only:
                planned[name], variants = taught, [name]
            if args.prune_students:  # the same student (start, KD, steps, seed) losing half its heads and neurons
                planned[pruned(args, decoder_layers)] = {
                    **taught, "add_ons": [*taught["add_ons"], *per_part(args, lambda fraction, include: structured_pruning(args.student_steps, fraction, include))]}
                variants.append(pruned(args, decoder_layers))
            for variant in variants if args.finetune_steps else []:  # from its final checkpoint, once trained
                start = args.out / "runs" / run_name(variant, seed) / taught["result"]
                planned[f"{variant}_ft"] = {
                    **tuned, "after": run_name(variant, seed), "overrides": common + shape + [f"--model.init_from={start}"],
                    # a pruned student keeps its removed heads and neurons removed (init_from copies weights only)
                    "add_ons": per_part(args, lambda fraction, include: kept_structure(
                        str(start), fraction, include)) if variant != name else []}
    return planned


def runs(args: argparse.Namespace) -> dict[str, dict]:
    """Run name (``control``, ``control_s2``...) -> what run_fit needs, for every seed. A run that
    starts from another's checkpoint names it in ``after`` and comes after it."""
    return {run_name(name, seed): run for seed in args.seeds
            for name, run in planned_for_seed(args, seed).items()}


def train(args: argparse.Namespace, planned: dict[str, dict]) -> dict[str, Path]:
    """Every run's final checkpoint, ``--jobs`` trained side by side (one thread each when > 1).
    Runs are submitted in ``planned``'s order, each after the one it starts from (``after``), so
    a run waiting for another only waits for one already started: no deadlock at any ``--jobs``."""
    threads = 1 if args.jobs > 1 else None
    started: dict[str, Future] = {}

    def fit(name: str) -> Path:
        run = planned[name]
        if "after" in run:
            started[run["after"]].result()  # its starting checkpoint (raises if that run failed)
        log = args.out / "runs" / name / "train.log" if threads else None  # run_fit makes the directory
        return run_fit(args.out, name, run["configs"], run["add_ons"], run["overrides"], run["result"], run["steps"],
                       threads=threads, log=log)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for name in planned:
            started[name] = pool.submit(fit, name)
        return {name: future.result() for name, future in started.items()}


def pairs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(compressed model, what it is compared with), plain names."""
    found = [("structured", "control")] * (args.base is not None) + [("structured_kd", "control")] * args.distill
    if args.teacher is not None:
        for d in args.students:
            unpruned = not args.pruned_only  # without it, the pruned student is tested against the teacher only
            found += [(student(args, d), "teacher")] * unpruned
            if args.prune_students:  # against the target's reference, and the unpruned student of the same budget
                found += [(pruned(args, d), "teacher")] + [(pruned(args, d), student(args, d))] * unpruned
            if args.finetune_steps:  # fine-tuned alike
                found += [(f"{student(args, d)}_ft", "teacher_ft")] * unpruned
                if args.prune_students:
                    found += [(f"{pruned(args, d)}_ft", "teacher_ft")] + [
                        (f"{pruned(args, d)}_ft", f"{student(args, d)}_ft")] * unpruned
    return found


def measure_other_seeds(args: argparse.Namespace, checkpoints: dict[str, Path], forwarded: list[str]) -> None:
    """The other seeds' models translated by our decoder in fp32 (BLEU, chrF2, bytes) into ``--out``/seeds."""
    models = [f"--model={label(name)} (seed {seed})={checkpoints[run_name(name, seed)]}"
              for seed in args.seeds[1:] for name in planned_for_seed(args, seed)]
    if models:
        beam = forwarded[forwarded.index("--beam") + 1] if "--beam" in forwarded else "4"
        efficiency.main(["--quality-only", "--out", str(args.out / "seeds"), "--data-dir", str(args.data_dir),
                         "--engines", "ours fp32", "--beam", beam, *models])


def translations(args: argparse.Namespace, name: str, seed: int) -> Path:
    """Where our decoder's fp32 translation of the test split by ``name`` of ``seed`` is (the teacher has one seed)."""
    if name.startswith("teacher") or seed == args.seeds[0]:
        return efficiency.translation_path(args.out / "efficiency", f"{label(name)}, ours fp32")
    return efficiency.translation_path(args.out / "seeds", f"{label(name)} (seed {seed}), ours fp32")


def paired_tests(args: argparse.Namespace) -> list[str]:
    """Markdown lines: each compressed model against its comparison of the same seed, our decoder in fp32
    (paired bootstrap), and with several seeds each one's BLEU as mean ± sd over the seeds."""
    import statistics

    from nmt_lightning.evaluation import paired_comparison, read_lines

    references = read_lines(args.data_dir / "test.cs")
    lines = ["| system | baseline | seed | BLEU | baseline BLEU | difference | p-value |", "|---|---|---|---|---|---|---|"]
    results: dict[tuple[str, str], list[dict]] = {}
    for system, baseline in pairs(args):
        for seed in args.seeds:
            system_run, baseline_run = run_name(system, seed), run_name(baseline, seed)
            if baseline.startswith("teacher"):  # the teacher is one model, whatever the seed
                baseline_run = baseline
            found = cached(args.out / "paired" / f"{system_run}_vs_{baseline_run}.json",
                           lambda: paired_comparison(read_lines(translations(args, baseline, seed)),
                                                     read_lines(translations(args, system, seed)),
                                                     references).as_dict())
            results.setdefault((system, baseline), []).append(found)
            lines.append(f"| {label(system)} | {label(baseline)} | {seed} | {found['system_bleu']:.2f} | "
                         f"{found['baseline_bleu']:.2f} | {found['system_bleu'] - found['baseline_bleu']:+.2f} | "
                         f"{found['bleu_p_value']:.4f} |")
    if len(args.seeds) > 1:
        def mean_sd(values: list[float]) -> str:
            return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

        lines += ["", f"Over the seeds {', '.join(map(str, args.seeds))} (mean ± sample standard deviation; the teacher "
                      "is one model):", "",
                  "| system | baseline | BLEU | baseline BLEU | difference of means | largest p-value |",
                  "|---|---|---|---|---|---|"]
        for (system, baseline), found in results.items():
            system_bleu, baseline_bleu = [f["system_bleu"] for f in found], [f["baseline_bleu"] for f in found]
            lines.append(f"| {label(system)} | {label(baseline)} | {mean_sd(system_bleu)} | {mean_sd(baseline_bleu)} | "
                         f"{statistics.mean(system_bleu) - statistics.mean(baseline_bleu):+.2f} | "
                         f"{max(f['bleu_p_value'] for f in found):.4f} |")
    return lines


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    forwarded = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/fast_students"))
    parser.add_argument("--data-dir", type=Path, default=Path("data/libreoffice_en_cs"))
    parser.add_argument("--base", type=Path, help="a trained base: adds the structured pruning and its control")
    parser.add_argument("--distill", action="store_true",
                        help="also prune with word-level KD from the base alongside (structured_kd)")
    parser.add_argument("--teacher", type=Path, help="a trained 6+6 teacher: adds the 6+N students")
    parser.add_argument("--students", type=int, nargs="+", default=list(STUDENT_DECODER_LAYERS),
                        choices=list(STUDENT_DECODER_LAYERS), help="the students' decoder layers (default: %(default)s)")
    parser.add_argument("--encoder-layers", type=int, default=TEACHER_ENCODER_LAYERS, choices=range(1, 7),
                        metavar="E", help="the students' encoder layers, from the teacher's spread evenly up to its top "
                                          "one (encoder_picks; default: %(default)s, the whole encoder); runs "
                                          "student_E_N")
    parser.add_argument("--prune-students", action="store_true",
                        help="also each student with StructuredPruning alongside its KD (student_6_N_pruned)")
    parser.add_argument("--decoder-prune", type=float, metavar="FRACTION",
                        help="with --prune-students: remove this fraction of the decoder's heads and neurons and half "
                             "of the encoder's (default: half of every layer's); another run, named "
                             "student_6_N_pruned_decoderPP")
    parser.add_argument("--encoder-prune", type=float, metavar="FRACTION",
                        help="with --prune-students: remove this fraction of the encoder's heads and neurons (default: "
                             "half); another run, named student_6_N_pruned_encoderPP")
    parser.add_argument("--pruned-only", action="store_true",
                        help="with --prune-students: train only the pruned students (and their fine-tunes), not the "
                             "unpruned ones; the pruned student is then tested against the teacher only")
    parser.add_argument("--sequence-kd", action="store_true",
                        help="the students train on the teacher's beam-4 translations of the training source "
                             "(sequence-level KD, built into --out/sequence_kd), word-level KD alongside "
                             "(student_6_N_seqkd...)")
    parser.add_argument("--steps", type=int, default=1000, help="steps of the pruning and its control (default: %(default)s)")
    parser.add_argument("--student-steps", type=int, default=1400, help="steps of each student (default: %(default)s)")
    parser.add_argument("--finetune-steps", type=int, default=0,
                        help="then the teacher and each student this many steps at finetune.yaml's lower learning "
                             "rate (teacher_ft, student_6_N_ft, student_6_N_pruned_ft; default: %(default)s, none)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1],
                        help="seeds of every run; the first seed's models are timed (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained side by side (default: %(default)s)")
    parser.add_argument("--override", action="append", default=[], metavar="OPTION",
                        help="an nmt-lightning fit option for every run, e.g. --override=--model.d_model=32 (repeat)")
    args = parser.parse_args(argv)
    args.out, args.data_dir = args.out.resolve(), args.data_dir.resolve()  # each run trains in its own directory
    for option, path in (("--base", args.base), ("--teacher", args.teacher)):
        if path is not None and not path.is_file():
            parser.error(f"{option} {path}: no such checkpoint")
    if not (args.data_dir / "test.en").is_file():
        parser.error(f"--data-dir {args.data_dir}: not a prepared corpus (run nmt-lightning prepare first)")
    if args.base is None and args.teacher is None:
        parser.error("give --base (structured pruning) or --teacher (the students), or both")
    if args.distill and args.base is None:
        parser.error("--distill prunes the --base with KD from it: give --base")
    if args.prune_students and args.teacher is None:
        parser.error("--prune-students prunes the students of the --teacher: give --teacher")
    for option, fraction in (("--encoder-prune", args.encoder_prune), ("--decoder-prune", args.decoder_prune)):
        if fraction is not None and not args.prune_students:
            parser.error(f"{option} sets how much --prune-students removes: give --prune-students")
        if fraction is not None and not 0.0 < fraction < 1.0:
            parser.error(f"{option} is a fraction in (0, 1), got {fraction}")
    if args.sequence_kd and args.teacher is None:
        parser.error("--sequence-kd trains the students of the --teacher on its translations: give --teacher")
    if args.pruned_only and not args.prune_students:
        parser.error("--pruned-only leaves out the unpruned students of --prune-students: give --prune-students")
    if min(args.steps, args.student_steps, args.jobs) < 1:
        parser.error("--steps, --student-steps and --jobs must be >= 1")
    if args.finetune_steps < 0:
        parser.error(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
    if args.finetune_steps and args.teacher is None:
        parser.error("--finetune-steps fine-tunes the --teacher and its students: give --teacher")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))}: a seed is given twice")
    args.students = list(dict.fromkeys(args.students))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sequence_kd:  # before any student trains on it (cached; an interrupted translation continues)
        sequence_kd_data(sequence_kd_dir(args), args.out / "sequence_kd" / "corpus" / "train", args.teacher.resolve(),
                         args.data_dir)
    checkpoints = train(args, runs(args))
    first = {name: checkpoints[run_name(name, args.seeds[0])] for name in planned_for_seed(args, args.seeds[0])}
    models = ({"teacher": args.teacher.resolve()} if args.teacher else {}) | first
    if "teacher_ft" in models:  # the better teacher is the reference of the ratios
        models = {"teacher_ft": models.pop("teacher_ft")} | models
    efficiency.main(["--out", str(args.out / "efficiency"), "--data-dir", str(args.data_dir),
                     *[f"--model={label(run)}={path}" for run, path in models.items()], *forwarded])
    measure_other_seeds(args, checkpoints, forwarded)
    lines = ["# Fast CPU models: paired tests", "", *paired_tests(args), "",
             "sacrebleu's paired bootstrap resampling (1,000 samples) on the whole test split, beam as in "
             "efficiency.md, our decoder in fp32. Trained: "
             + json.dumps({name: str(path) for name, path in (models | checkpoints).items()}),
             "", "Reproduce: python recipes/benchmarks/fast_students.py " + " ".join(argv)
             + (" -- " + " ".join(forwarded) if forwarded else "")]
    (args.out / "fast_students.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
