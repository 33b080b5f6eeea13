"""recipes/benchmarks/fast_students.py end to end on the tests' tiny model (no timing is asserted):
the pruning and its control start from one checkpoint with one budget, for each seed, the pruned
export holds half the heads and neurons, the other seeds are only translated, the paired tests
and their summary over seeds are written, and a second run trains nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.conftest import SMALL_FIT_OPTIONS, import_benchmark

pytest.importorskip("ctranslate2", reason="ctranslate2 is an optional extra")

SMALL = [*SMALL_FIT_OPTIONS, "--model.pre_norm=false", "--trainer.limit_val_batches=1", "--model.val_bleu_sentences=4"]
EFFICIENCY = ["--engines", "ours fp32", "CTranslate2 float32", "--beam", "1", "--threads", "1", "--sentences", "4",
              "--latency-sentences", "2", "--rounds", "1"]


def test_pruning_and_control_share_start_and_budget_and_the_export_is_smaller(
        trained_checkpoint: Path, prepared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fast_students = import_benchmark("fast_students")
    monkeypatch.chdir(tmp_path)  # a relative --out: each run trains in its own directory
    out = tmp_path / "out"
    arguments = ["--out", "out", "--data-dir", str(prepared_dir), "--base", str(trained_checkpoint), "--steps", "4",
                 "--jobs", "2", "--seeds", "1", "2", *[f"--override={option}" for option in SMALL], "--", *EFFICIENCY]
    fast_students.main(arguments)
    settings = {run: json.loads((out / "runs" / run / "run.json").read_text())
                for run in ("control", "structured", "control_s2", "structured_s2")}
    control, structured = settings["control"], settings["structured"]
    assert control["steps"] == structured["steps"] == 4
    assert control["overrides"] == structured["overrides"]  # the same start, seed and data
    assert f"--model.init_from={trained_checkpoint.resolve()}" in control["overrides"]
    assert control["add_ons"] == [] and "callbacks.StructuredPruning" in structured["add_ons"][0]
    assert settings["control_s2"]["overrides"] == settings["structured_s2"]["overrides"]
    assert "--seed_everything=2" in settings["control_s2"]["overrides"] and "--seed_everything=1" in control["overrides"]

    deployed = out / "efficiency" / "deployed"
    shapes = {}
    for run in ("unpruned__control", "half_heads_and_neurons_removed"):
        with safe_open(deployed / f"{run}.trained.safetensors", "pt") as handle:
            shapes[run] = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
    q_proj = next(name for name in shapes["unpruned__control"] if name.endswith("self_attn.q_proj.weight"))
    fc1 = next(name for name in shapes["unpruned__control"] if name.endswith("fc1.weight"))
    assert shapes["unpruned__control"][q_proj] == [32, 32] and shapes["half_heads_and_neurons_removed"][q_proj] == [16, 32]
    assert shapes["unpruned__control"][fc1] == [64, 32] and shapes["half_heads_and_neurons_removed"][fc1] == [32, 32]

    page = (out / "fast_students.md").read_text()
    for seed in (1, 2):  # each seed's pruned model against the control of its own seed
        assert f"| half heads and neurons removed | unpruned (control) | {seed} |" in page
    assert "Over the seeds 1, 2" in page  # the summary's arithmetic: the test below (these tiny models score 0)
    # the other seed is only translated (our decoder, fp32): nothing converted for CTranslate2, no timing
    assert "| unpruned (control) (seed 2) | ours fp32 |" in (out / "seeds" / "quality.md").read_text()
    assert not list((out / "seeds" / "deployed").glob("*CTranslate2*"))
    assert not (out / "seeds" / "speed_rounds.json").exists()
    table = (out / "efficiency" / "efficiency.md").read_text()
    assert "| unpruned (control) | CTranslate2 float32 |" in table and "| half heads and neurons removed | ours fp32 |" in table

    trained = {run: (out / "runs" / run / "runs").stat().st_mtime_ns for run in settings}
    fast_students.main(arguments)  # cached: nothing trains again, the same page
    assert {run: (out / "runs" / run / "runs").stat().st_mtime_ns for run in trained} == trained
    assert (out / "fast_students.md").read_text() == page


def test_the_students_start_from_the_teachers_encoder_and_chosen_decoder_layers(
        prepared_dir: Path, tmp_path: Path) -> None:
    """With --teacher: the 6+2 and 6+1 students train (word-level KD) from the teacher's whole
    encoder and its decoder layers [2, 5] or [5]: after two steps at a learning rate of 1e-9 (Adam
    moves a weight by about the learning rate) each student's layers are the chosen teacher layers.
    The pruned students lose half their heads and neurons at step 1, and their fine-tuning keeps
    exactly those removed."""
    import argparse

    import torch

    from tests.conftest import train_tiny_checkpoint

    fast_students = import_benchmark("fast_students")
    teacher = train_tiny_checkpoint(prepared_dir, tmp_path / "teacher", max_steps=2, encoder_layers=6, decoder_layers=6)
    args = argparse.Namespace(out=tmp_path / "out", data_dir=prepared_dir, base=None, teacher=teacher, steps=1,
                              student_steps=2, seeds=[1], students=[2, 1], jobs=2, distill=False,
                              prune_students=True, finetune_steps=1, decoder_prune=None, encoder_prune=None, pruned_only=False,
                              sequence_kd=False, encoder_layers=6,
                              override=[option for option in SMALL if "_layers=" not in option]
                              + ["--model.lr=1e-9", "--model.warmup_steps=1"])  # one step that barely moves
    planned = fast_students.runs(args)
    # no --base: no pruning of a base; --finetune-steps: the teacher and each student go on
    assert sorted(planned) == ["student_6_1", "student_6_1_ft", "student_6_1_pruned", "student_6_1_pruned_ft",
                               "student_6_2", "student_6_2_ft", "student_6_2_pruned", "student_6_2_pruned_ft",
                               "teacher_ft"]
    assert all("callbacks.KnowledgeDistillation" in planned[run]["add_ons"][0] for run in ("student_6_1", "student_6_2"))
    assert all(planned[run]["add_ons"] == [] for run in ("teacher_ft", "student_6_1_ft", "student_6_2_ft"))
    checkpoints = fast_students.train(args, planned)

    def weights(path: Path) -> dict[str, torch.Tensor]:
        return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]

    taught = weights(teacher)
    for name, picked in (("student_6_2", [2, 5]), ("student_6_1", [5])):
        student = weights(checkpoints[name])
        assert not any(f"decoder_layers.{len(picked)}." in key for key in student)  # 6 + len(picked) layers
        for layer in range(6):
            key = f"model.encoder_layers.{layer}.ffn.fc1.weight"
            assert torch.allclose(student[key], taught[key], atol=1e-6)
        for index, source in enumerate(picked):
            assert torch.allclose(student[f"model.decoder_layers.{index}.ffn.fc1.weight"],
                                  taught[f"model.decoder_layers.{source}.ffn.fc1.weight"], atol=1e-6)
        # the fine-tuned student starts from this student's checkpoint (all of it), not from the teacher
        tuned = weights(checkpoints[f"{name}_ft"])
        assert tuned.keys() == student.keys()
        assert all(torch.allclose(tuned[key], student[key], atol=1e-6) for key in student)
        # the pruned student's fine-tune: the same units removed, half of each module's (1 of 2 heads, 32 of 64 neurons)
        pruned, pruned_tuned = weights(checkpoints[f"{name}_pruned"]), weights(checkpoints[f"{name}_pruned_ft"])
        keeps = [key for key in pruned if key.endswith(".keep")]
        # a copy on every layer of a unit: q, k, v, out of each attention, fc1 and fc2 of each feed-forward block
        assert len(keeps) == 6 * (4 + 2) + len(picked) * (2 * 4 + 2)
        assert all(torch.equal(pruned_tuned[key], pruned[key]) for key in keeps)
        assert all(pruned[key].sum() * 2 == pruned[key].numel() for key in keeps)
    tuned_teacher = weights(checkpoints["teacher_ft"])  # the fine-tuned teacher starts from the teacher
    assert all(torch.allclose(tuned_teacher[key], taught[key], atol=1e-6) for key in taught if key.startswith("model."))


def test_a_pruned_student_is_its_student_with_structured_pruning_added(tmp_path: Path) -> None:
    """--prune-students: each student again from the same start, seed, KD and steps, StructuredPruning
    added on the students' schedule, and tested against the teacher and the unpruned student."""
    import argparse

    fast_students = import_benchmark("fast_students")
    args = argparse.Namespace(out=tmp_path, data_dir=tmp_path, base=None, teacher=Path("teacher.ckpt"), steps=1000,
                              student_steps=1400, seeds=[1, 2], students=[2], jobs=1, distill=False,
                              prune_students=True, finetune_steps=0, decoder_prune=None, encoder_prune=None, pruned_only=False,
                              sequence_kd=False, encoder_layers=6,
                              override=[])
    planned = fast_students.runs(args)
    assert sorted(planned) == ["student_6_2", "student_6_2_pruned", "student_6_2_pruned_s2", "student_6_2_s2"]
    for suffix in ("", "_s2"):
        student, pruned = planned[f"student_6_2{suffix}"], planned[f"student_6_2_pruned{suffix}"]
        assert pruned["overrides"] == student["overrides"] and pruned["steps"] == student["steps"] == 1400
        assert pruned["configs"] == student["configs"]
        kd, pruning = pruned["add_ons"]
        assert [kd] == student["add_ons"] and "callbacks.KnowledgeDistillation" in kd
        # the students' schedule: every 140 steps from step 140 to 980 (not the fine-tunings' 1,000)
        pruning = json.loads(pruning)["trainer"]["callbacks+"][0]
        assert pruning["class_path"] == "callbacks.StructuredPruning"
        assert {key: pruning["init_args"][key] for key in ("prune_heads", "prune_neurons", "start_step", "end_step")} == {
            "prune_heads": 0.5, "prune_neurons": 0.5, "start_step": 140, "end_step": 980}
    assert fast_students.pairs(args) == [("student_6_2", "teacher"), ("student_6_2_pruned", "teacher"),
                                         ("student_6_2_pruned", "student_6_2")]


