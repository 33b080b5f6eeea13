"""What the compression study trains: every run, every row, every control, and its budget.

The plan is data: ``plan(budget)`` lists the runs (a recipe, add-ons, the checkpoint it starts
from, its steps and seed) and the rows of each table (a run's checkpoint, how it is exported,
the control it is compared with). ``recipes/benchmarks/study.py`` trains and scores them;
``study_page.py`` writes the page. The rules the plan keeps:

- every compressed row starts from the same converged checkpoint as its control and trains the
  same number of steps; a row that cannot have such a control says so in ``unequal``;
- a distilled student and the student from scratch train the same steps; the lottery tickets
  are compared with a dense model of the tickets' total budget (and the one-round dense model
  as the papers do), magnitude pruning gets the tickets' total budget;
- headline rows and their controls run ``budget.seeds`` seeds; the expensive ones one seed,
  which the row says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

TINY = "recipes/libreoffice_en_cs/tiny.yaml"
TEACHER = "recipes/libreoffice_en_cs/teacher.yaml"
CONVERGED = "recipes/libreoffice_en_cs/converged.yaml"
FINETUNE = "recipes/libreoffice_en_cs/finetune.yaml"
BOTTLENECK = "recipes/libreoffice_en_cs/bottleneck.yaml"
# Where each kind of run leaves its final checkpoint, relative to its run directory (run_dir).
RESULT = {"reference": "runs/converged/checkpoints/last.ckpt",
          "finetune": "runs/libreoffice_en_cs_tiny_finetune/checkpoints/last.ckpt",
          "student": "runs/libreoffice_en_cs_tiny/checkpoints/last.ckpt",
          "bottleneck": "runs/libreoffice_en_cs_bottleneck/checkpoints/last.ckpt"}
PLATEAU = "runs/converged/plateau.json"  # a reference's plateau record, relative to its run directory
STUDENT_DECODER_LAYERS = {2: "[2, 5]", 1: "[5]"}  # the 6+N students: the teacher's decoder layers they start from
STEPS_PER_SECOND = {"reference": 1.8, "teacher": 1.0, "finetune": 1.8, "student": 1.8, "kd": 1.2, "bottleneck": 1.3}


@dataclass(frozen=True)
class Budget:
    """Training steps of each kind of run (``scaled`` shrinks them all for a smoke test)."""

    reference_cap: int = 60000  # the references stop on their plateau long before
    finetune: int = 1000  # QAT, Quant-Noise int8/int4 and their fp32 control, from the converged base
    ipq_noise: int = 1000  # Quant-Noise pq before iPQ
    ipq_stages: int = 16000  # iPQ (three stages) after it: the x20 row
    student: int = 4000  # every 3+3 student, distilled or from scratch
    bottleneck: int = 6400  # the MobileBERT students, PKT or from scratch
    stage_steps: int = 240  # PKT's steps per layer
    lottery_round: int = 1000  # one lottery round (the rounds do not train to convergence)
    seeds: int = 3

    def scaled(self, steps: int, seeds: int) -> "Budget":
        """Every budget ``steps`` and ``seeds`` seeds (a smoke test of the whole study); iPQ's three
        stages, PKT's 12 layer stages and a lottery round at least one step each."""
        return Budget(reference_cap=steps, finetune=steps, ipq_noise=steps, ipq_stages=max(3, steps), student=steps,
                      bottleneck=max(13, steps), stage_steps=1, lottery_round=max(2, steps), seeds=seeds)


@dataclass(frozen=True)
class Run:
    """One training run in OUT/runs/<name>."""

    name: str
    kind: str  # a key of RESULT / STEPS_PER_SECOND
    configs: tuple[str, ...]
    steps: int
    seed: int = 1
    start: Optional[str] = None  # the run whose final checkpoint it starts from (model.init_from)
    init_layers: Optional[str] = None
    add_ons: tuple[str, ...] = ()  # YAML texts (callbacks)
    overrides: tuple[str, ...] = ()
    data: Optional[str] = None  # another prepared corpus (the sequence-level KD data): a key of the driver's corpora

    @property
    def result(self) -> str:
        return RESULT["reference" if self.kind == "teacher" else "student" if self.kind == "kd" else self.kind]


