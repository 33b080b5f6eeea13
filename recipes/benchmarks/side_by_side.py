"""What the benchmarks share: alternatives run in turns, cached results, tables, the CPU."""

from __future__ import annotations

import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence


def median_table(what: str, runs: dict[str, list[float]], unit: str, digits: int) -> tuple[dict[str, float], str]:
    """(median per alternative, markdown table of the medians and every run)."""
    medians = {name: statistics.median(values) for name, values in runs.items()}
    lines = [f"| {what} | {unit} (median) | runs |", "|---|---|---|"]
    lines += [f"| {name} | {medians[name]:.{digits}f} | {', '.join(f'{v:.{digits}f}' for v in values)} |"
              for name, values in runs.items()]
    return medians, "\n".join(lines)


def write_table(csv_path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Write ``rows`` under ``header`` to ``csv_path``; return the same table as Markdown lines."""
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *rows])
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


# Environment variables that cap the instruction set of a library's kernels: CTranslate2's own,
# oneDNN (CTranslate2's GEMMs on AMD, torch's mkldnn), MKL, FBGEMM (torch's int8) and ATen.
ISA_CAPS = ("CT2_FORCE_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "FBGEMM_ENABLE_INSTRUCTIONS",
            "ATEN_CPU_CAPABILITY")


def isa_caps() -> list[str]:
    """``VARIABLE=value`` of each instruction-set cap set in the environment (``ISA_CAPS``)."""
    return [f"{variable}={os.environ[variable]}" for variable in ISA_CAPS if os.environ.get(variable)]


def reproduce_line(script: str, argv: Sequence[str]) -> str:
    """"Reproduce: ..." for a table: the command of ``recipes/benchmarks/<script>`` with ``argv``,
    after the instruction-set caps of the environment that measured it."""
    caps = "".join(f"{cap} " for cap in isa_caps())
    return f"Reproduce: {caps}python recipes/benchmarks/{script} " + " ".join(shlex.quote(a) for a in argv)


def cpu_description() -> str:
    """The processor's model name and the instruction sets int8 matrix products use (Linux), and
    the caps on them set in the environment (a machine measured as an older one would run)."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    int8_flags = [flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if flag in flags]
    caps = isa_caps()
    capped = f", kernels capped by {' '.join(caps)}" if caps else ""
    return f"{name} ({', '.join(int8_flags) or 'no AVX2'}{capped})"


def prepared_test_split(data_dir: Path, limit: Optional[int] = None) -> tuple[list[str], list[str]]:
    """(English sources, Czech references) of a prepared directory's test split, the first
    ``limit`` lines (all if None); exits, naming the main job, if the directory is not prepared."""
    from nmt_lightning.evaluation import read_lines

    if not (data_dir / "test.en").is_file():
        sys.exit(f"--data-dir: {data_dir} is not prepared; run bash recipes/libreoffice_en_cs/main_job.sh first")
    return read_lines(data_dir / "test.en")[:limit], read_lines(data_dir / "test.cs")[:limit]


def weight_bytes(path: Path) -> int:
    """Bytes of the model's tensors in an exported file, without the sentencepiece models and the
    header: what fairseq's iPQ SizeTracker counts, and so the papers' compression ratios. Read
    from the safetensors header (each tensor's byte range), not from the tensors."""
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    return sum(end - begin for name, entry in header.items() if name != "__metadata__"
               and not name.startswith("tokenization.") for begin, end in [entry["data_offsets"]])


def cached(path: Path, compute: Callable[[], Any]) -> Any:
    """``compute()``'s JSON result, computed once: an interrupted benchmark reads it back."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return value


def checkpoint_step(checkpoint: Path) -> int:
    """The global step a Lightning checkpoint was saved at (0 if there is none); loaded safely.
    A run is finished only at its last step: ``last.ckpt`` is also written at epoch ends."""
    from nmt_lightning.checkpoint_reading import read_checkpoint

    if not checkpoint.is_file():
        return 0
    return int(read_checkpoint(checkpoint).get("global_step", 0))


def translation_speed_rounds(path: Path, models: dict[str, Any], lines: list[str], rounds: int) -> list[dict[str, float]]:
    """Sentences/s with beam 4 of every model (TranslationModules in this process) in each of
    ``rounds`` rounds, models taking turns in an order that rotates per round; the rounds are
    cached in ``path`` (JSON; each round also records its ``threads``), and cached rounds that
    measured other models or ran on another number of threads are measured again, so the
    thread count a table states is the one its rounds ran with."""
    import torch

    from nmt_lightning.translate import translate_lines

    threads = torch.get_num_threads()
    done: list[dict] = json.loads(path.read_text()) if path.is_file() else []
    done = [r for r in done if r.get("threads") == threads and set(r) - {"threads"} == set(models)]
    names = list(models)
    while len(done) < rounds:
        shift = len(done) % len(names)
        speeds: dict[str, float] = {"threads": threads}
        for name in names[shift:] + names[:shift]:
            translate_lines(models[name], lines[:32], beam=4, progress=False)  # warm-up
            started = time.perf_counter()
            translate_lines(models[name], lines, beam=4, progress=False)
            speeds[name] = len(lines) / (time.perf_counter() - started)
            print(f"round {len(done) + 1}: {name}: {speeds[name]:.1f} sentences/s", file=sys.stderr, flush=True)
        done.append(speeds)
        path.write_text(json.dumps(done, indent=1))
    return done


def check_run_settings(run_dir: Path, settings: dict[str, Any]) -> None:
    """Record ``settings`` in ``run_dir``/run.json, or exit with the differences from the ones
    recorded there (a run directory cached before run.json existed adopts the current ones)."""
    record = run_dir / "run.json"
    if record.is_file():
        saved = json.loads(record.read_text(encoding="utf-8"))
        changed = [key for key in sorted(set(saved) | set(settings)) if saved.get(key) != settings.get(key)]
        if changed:
            details = "; ".join(f"{key}: {saved.get(key)!r} then, {settings.get(key)!r} now" for key in changed)
            sys.exit(f"{run_dir}: this cached run trained with other settings ({details}). Give another --out, "
                     f"or delete the directory to train it again.")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")


def run_fit(out: Path, name: str, configs: list[Path], add_ons: list[str], overrides: list[str],
            result: Path, steps: int, finished: Optional[Path] = None, threads: Optional[int] = None,
            log: Optional[Path] = None) -> Path:
    """``nmt-lightning fit`` of ``steps`` steps in ``out``/runs/<name> (recipe paths are relative, so
    each run has its own directory). Cached: a finished run is reused, an interrupted one resumes
    from its last checkpoint (written at every epoch end). The run's settings are kept in
    ``run.json`` beside it: a cached run trained with other settings (another ``--steps``, add-on
    or option under the same ``--out``) is an error, not a silent reuse or a mixed resume.

    ``finished``: a file (relative to the run's directory) whose presence also ends the run, for
    runs that stop themselves before ``steps`` (a plateau); ``threads``: the run's CPU threads
    (OMP_NUM_THREADS), for runs side by side; ``log``: where its output goes (default: inherited)."""
    run_dir = out / "runs" / name
    checkpoint = run_dir / result
    check_run_settings(run_dir, {"configs": [str(c) for c in configs], "add_ons": list(add_ons),
                                 "overrides": list(overrides), "steps": steps})
    done = checkpoint_step(checkpoint)
    if done >= steps or (finished is not None and (run_dir / finished).is_file()):
        return checkpoint
    options = [option for config in configs for option in ("--config", str(config))]
    for index, text in enumerate(add_ons):
        path = run_dir / f"add_on{index}.yaml"
        path.write_text(text + "\n", encoding="utf-8")
        options += ["--config", str(path)]
    command = [sys.executable, "-m", "nmt_lightning.cli", "fit", *options, *overrides, f"--trainer.max_steps={steps}",
               "--trainer.max_time=null", "--model.test_output=null"]
    if done:
        resumed = run_dir / "resume_from.ckpt"  # a copy: the run writes last.ckpt anew
        resumed.write_bytes(checkpoint.read_bytes())
        command.append(f"--ckpt_path={resumed}")
    print(f"$ (cd {run_dir} && nmt-lightning {' '.join(command[3:])})", file=sys.stderr, flush=True)
    environment = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    if log is None:
        subprocess.run(command, cwd=run_dir, check=True, env=environment)
    else:
        with open(log, "a", encoding="utf-8") as handle:
            subprocess.run(command, cwd=run_dir, check=True, env=environment, stdout=handle, stderr=subprocess.STDOUT)
    # Lightning answers SIGTERM by stopping the fit cleanly (exit status 0): without this check a
    # run stopped that way would pass as trained, and a run starting from it would fail or, worse,
    # start from a half-trained model.
    reached = checkpoint_step(checkpoint)
    if reached < steps and not (finished is not None and (run_dir / finished).is_file()):
        raise RuntimeError(f"{name}: the fit ended at step {reached} of {steps} without an error (stopped by a "
                           f"signal or a trainer limit?); {checkpoint} is not its result. Run the same command "
                           f"again to go on; see {log if log is not None else 'its output above'}")
    return checkpoint


def sequence_kd_data(data_out: Path, corpus: Path, teacher: Path, data_dir: Path,
                     source: Optional[Path] = None) -> Path:
    """Sequence-level KD data (Kim & Rush 2016): the teacher's beam-4 translations of ``source``
    (a corpus prefix; default: ``data_dir``/train), written to ``corpus``.en/.cs, prepared into
    ``data_out`` with ``data_dir``'s BPE and its valid and test splits; returns ``data_out``.
    Cached: a finished directory is reused, and distill-data continues an interrupted translation."""
    prepared = data_out / "prepare.json"
    if prepared.is_file() and "binary" in json.loads(prepared.read_text(encoding="utf-8"))["stages"]:
        return data_out
    command = [sys.executable, "-m", "nmt_lightning.cli"]
    if not Path(f"{corpus}.cs").is_file():
        subprocess.run([*command, "distill-data", "--checkpoint", str(teacher), "--input",
                        str(source if source is not None else data_dir / "train"), "--output", str(corpus),
                        "--beam", "4"], check=True)
    subprocess.run([*command, "prepare", "--train", str(corpus), "--valid", str(data_dir / "valid"), "--test",
                    str(data_dir / "test"), "--bpe-from", str(data_dir), "--src", "en", "--tgt", "cs", "--out",
                    str(data_out)], check=True)
    return data_out


def file_slug(name: str) -> str:
    """``name`` as a file name: every character but letters and digits made ``_``."""
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def export_and_score(out: Path, row: tuple[str, Path, Optional[str]], sources: list[str],
                     references: list[str]) -> tuple[Path, dict]:
    """Export the row's checkpoint (``export --quantize``, None: what it trained) to
    ``out``/exports and score it on ``sources``/``references`` with beam 4 and greedy (cached in
    ``out``/scores): (the exported file, {bytes, parameters, bleu_/chrf_beam4, bleu_/chrf_greedy})."""
    from nmt_lightning.checkpoint_reading import read_checkpoint
    from nmt_lightning.evaluation import score
    from nmt_lightning.translation_file import export_checkpoint, load_exported
    from nmt_lightning.module import TranslationModule
    from nmt_lightning.translate import translate_lines

    name, checkpoint, quantize = row
    slug = file_slug(name)
    model_file = out / "exports" / f"{slug}.safetensors"
    if not model_file.is_file():
        model_file.parent.mkdir(parents=True, exist_ok=True)
        export_checkpoint(checkpoint, model_file, quantize)

    def scores() -> dict:
        module = load_exported(model_file)
        architecture = TranslationModule.from_hyperparameters(read_checkpoint(checkpoint)["hyper_parameters"])
        result = {"bytes": model_file.stat().st_size, "parameters": architecture.model.num_parameters()}
        for label, beam in (("beam4", 4), ("greedy", 1)):
            print(f"translating the test split: {name}, {label}", file=sys.stderr, flush=True)
            found = score(translate_lines(module, sources, beam=beam), references)
            result.update({f"bleu_{label}": found.bleu, f"chrf_{label}": found.chrf})
        return result

    return model_file, cached(out / "scores" / f"{slug}.json", scores)


# What the recipes train: (encoder layers, decoder layers, d_model, max_steps).
MAIN_JOB_MODEL = {"what": "the main job's model (tiny.yaml)", "layers": (3, 3), "d_model": 256, "steps": 1400}
TEACHER_MODEL = {"what": "the teacher (tiny.yaml + teacher.yaml)", "layers": (6, 6), "d_model": 256, "steps": 4000}


def check_given_model(path: Path, argument: str, expected: dict, default: bool) -> dict:
    """Refuse a checkpoint that is not the model a benchmark takes it for: another architecture,
    a compressed run (an add-on's), or, when the benchmark's default path is used, another step
    count than the recipe's (a run stopped early, or an add-on that replaced its last.ckpt).
    An explicitly given checkpoint may have trained any number of steps: it is the user's
    choice, and the tables name it. Returns (step, layers, d_model) as read."""
    from nmt_lightning.checkpoint_reading import read_checkpoint

    checkpoint = read_checkpoint(path)
    hyper = checkpoint.get("hyper_parameters", {})
    presets = {"tiny": (3, 3, 256)}
    preset = presets.get(hyper.get("preset", "tiny"), (None, None, None))
    layers = (hyper.get("encoder_layers") or preset[0], hyper.get("decoder_layers") or preset[1])
    d_model = hyper.get("d_model") or preset[2]
    step = int(checkpoint.get("global_step", 0))
    found = {"step": step, "layers": layers, "d_model": d_model}
    problems = []
    if layers != expected["layers"] or d_model != expected["d_model"]:
        problems.append(f"it is a {layers[0]}+{layers[1]} model of width {d_model}, {expected['what']} is "
                        f"{expected['layers'][0]}+{expected['layers'][1]} of width {expected['d_model']}")
    if checkpoint.get("compression") or any(".parametrizations." in key for key in checkpoint.get("state_dict", {})):
        problems.append("it was trained with compression callbacks (an add-on recipe's run)")
    if default and step != expected["steps"]:
        problems.append(f"it trained {step:,} steps, the recipe {expected['steps']:,}")
    if problems:
        sys.exit(f"{argument}: {path} is not {expected['what']}: {'; '.join(problems)}. Train it with the recipe, or "
                 f"pass the checkpoint you mean explicitly with {argument}")
    return found