def test_fine_tuning_gives_the_teacher_and_each_student_the_same_phase(tmp_path: Path) -> None:
    """--finetune-steps: one teacher fine-tune (not one per seed) and, per seed, each unpruned
    student's, all with finetune.yaml, the same steps and no add-on; a student's fine-tune starts
    from that student's final checkpoint and waits for it; a pruned student's the same, with its
    removed units kept removed (StructuredPruning's masks_from its own checkpoint)."""
    import argparse

    fast_students = import_benchmark("fast_students")
    args = argparse.Namespace(out=tmp_path, data_dir=tmp_path, base=None, teacher=Path("teacher.ckpt"), steps=1000,
                              student_steps=1400, seeds=[1, 2], students=[2], jobs=1, distill=False,
                              prune_students=True, finetune_steps=300, decoder_prune=None, encoder_prune=None, pruned_only=False,
                              sequence_kd=False, encoder_layers=6,
                              override=[])
    planned = fast_students.runs(args)
    assert sorted(planned) == ["student_6_2", "student_6_2_ft", "student_6_2_ft_s2", "student_6_2_pruned",
                               "student_6_2_pruned_ft", "student_6_2_pruned_ft_s2", "student_6_2_pruned_s2",
                               "student_6_2_s2", "teacher_ft"]
    names = list(planned)
    for suffix, seed in (("", 1), ("_s2", 2)):
        tuned = planned[f"student_6_2_ft{suffix}"]
        assert tuned["after"] == f"student_6_2{suffix}" and names.index(tuned["after"]) < names.index(f"student_6_2_ft{suffix}")
        start = tmp_path / "runs" / f"student_6_2{suffix}" / "runs" / "libreoffice_en_cs_tiny" / "checkpoints" / "last.ckpt"
        assert f"--model.init_from={start}" in tuned["overrides"] and f"--seed_everything={seed}" in tuned["overrides"]
        assert "--model.decoder_layers=2" in tuned["overrides"]
    teacher = planned["teacher_ft"]
    assert f"--model.init_from={Path('teacher.ckpt').resolve()}" in teacher["overrides"]
    assert {"--model.encoder_layers=6", "--model.decoder_layers=6"} <= set(teacher["overrides"])
    for run in ("teacher_ft", "student_6_2_ft", "student_6_2_ft_s2"):
        assert planned[run]["steps"] == 300 and planned[run]["add_ons"] == []
        assert [Path(config).name for config in planned[run]["configs"]] == ["tiny.yaml", "finetune.yaml"]
    for suffix in ("", "_s2"):  # the pruned student's phase: the same, keeping the units its run removed
        tuned, unpruned = planned[f"student_6_2_pruned_ft{suffix}"], planned[f"student_6_2_ft{suffix}"]
        start = tmp_path / "runs" / f"student_6_2_pruned{suffix}" / "runs" / "libreoffice_en_cs_tiny" / "checkpoints"
        assert tuned["after"] == f"student_6_2_pruned{suffix}" and names.index(tuned["after"]) < names.index(
            f"student_6_2_pruned_ft{suffix}")
        assert tuned["overrides"][:-1] == unpruned["overrides"][:-1]  # the same seed, data, shape
        assert tuned["overrides"][-1] == f"--model.init_from={start / 'last.ckpt'}"
        assert (tuned["steps"], tuned["configs"]) == (unpruned["steps"], unpruned["configs"])
        [kept] = tuned["add_ons"]
        kept = json.loads(kept)["trainer"]["callbacks+"][0]
        assert kept["class_path"] == "callbacks.StructuredPruning"
        assert kept["init_args"]["masks_from"] == str(start / "last.ckpt")
        assert (kept["init_args"]["prune_heads"], kept["init_args"]["prune_neurons"]) == (0.5, 0.5)
    assert fast_students.pairs(args)[-3:] == [("student_6_2_ft", "teacher_ft"), ("student_6_2_pruned_ft", "teacher_ft"),
                                              ("student_6_2_pruned_ft", "student_6_2_ft")]