@dataclass(frozen=True)
class Row:
    """One line of a table: a run's checkpoint exported one way, and the control it is judged against."""

    table: str
    label: str  # the method, in plain words
    run: str
    export: Optional[str] = None  # nmt-lightning export --quantize (None: what the run trained)
    seed: int = 1
    unequal: str = ""  # what is not equal to its control, in words ("" when nothing is)


@dataclass(frozen=True)
class Comparison:
    """A question a table answers: is ``system`` better than ``baseline`` (by ``margin`` BLEU or more,
    or within ``-margin`` of it for a "no worse than" claim), with a paired test per common seed."""

    table: str
    system: str
    baseline: str
    claim: str  # the paper's claim, in words
    margin: float  # the mean BLEU difference system - baseline the claim needs (negative: "within")
    significant: bool = False  # the claim also needs p < 0.05 in every seed's paired test


@dataclass
class Plan:
    runs: dict[str, Run] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)

    def add(self, run: Run) -> str:
        if run.name in self.runs and self.runs[run.name] != run:
            raise ValueError(f"two different runs named {run.name}")
        self.runs[run.name] = run
        return run.name


def callback(class_path: str, **init_args) -> str:
    return json.dumps({"trainer": {"callbacks+": [{"class_path": class_path, "init_args": init_args}]}})


def qat(bits: int) -> str:
    return callback("callbacks.QuantizationAwareTraining", bits=bits, per_channel=bits <= 4, include=["model.*"],
                    quantize_embeddings=True)


def quant_noise(scheme: str, block_sizes: Optional[dict] = None) -> str:
    return callback("callbacks.QuantNoise", p=0.1, scheme=scheme, block_size=8,
                    block_sizes=block_sizes or {"*attn.*": 4}, include=["model.*"], per_channel=True, seed=0)


# "Bits moved" iPQ & int8 (x20): embeddings first with 4,096 codewords, feed-forward blocks of 16.
MOVED_STAGES = [["*embed*", "*output_projection"], ["*.ffn.*"], ["*attn.*"]]
MOVED_BLOCKS = {"*attn.*": 4, "*.ffn.*": 16}