def test_decoder_prune_prunes_the_decoder_to_its_own_fraction_and_keeps_it_through_the_fine_tuning(
        prepared_dir: Path, tmp_path: Path) -> None:
    """--decoder-prune 0.75: the pruned student (its own run name) loses half of the encoder's units and
    three quarters of the decoder's (two StructuredPruning callbacks, one checkpoint), its fine-tuning
    keeps both, and the export holds the two widths: feed-forward 32 of 64 neurons in the encoder,
    16 of 64 in the decoder."""
    import argparse

    from nmt_lightning.translation_file import export_checkpoint
    from tests.conftest import train_tiny_checkpoint

    fast_students = import_benchmark("fast_students")
    teacher = train_tiny_checkpoint(prepared_dir, tmp_path / "teacher", max_steps=2, encoder_layers=6, decoder_layers=6)
    args = argparse.Namespace(out=tmp_path / "out", data_dir=prepared_dir, base=None, teacher=teacher, steps=1,
                              student_steps=4, seeds=[1], students=[2], jobs=2, distill=False, prune_students=True,
                              finetune_steps=2, decoder_prune=0.75, encoder_prune=None, pruned_only=False,
                              sequence_kd=False, encoder_layers=6,
                              override=[option for option in SMALL if "_layers=" not in option])
    planned = fast_students.runs(args)
    assert sorted(planned) == ["student_6_2", "student_6_2_ft", "student_6_2_pruned_decoder75",
                               "student_6_2_pruned_decoder75_ft", "teacher_ft"]
    assert fast_students.label("student_6_2_pruned_decoder75_ft") == \
        "student 6+2, encoder half, decoder 75% removed, fine-tuned"
    assert ("student_6_2_pruned_decoder75_ft", "student_6_2_ft") in fast_students.pairs(args)
    del planned["teacher_ft"], planned["student_6_2_ft"]  # not needed here
    checkpoints = fast_students.train(args, planned)
    for run in ("student_6_2_pruned_decoder75", "student_6_2_pruned_decoder75_ft"):
        export_checkpoint(checkpoints[run], tmp_path / f"{run}.safetensors")
        with safe_open(tmp_path / f"{run}.safetensors", "pt") as handle:
            shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
        for index in range(6):
            assert shapes[f"encoder_layers.{index}.ffn.fc1.weight"] == [32, 32], run
            assert shapes[f"encoder_layers.{index}.self_attn.q_proj.weight"] == [16, 32], run  # 1 of 2 heads
        for index in range(2):
            assert shapes[f"decoder_layers.{index}.ffn.fc1.weight"] == [16, 32], run
            assert shapes[f"decoder_layers.{index}.cross_attn.q_proj.weight"] == [16, 32], run  # at least one head