def ipq_moved(steps: int) -> str:
    return callback("callbacks.IterativeProductQuantization", steps_per_stage=max(1, steps // 3), stages=MOVED_STAGES,
                    centroids=256, centroid_counts={"*embed*": 4096}, block_size=8, block_sizes=MOVED_BLOCKS,
                    centroid_bits=8, seed=0)


def distillation(teacher: str, hidden_weight: float = 0.0) -> str:
    return callback("callbacks.KnowledgeDistillation", teacher=teacher, temperature=2.0, soft_weight=0.5,
                    hard_weight=0.5, hidden_weight=hidden_weight)


STRUCTURED_FRACTION = 0.5  # of the heads and of the neurons removed by structured pruning


def structured_pruning(steps: int, fraction: float = STRUCTURED_FRACTION, include: tuple[str, ...] = ("model.*",)) -> str:
    """``fraction`` of the heads and neurons of every layer of ``include`` (half, all layers)
    removed in a fine-tuning of ``steps`` steps: every tenth of the steps from the first tenth to
    seven tenths, then recovery."""
    start = max(1, steps // 10)
    return callback("callbacks.StructuredPruning", prune_heads=fraction, prune_neurons=fraction,
                    importance="taylor", scope="layer", start_step=start, end_step=max(start, steps * 7 // 10),
                    frequency=start, include=list(include))


def kept_structure(pruned_checkpoint: str, fraction: float = STRUCTURED_FRACTION,
                   include: tuple[str, ...] = ("model.*",)) -> str:
    """A fine-tuning phase after ``structured_pruning``: the heads and neurons that the checkpoint's
    run removed stay removed from the first step, and no more go (the schedule's target, the
    pruning's ``fraction`` of each, is reached at step 0 by the units already removed)."""
    return callback("callbacks.StructuredPruning", prune_heads=fraction, prune_neurons=fraction,
                    importance="magnitude", scope="layer", start_step=0, end_step=0, include=list(include),
                    masks_from=pruned_checkpoint)


# Where the encoder's and the decoder's units are, to prune them to different fractions.
ENCODER_LAYERS, DECODER_LAYERS = ("model.encoder_layers.*",), ("model.decoder_layers.*",)


def seeds(budget: Budget) -> range:
    return range(1, budget.seeds + 1)


def plan(budget: Budget, teacher_checkpoint: str = "<teacher>") -> Plan:
    """Every run and row of the study; ``teacher_checkpoint`` is the converged teacher's path
    (the distillation callbacks name it in their YAML)."""
    p = Plan()
    base = p.add(Run("base", "reference", (TINY, CONVERGED), budget.reference_cap))
    teacher = p.add(Run("teacher", "teacher", (TINY, TEACHER, CONVERGED), budget.reference_cap))
    p.rows += [Row("references", "tiny 3+3 (the base)", base), Row("references", "6+6 (the teacher)", teacher)]

    def finetune(name: str, add_ons: tuple[str, ...], steps: int, seed: int, start: str = base) -> str:
        return p.add(Run(f"{name}_s{seed}", "finetune", (TINY, FINETUNE), steps, seed, start, add_ons=add_ons))

    # Q8BERT: QAT int8 against the fp32 control of the same steps, 3 seeds.
    control = "fp32 fine-tuning (control)"
    for seed in seeds(budget):
        fp32 = finetune("fp32", (), budget.finetune, seed)
        p.rows += [Row("qat", control, fp32, "fp32", seed),
                   Row("qat", "post-training int8 of the control", fp32, "int8", seed),
                   Row("qat", "QAT int8", finetune("qat8", (qat(8),), budget.finetune, seed), None, seed)]
    p.comparisons += [Comparison("qat", "QAT int8", control, "Q8BERT: QAT int8 within 1% of fp32 (here: 0.3 BLEU)", -0.3),
                      Comparison("qat", "post-training int8 of the control", control,
                                 "post-training int8 loses more than QAT", -0.3)]

    # Quant-Noise: int4 three ways (the control's post-processing, QAT, Quant-Noise), 3 seeds.
    for seed in seeds(budget):
        fp32 = finetune("fp32", (), budget.finetune, seed)
        p.rows += [Row("quant_noise", control, fp32, "fp32", seed),
                   Row("quant_noise", "int4, post-processing", fp32, "int4", seed),
                   Row("quant_noise", "int4, QAT", finetune("qat4", (qat(4),), budget.finetune, seed), None, seed),
                   Row("quant_noise", "int4, Quant-Noise", finetune("quant_noise_int4", (quant_noise("int4"),),
                                                                     budget.finetune, seed), None, seed)]
    # iPQ & int8 at x20 with Quant-Noise, against an fp32 control of the same total steps: one seed.
    ipq_total = budget.ipq_noise + budget.ipq_stages
    long_control = "fp32 fine-tuning, the iPQ row's steps (control)"
    noised = finetune("quant_noise_pq", (quant_noise("pq", MOVED_BLOCKS),), budget.ipq_noise, 1)
    p.rows += [
        Row("quant_noise", long_control, finetune("fp32_long", (), ipq_total, 1), "fp32",
            unequal="one seed (each run trains the iPQ row's steps)"),
        Row("quant_noise", "iPQ & int8 (x20), Quant-Noise", p.add(Run(
            "quant_noise_ipq_int8_s1", "finetune", (TINY, FINETUNE), budget.ipq_stages, 1, noised,
            add_ons=(ipq_moved(budget.ipq_stages), quant_noise("pq", MOVED_BLOCKS)))), None,
            unequal="one seed (each run trains the iPQ row's steps)")]
    p.comparisons += [
        Comparison("quant_noise", "int4, Quant-Noise", "int4, QAT", "Quant-Noise int4 beats int4 QAT", 0.0, True),
        Comparison("quant_noise", "int4, Quant-Noise", "int4, post-processing",
                   "Quant-Noise int4 beats int4 post-processing", 0.0, True),
        Comparison("quant_noise", "iPQ & int8 (x20), Quant-Noise", long_control,
                   "iPQ with Quant-Noise at x20 within 1.5 BLEU of uncompressed (the seed's target)", -1.5)]

    # Distillation: 3+3 students of the converged teacher, all the same steps.
    def student(name: str, seed: int, init: bool, add_ons: tuple[str, ...] = (), data: Optional[str] = None) -> str:
        kind = "kd" if add_ons else "student"
        return p.add(Run(f"{name}_s{seed}", kind, (TINY,), budget.student, seed, teacher if init else None,
                         "every_other" if init else None, add_ons, data=data))

    kd = distillation(teacher_checkpoint)
    layers = "student from the teacher's layers"
    for seed in seeds(budget):
        p.rows += [Row("distillation", "student from scratch", student("scratch", seed, False), "fp32", seed),
                   Row("distillation", layers, student("layers", seed, True), "fp32", seed),
                   Row("distillation", "+ word-level KD", student("word_kd", seed, True, (kd,)), "fp32", seed)]
    p.rows += [Row("distillation", "+ triple loss (word-level KD + cosine)",
                   student("triple", 1, True, (distillation(teacher_checkpoint, 1.0),)), "fp32", unequal="one seed"),
               Row("distillation", "sequence-level KD", student("sequence_kd", 1, True, data="sequence_kd"), "fp32",
                   unequal="one seed")]
    p.comparisons += [
        Comparison("distillation", layers, "student from scratch",
                   "DistilBERT: initialising from every other teacher layer helps", 0.0, True),
        Comparison("distillation", "+ word-level KD", layers, "word-level KD helps (Hinton et al.; Kim & Rush)", 0.0, True),
        Comparison("distillation", "+ triple loss (word-level KD + cosine)", layers, "DistilBERT's triple loss helps",
                   0.0, True),
        Comparison("distillation", "sequence-level KD", layers, "Kim & Rush: sequence-level KD helps", 0.0, True)]

    # MobileBERT: the bottleneck student by PKT (from the teacher's factorised embeddings) and from scratch.
    pkt = callback("callbacks.ProgressiveKnowledgeTransfer", teacher=teacher_checkpoint, mode="progressive",
                   stage_steps=budget.stage_steps, feature_weight=100.0, attention_weight=1.0, soft_weight=0.5,
                   hard_weight=0.5, temperature=1.0)
    scratch = p.add(Run("bottleneck_scratch_s1", "bottleneck", (TINY, BOTTLENECK), budget.bottleneck, 1))
    transferred = p.add(Run("bottleneck_pkt_s1", "bottleneck", (TINY, BOTTLENECK), budget.bottleneck, 1, teacher,
                            "none", (pkt,)))
    p.rows += [Row("mobilebert", "bottleneck student from scratch", scratch, "fp32", unequal="one seed"),
               Row("mobilebert", "bottleneck student, PKT from the teacher", transferred, "fp32", unequal="one seed")]
    p.comparisons += [Comparison("mobilebert", "bottleneck student, PKT from the teacher",
                                 "bottleneck student from scratch",
                                 "MobileBERT: layer-wise transfer beats training the thin student alone (here: by 1 BLEU)",
                                 1.0, True)]

    # Lottery tickets at 20% of the weights (two prunings of 0.2 ** (r / 2)), rounds of lottery_round.
    rounds, steps = 2, 3 * budget.lottery_round
    prune = {"include": ["model.*"], "prune_embeddings": True, "scope": "global"}

    def pruning(name: str, run_seed: int, run_steps: int, class_path: str, **settings) -> str:
        return p.add(Run(f"{name}_s{run_seed}", "student", (TINY,), run_steps, run_seed,
                         add_ons=(callback(class_path, **prune, **settings),)))

    ticket_name, dense_name = "ticket at 20%, late rewinding", "dense, the tickets' total steps"
    for seed in seeds(budget):
        ticket = pruning("ticket_late", seed, steps, "callbacks.LotteryTicketPruning", sparsity=0.8, rounds=rounds,
                         round_steps=budget.lottery_round, rewind_step=max(1, budget.lottery_round // 25))
        p.rows += [
            Row("lottery", dense_name, p.add(Run(f"dense_s{seed}", "student", (TINY,), steps, seed)), "fp32", seed),
            Row("lottery", ticket_name, ticket, "fp32", seed),
            Row("lottery", "random reinitialisation at 20% (control)", pruning(
                "random_reinit", seed, budget.lottery_round, "callbacks.LotteryTicketPruning", sparsity=0.8, rounds=0,
                round_steps=budget.lottery_round, reinitialize=True, masks_from=f"<masks of {ticket}>", seed=seed),
                "fp32", seed, "one round under the ticket's final masks, as Frankle & Carbin's control")]
    p.rows += [
        Row("lottery", "dense, one round (as the papers)", p.add(Run("dense_one_round_s1", "student", (TINY,),
                                                                     budget.lottery_round, 1)), "fp32",
            unequal="one seed; a third of the tickets' steps"),
        Row("lottery", "ticket at 20%, rewinding to init", pruning(
            "ticket_init", 1, steps, "callbacks.LotteryTicketPruning", sparsity=0.8, rounds=rounds,
            round_steps=budget.lottery_round, rewind_step=0), "fp32", unequal="one seed"),
        Row("lottery", "magnitude pruning to 20%, the tickets' steps", pruning(
            "magnitude", 1, steps, "callbacks.MagnitudePruning", sparsity=0.8, start_step=steps // 10,
            end_step=max(steps // 10 + 1, steps * 3 // 4), frequency=max(1, steps // 60)), "fp32", unequal="one seed")]
    p.comparisons += [
        Comparison("lottery", ticket_name, dense_name, "Frankle et al.: the ticket matches the dense network "
                   "(here: within 1 BLEU of the dense model of the same steps)", -1.0),
        Comparison("lottery", ticket_name, "random reinitialisation at 20% (control)",
                   "the ticket beats its random reinitialisation (here: by 2 BLEU)", 2.0, True),
        Comparison("lottery", ticket_name, "ticket at 20%, rewinding to init",
                   "Frankle et al. 2020: late rewinding beats rewinding to init on large models", 0.0, True),
        Comparison("lottery", "magnitude pruning to 20%, the tickets' steps", ticket_name,
                   "Brix et al.: gradual magnitude pruning is as good as the ticket", -1.0)]
    # Fast CPU students: deep encoder, shallow decoder (6+2, 6+1), from the teacher's whole encoder
    # and its top decoder layers, word-level KD, the 3+3 students' steps; and structured pruning of
    # half the heads and neurons of the base against the fp32 control of the same steps.
    p.rows += [Row("fast_students", "6+6 (the teacher)", teacher),
               Row("fast_students", "3+3 student, word-level KD", "word_kd_s1", "fp32", unequal="one seed")]
    for decoder_layers, picked in STUDENT_DECODER_LAYERS.items():
        p.rows.append(Row("fast_students", f"6+{decoder_layers} student, word-level KD", p.add(Run(
            f"student_6_{decoder_layers}_s1", "kd", (TINY,), budget.student, 1, teacher,
            f"{{encoder: [0, 1, 2, 3, 4, 5], decoder: {picked}}}", (kd,),
            overrides=("--model.encoder_layers=6", f"--model.decoder_layers={decoder_layers}"))), "fp32",
            unequal="one seed"))
    structured = structured_pruning(budget.finetune)
    for seed in seeds(budget):
        p.rows += [Row("fast_students", control, finetune("fp32", (), budget.finetune, seed), "fp32", seed),
                   Row("fast_students", "half the heads and neurons removed", finetune(
                       "structured", (structured,), budget.finetune, seed), None, seed)]
    p.comparisons += [
        Comparison("fast_students", "6+2 student, word-level KD", "3+3 student, word-level KD",
                   "a shallow decoder costs little BLEU (here: within 1 BLEU of the 3+3 student)", -1.0),
        Comparison("fast_students", "half the heads and neurons removed", control,
                   "Michel et al.: many heads can go (here: half the heads and neurons within 1 BLEU)", -1.0)]
    return p


def estimated_hours(run: Run, reference_steps: Optional[int] = None) -> float:
    """Hours of training on 2 CPU cores alone (the plateau's step, once known, for the references)."""
    steps = reference_steps if run.kind in ("reference", "teacher") and reference_steps else run.steps
    return steps / STEPS_PER_SECOND[run.kind] / 3600