def test_pruned_only_trains_the_pruned_students_as_they_would_be_and_tests_them_against_the_teacher(
        tmp_path: Path) -> None:
    """--pruned-only: the unpruned students and their fine-tunes are left out; the pruned student's
    runs are the same as with them (start, KD, pruning, steps, seed), its fine-tune included; the
    paired tests are against the teacher (and the fine-tuned teacher) only."""
    import argparse

    fast_students = import_benchmark("fast_students")

    def planned(pruned_only: bool) -> tuple[dict, list]:
        args = argparse.Namespace(out=tmp_path, data_dir=tmp_path, base=None, teacher=Path("teacher.ckpt"), steps=1000,
                                  student_steps=1400, seeds=[1, 2], students=[2], jobs=1, distill=False,
                                  prune_students=True, finetune_steps=300, decoder_prune=0.75, encoder_prune=None,
                                  pruned_only=pruned_only, sequence_kd=False, encoder_layers=6, override=[])
        return fast_students.runs(args), fast_students.pairs(args)

    (alone, alone_pairs), (full, _) = planned(True), planned(False)
    assert sorted(alone) == ["student_6_2_pruned_decoder75", "student_6_2_pruned_decoder75_ft",
                             "student_6_2_pruned_decoder75_ft_s2", "student_6_2_pruned_decoder75_s2", "teacher_ft"]
    assert all(alone[name] == full[name] for name in alone)
    assert alone_pairs == [("student_6_2_pruned_decoder75", "teacher"), ("student_6_2_pruned_decoder75_ft", "teacher_ft")]


@pytest.mark.parametrize("options, message", [
    ([], "give --base (structured pruning) or --teacher"),
    (["--teacher", "{checkpoint}", "--distill"], "--distill prunes the --base"),
    (["--base", "{checkpoint}", "--prune-students"], "--prune-students prunes the students of the --teacher"),
    (["--base", "{checkpoint}", "--seeds", "1", "1"], "--seeds 1 1: a seed is given twice"),
    (["--base", "{checkpoint}", "--steps", "0"], "must be >= 1"),
    (["--base", "{checkpoint}", "--finetune-steps", "300"], "--finetune-steps fine-tunes the --teacher"),
    (["--teacher", "{checkpoint}", "--finetune-steps", "-1"], "--finetune-steps must be >= 0, got -1"),
    (["--teacher", "{checkpoint}", "--decoder-prune", "0.75"], "--decoder-prune sets how much --prune-students"),
    (["--teacher", "{checkpoint}", "--prune-students", "--decoder-prune", "1"], "--decoder-prune is a fraction in (0, 1)"),
    (["--teacher", "{checkpoint}", "--pruned-only"], "--pruned-only leaves out the unpruned students"),
])
def test_impossible_settings_are_refused_naming_the_argument(
        options: list[str], message: str, trained_checkpoint: Path, prepared_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    fast_students = import_benchmark("fast_students")
    arguments = ["--out", str(tmp_path / "out"), "--data-dir", str(prepared_dir)]
    with pytest.raises(SystemExit):
        fast_students.main(arguments + [option.format(checkpoint=trained_checkpoint) for option in options])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()  # refused before anything trains


def test_the_seed_summary_is_the_mean_and_sample_deviation_of_each_seeds_paired_result(tmp_path: Path) -> None:
    """Three seeds' cached paired results, the BLEUs chosen so that the population deviation (2.94
    for 20, 22, 27) or a mean over the wrong runs would print another line."""
    import argparse

    fast_students = import_benchmark("fast_students")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.cs").write_text("a\n", encoding="utf-8")
    (tmp_path / "paired").mkdir()
    for (system, baseline), (bleu, baseline_bleu, p_value) in {
            ("structured", "control"): (20.0, 25.0, 0.001), ("structured_s2", "control_s2"): (22.0, 26.0, 0.02),
            ("structured_s3", "control_s3"): (27.0, 24.0, 0.3)}.items():
        (tmp_path / "paired" / f"{system}_vs_{baseline}.json").write_text(json.dumps(
            {"system_bleu": bleu, "baseline_bleu": baseline_bleu, "bleu_p_value": p_value}))
    args = argparse.Namespace(out=tmp_path, data_dir=tmp_path / "data", base=Path("base.ckpt"), teacher=None,
                              distill=False, students=[2, 1], seeds=[1, 2, 3], prune_students=False,
                              pruned_only=False, sequence_kd=False, encoder_layers=6)
    lines = fast_students.paired_tests(args)
    assert "| half heads and neurons removed | unpruned (control) | 2 | 22.00 | 26.00 | -4.00 | 0.0200 |" in lines
    # mean 23, deviations -3, -1, 4: sqrt(26 / 2) = 3.61; baseline 25 ± 1; the largest p-value 0.3
    assert ("| half heads and neurons removed | unpruned (control) | 23.00 ± 3.61 | 25.00 ± 1.00 | -2.00 | 0.3000 |"
            in lines)


def test_sequence_kd_students_train_on_the_teachers_translations_and_fine_tune_on_the_corpus(tmp_path: Path) -> None:
    """--sequence-kd: every student run (pruned or not) is its own run on the sequence-level KD data,
    with the same KD, start, steps and seed as the word-level student; the fine-tunes, the teacher's
    included, train on the corpus itself; the pairs compare like with like."""
    import argparse

    fast_students = import_benchmark("fast_students")

    def planned(sequence_kd: bool) -> tuple[dict, list]:
        args = argparse.Namespace(out=tmp_path, data_dir=tmp_path / "corpus", base=None, teacher=Path("teacher.ckpt"),
                                  steps=1000, student_steps=1400, seeds=[1], students=[2], jobs=1, distill=False,
                                  prune_students=True, finetune_steps=300, decoder_prune=None, encoder_prune=None, pruned_only=False,
                                  sequence_kd=sequence_kd, encoder_layers=6, override=[])
        return fast_students.runs(args), fast_students.pairs(args)

    (word, _), (sequence, pairs) = planned(False), planned(True)
    assert sorted(sequence) == ["student_6_2_seqkd", "student_6_2_seqkd_ft", "student_6_2_seqkd_pruned",
                                "student_6_2_seqkd_pruned_ft", "teacher_ft"]
    corpus, translations = f"--data.data_dir={tmp_path / 'corpus'}", f"--data.data_dir={tmp_path / 'sequence_kd' / 'data'}"
    for run in ("student_6_2", "student_6_2_pruned"):
        taught = sequence[run.replace("student_6_2", "student_6_2_seqkd")]
        assert taught["overrides"][0] == translations and word[run]["overrides"][0] == corpus
        assert taught["overrides"][1:] == word[run]["overrides"][1:] and taught["add_ons"] == word[run]["add_ons"]
        tuned = sequence[f"{run.replace('student_6_2', 'student_6_2_seqkd')}_ft"]
        assert tuned["overrides"][0] == corpus and tuned["after"] == run.replace("student_6_2", "student_6_2_seqkd")
    assert sequence["teacher_ft"] == word["teacher_ft"]
    assert pairs == [("student_6_2_seqkd", "teacher"), ("student_6_2_seqkd_pruned", "teacher"),
                     ("student_6_2_seqkd_pruned", "student_6_2_seqkd"), ("student_6_2_seqkd_ft", "teacher_ft"),
                     ("student_6_2_seqkd_pruned_ft", "teacher_ft"), ("student_6_2_seqkd_pruned_ft", "student_6_2_seqkd_ft")]
    assert fast_students.label("student_6_2_seqkd_pruned_ft") == "student 6+2 (sequence-level KD), half removed, fine-tuned"


def test_encoder_prune_prunes_the_encoder_to_its_own_fraction(tmp_path: Path) -> None:
    """--encoder-prune 0.75: another run (student_6_2_pruned_encoder75) whose encoder loses three
    quarters of its units and its decoder half, in two callbacks; with --decoder-prune too, each
    part its own fraction. The fine-tune keeps both parts' structure."""
    import argparse

    fast_students = import_benchmark("fast_students")

    def planned(encoder: float, decoder: float | None) -> dict:
        args = argparse.Namespace(out=tmp_path, data_dir=tmp_path, base=None, teacher=Path("teacher.ckpt"), steps=1000,
                                  student_steps=1400, seeds=[1], students=[2], jobs=1, distill=False,
                                  prune_students=True, finetune_steps=300, decoder_prune=decoder, encoder_prune=encoder,
                                  pruned_only=True, sequence_kd=False, encoder_layers=6, override=[])
        return fast_students.runs(args)

    def fractions(run: dict) -> dict[str, float]:
        found = {}
        for add_on in run["add_ons"]:
            callback = json.loads(add_on)["trainer"]["callbacks+"][0]
            if callback["class_path"] == "callbacks.StructuredPruning":
                arguments = callback["init_args"]
                assert arguments["prune_heads"] == arguments["prune_neurons"]
                found[arguments["include"][0]] = arguments["prune_heads"]
        return found

    runs = planned(0.75, None)
    assert sorted(runs) == ["student_6_2_pruned_encoder75", "student_6_2_pruned_encoder75_ft", "teacher_ft"]
    expected = {"model.encoder_layers.*": 0.75, "model.decoder_layers.*": 0.5}
    assert fractions(runs["student_6_2_pruned_encoder75"]) == fractions(runs["student_6_2_pruned_encoder75_ft"]) == expected
    assert fast_students.label("student_6_2_pruned_encoder75_ft") == \
        "student 6+2, encoder 75%, decoder half removed, fine-tuned"
    both = planned(0.75, 0.625)
    assert fractions(both["student_6_2_pruned_encoder75_decoder62p5"]) == {"model.encoder_layers.*": 0.75,
                                                                          "model.decoder_layers.*": 0.625}
    assert fast_students.label("student_6_2_pruned_encoder75_decoder62p5_ft") == \
        "student 6+2, encoder 75%, decoder 62.5% removed, fine-tuned"


def test_encoder_layers_start_a_shallower_encoder_from_teacher_layers_spread_to_the_top(
        prepared_dir: Path, tmp_path: Path) -> None:
    """--encoder-layers 4: the students are 4+N runs (student_4_N...) whose encoder starts from the
    teacher's encoder layers [1, 2, 3, 5] (spread evenly up to the top one, as the decoder's [2, 5]):
    after two steps at a learning rate of 1e-9 each student layer is its teacher layer."""
    import argparse

    import torch

    from tests.conftest import train_tiny_checkpoint

    fast_students = import_benchmark("fast_students")
    assert [fast_students.encoder_picks(n) for n in (6, 4, 3, 2, 1)] == [
        [0, 1, 2, 3, 4, 5], [1, 2, 3, 5], [1, 3, 5], [2, 5], [5]]
    teacher = train_tiny_checkpoint(prepared_dir, tmp_path / "teacher", max_steps=2, encoder_layers=6, decoder_layers=6)
    args = argparse.Namespace(out=tmp_path / "out", data_dir=prepared_dir, base=None, teacher=teacher, steps=1,
                              student_steps=2, seeds=[1], students=[2], jobs=1, distill=False, prune_students=True,
                              finetune_steps=0, decoder_prune=None, encoder_prune=None, pruned_only=False,
                              sequence_kd=False, encoder_layers=4,
                              override=[option for option in SMALL if "_layers=" not in option]
                              + ["--model.lr=1e-9", "--model.warmup_steps=1"])
    planned = fast_students.runs(args)
    assert sorted(planned) == ["student_4_2", "student_4_2_pruned"]
    assert fast_students.pairs(args) == [("student_4_2", "teacher"), ("student_4_2_pruned", "teacher"),
                                         ("student_4_2_pruned", "student_4_2")]
    assert fast_students.label("student_4_2_pruned") == "student 4+2, half removed"
    del planned["student_4_2_pruned"]  # the start is the same
    checkpoints = fast_students.train(args, planned)
    taught = torch.load(teacher, map_location="cpu", weights_only=False)["state_dict"]
    student = torch.load(checkpoints["student_4_2"], map_location="cpu", weights_only=False)["state_dict"]
    assert not any("encoder_layers.4." in key for key in student)
    for index, source in enumerate([1, 2, 3, 5]):
        key = "model.encoder_layers.{}.ffn.fc1.weight"
        assert torch.allclose(student[key.format(index)], taught[key.format(source)], atol=1e-6)
