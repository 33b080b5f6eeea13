"""Every callback refuses a bad argument where it is given: one line naming the callback and the argument.

Twenty-odd probes per callback: wrong types (a bool is not an int, a string is not a number, a
single string is not a list of globs), values out of range, files that do not exist or are not
checkpoints, impossible combinations.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from callbacks import (IterativeProductQuantization, KnowledgeDistillation, LotteryTicketPruning, MagnitudePruning,
                       ProgressiveKnowledgeTransfer, QuantizationAwareTraining, QuantNoise, StructuredPruning)
from nmt_lightning.plateau import PlateauStopping

NAN, INF = float("nan"), float("inf")

PROBES = {
    QuantizationAwareTraining: ({}, [
        ("bits", dict(bits="8")), ("bits", dict(bits=8.0)), ("bits", dict(bits=True)), ("bits", dict(bits=1)),
        ("bits", dict(bits=9)), ("bits", dict(bits=None)), ("per_channel", dict(per_channel="yes")),
        ("per_channel", dict(per_channel=1)), ("include", dict(include="model.*")), ("include", dict(include=[])),
        ("include", dict(include=[1])), ("include", dict(include=None)), ("exclude", dict(exclude="x")),
        ("exclude", dict(exclude=[None])), ("quantize_embeddings", dict(quantize_embeddings="no")),
        ("ema_decay", dict(ema_decay="0.9")), ("ema_decay", dict(ema_decay=0)), ("ema_decay", dict(ema_decay=1)),
        ("ema_decay", dict(ema_decay=True)), ("ema_decay", dict(ema_decay=NAN)), ("start_step", dict(start_step="5")),
        ("start_step", dict(start_step=-1)), ("start_step", dict(start_step=True)), ("start_step", dict(start_step=1.5)),
    ]),
    QuantNoise: ({}, [
        ("p", dict(p="0.1")), ("p", dict(p=-0.1)), ("p", dict(p=1.5)), ("p", dict(p=True)), ("p", dict(p=NAN)),
        ("p", dict(p=1.0, scheme="pq")), ("scheme", dict(scheme="int2")), ("scheme", dict(scheme=8)),
        ("block_size", dict(block_size=True)), ("block_size", dict(block_size=0)), ("block_size", dict(block_size="8")),
        ("block_size", dict(block_size=8.0)), ("block_sizes", dict(block_sizes={"*attn*": 0})),
        ("block_sizes", dict(block_sizes={"*attn*": True})), ("block_sizes", dict(block_sizes=[4])),
        ("include", dict(include="*")), ("include", dict(include=[])), ("exclude", dict(exclude="*")),
        ("noise_embeddings", dict(noise_embeddings=0)), ("per_channel", dict(per_channel="true")),
        ("seed", dict(seed=-1)), ("seed", dict(seed="0")), ("seed", dict(seed=2 ** 63)), ("compile", dict(compile=1)),
        ("pq_gradient", dict(scheme="pq", pq_gradient="ste")),
    ]),
    IterativeProductQuantization: ({}, [
        ("steps_per_stage", dict(steps_per_stage=0)), ("steps_per_stage", dict(steps_per_stage=True)),
        ("steps_per_stage", dict(steps_per_stage="100")), ("steps_per_stage", dict(steps_per_stage=10.0)),
        ("stages", dict(stages="*.ffn.*")), ("stages", dict(stages=[])), ("stages", dict(stages=["*.ffn.*"])),
        ("stages", dict(stages=[[]])), ("stages", dict(stages=[[3]])), ("start_step", dict(start_step=-5)),
        ("start_step", dict(start_step=True)), ("centroids", dict(centroids=0)), ("centroids", dict(centroids=70000)),
        ("centroids", dict(centroids=True)), ("block_size", dict(block_size=False)),
        ("block_sizes", dict(block_sizes={"*": -1})), ("centroid_counts", dict(centroid_counts={"*embed*": 0})),
        ("centroid_counts", dict(centroid_counts=["*embed*"])), ("exclude", dict(exclude="*attn*")),
        ("kmeans_iterations", dict(kmeans_iterations=0)), ("kmeans_iterations", dict(kmeans_iterations="20")),
        ("centroid_bits", dict(centroid_bits=4)), ("centroid_bits", dict(centroid_bits=True)),
        ("seed", dict(seed=None)), ("centroids", dict(centroids=65537)), ("stages", dict(stages=5)),
        ("seed", dict(seed=-1)), ("seed", dict(seed=2 ** 63)),
    ]),
    LotteryTicketPruning: (dict(round_steps=10), [
        ("sparsity", dict(sparsity=1.0)), ("sparsity", dict(sparsity=-0.1)), ("sparsity", dict(sparsity="0.8")),
        ("prune_fraction", dict(prune_fraction=1.0)), ("prune_fraction", dict(prune_fraction=-0.5)),
        ("sparsity", dict(sparsity=True)), ("rounds", dict(rounds=None)), ("rounds", dict(rounds=True)),
        ("rounds", dict(rounds=-1)), ("rounds", dict(rounds=2.0)), ("rounds", dict(rounds=0)),
        ("prune_fraction", dict(prune_fraction=0.0)), ("prune_fraction", dict(prune_fraction="0.2")),
        ("round_steps", dict(round_steps=True)), ("round_steps", dict(round_steps=0)),
        ("round_steps", dict(round_steps=None)), ("round_epochs", dict(round_steps=None, round_epochs=0)),
        ("round_steps", dict(round_epochs=2)), ("rewind_step", dict(rewind_step=10)),
        ("rewind_step", dict(rewind_step=-1)), ("rewind_step", dict(rewind_step="40")),
        ("schedule", dict(schedule="rewind")), ("scope", dict(scope="model")), ("include", dict(include="*")),
        ("exclude", dict(exclude=[2])), ("prune_embeddings", dict(prune_embeddings="yes")),
        ("reinitialize", dict(reinitialize=1)), ("masks_from", dict(masks_from="no/such.ckpt")),
        ("masks_from", dict(masks_from=3)), ("seed", dict(seed=1.0)), ("include", dict(include=[])),
        ("seed", dict(seed=-1)), ("seed", dict(seed=2 ** 63)),  # its seeds: 0 .. 2 ** 63 - 1
    ]),
    MagnitudePruning: ({}, [
        ("sparsity", dict(sparsity=1)), ("sparsity", dict(sparsity="0.5")), ("sparsity", dict(sparsity=NAN)),
        ("sparsity", dict(sparsity=-0.25)),
        ("sparsity", dict(sparsity=False)), ("end_step", dict(end_step=0)), ("end_step", dict(end_step=True)),
        ("end_step", dict(end_step="1000")), ("end_step", dict(start_step=100, end_step=100)),
        ("start_step", dict(start_step=-1)), ("start_step", dict(start_step=2.5)), ("start_step", dict(start_step=None)),
        ("frequency", dict(frequency=0)), ("frequency", dict(frequency=True)), ("frequency", dict(frequency="10")),
        ("scope", dict(scope="Global")), ("scope", dict(scope=None)), ("include", dict(include="*")),
        ("include", dict(include=[])), ("exclude", dict(exclude="x")), ("exclude", dict(exclude=[""])),
        ("prune_embeddings", dict(prune_embeddings=None)), ("prune_embeddings", dict(prune_embeddings=0)),
    ]),
    StructuredPruning: ({}, [
        ("prune_heads", dict(prune_heads=1)), ("prune_heads", dict(prune_heads="0.5")), ("prune_heads", dict(prune_heads=NAN)),
        ("prune_heads", dict(prune_heads=-0.1)), ("prune_heads", dict(prune_heads=True)),
        ("prune_neurons", dict(prune_neurons=1.5)), ("prune_neurons", dict(prune_neurons=None)),
        ("prune_heads and prune_neurons", dict(prune_heads=0, prune_neurons=0.0)),
        ("importance", dict(importance="Taylor")), ("importance", dict(importance=None)),
        ("scope", dict(scope="model")), ("scope", dict(scope=["layer"])),
        ("start_step", dict(start_step=0)), ("start_step", dict(start_step=-1, importance="magnitude")),
        ("start_step", dict(start_step=1.0)), ("start_step", dict(start_step=True)),
        ("end_step", dict(start_step=100, end_step=99)), ("end_step", dict(end_step="1000")),
        ("frequency", dict(frequency=0)), ("frequency", dict(frequency=False)),
        ("include", dict(include="*attn")), ("include", dict(include=[])), ("exclude", dict(exclude=[1])),
        ("attention_layers", dict(attention_layers=["q", "k", "v"])), ("attention_layers", dict(attention_layers="qkvo")),
        ("feed_forward_layers", dict(feed_forward_layers=["fc1", "fc1"])),
        ("attention_layers", dict(attention_layers=4)),
        ("feed_forward_layers", dict(feed_forward_layers=["fc1", "ffn.fc2"])),
        ("feed_forward_layers", dict(feed_forward_layers=["fc1", ""])),
        ("masks_from", dict(masks_from="no/such/checkpoint.ckpt")), ("masks_from", dict(masks_from=3)),
    ]),
}
TEACHER_PROBES = {
    KnowledgeDistillation: [
        ("temperature", dict(temperature=0)), ("temperature", dict(temperature=NAN)),
        ("temperature", dict(temperature="2")), ("temperature", dict(temperature=True)),
        ("soft_weight", dict(soft_weight=-1.0)), ("soft_weight", dict(soft_weight="0.5")),
        ("hard_weight", dict(hard_weight=INF)), ("hard_weight", dict(hard_weight=True)),
        ("hidden_weight", dict(hidden_weight=-0.5)), ("soft_weight", dict(soft_weight=0.0)),
        ("layer_map", dict(hidden_weight=1.0, layer_map={"decoder.x": "decoder.1"})),
        ("layer_map", dict(hidden_weight=1.0, layer_map={"encoder.1": "decoder.1"})),
        ("layer_map", dict(hidden_weight=1.0, layer_map={})), ("layer_map", dict(layer_map=["decoder.1"])),
        ("teacher_inputs", dict(teacher_inputs="source")), ("teacher_inputs", dict(teacher_inputs=[])),
        ("teacher_inputs", dict(teacher_inputs=[True])), ("teacher_inputs", dict(teacher_inputs=[-1])),
        ("teacher", dict(teacher="")), ("teacher", dict(teacher="no/such.ckpt")), ("teacher", dict(teacher=5)),
        ("teacher", dict(teacher="GARBAGE")), ("teacher_loader", dict(teacher_loader="no.such.loader")),
        ("teacher_loader", dict(teacher_loader=3)),
    ],
    ProgressiveKnowledgeTransfer: [
        ("mode", dict(mode="pkt")), ("mode", dict(mode=None)), ("stage_steps", dict(stage_steps=0)),
        ("stage_steps", dict(stage_steps=True)), ("stage_steps", dict(stage_steps="10")),
        ("temperature", dict(temperature=0)), ("feature_weight", dict(feature_weight=-1.0)),
        ("feature_weight", dict(feature_weight="100")), ("attention_weight", dict(attention_weight=NAN)),
        ("feature_weight", dict(feature_weight=0.0, attention_weight=0.0)),
        ("soft_weight", dict(soft_weight=0.0, hard_weight=0.0)), ("hard_weight", dict(hard_weight=False)),
        ("sides", dict(sides=["encoder", "middle"])), ("sides", dict(sides="encoder")),
        ("sides", dict(sides=["encoder", "encoder"])), ("layer_modules", dict(layer_modules={"both": "model.layers"})),
        ("layer_modules", dict(layer_modules={"encoder": 3})), ("layer_modules", dict(layer_modules=["x"])),
        ("embedding_modules", dict(embedding_modules={"encoder": "model.src_embed"})),
        ("embedding_modules", dict(embedding_modules={"encoder": ["model.src_embed", 3]})),
        ("embedding_modules", dict(embedding_modules={"decoder": [""]})),
        ("teacher_layers", dict(teacher_layers={"decoder": b"\x02"})),
        ("copy_embeddings", dict(copy_embeddings="no")), ("teacher_layers", dict(teacher_layers={"encoder": [1.5]})),
        ("teacher_layers", dict(teacher_layers={"encoder": [0]})), ("teacher_layers", dict(teacher_layers={"encoder": []})),
        ("teacher_inputs", dict(teacher_inputs="source")), ("teacher", dict(teacher="no/such.ckpt")),
        ("teacher", dict(teacher="GARBAGE")), ("soft_weight", dict(soft_weight="0.5")), ("sides", dict(sides=[])),
        ("teacher_loader", dict(teacher_loader="no.such.loader")), ("teacher_loader", dict(teacher_loader=3)),
    ],
}
PLATEAU_PROBES = [
    ("monitor", dict(monitor="")), ("monitor", dict(monitor=3)), ("min_gain", dict(min_gain="0.3")),
    ("min_gain", dict(min_gain=NAN)), ("min_gain", dict(min_gain=True)), ("window", dict(window=0)),
    ("window", dict(window=0.75)), ("window", dict(window="0.25")), ("min_steps", dict(min_steps=-1)),
    ("min_steps", dict(min_steps=True)), ("min_steps", dict(min_steps=1.5)), ("min_validations", dict(min_validations=0)),
    ("min_validations", dict(min_validations="2")), ("record", dict(record=5)),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("arguments")
    torch.save({"state_dict": {}}, folder / "teacher.ckpt")
    (folder / "garbage.ckpt").write_text("not a checkpoint\n", encoding="utf-8")
    return {"teacher": str(folder / "teacher.ckpt"), "GARBAGE": str(folder / "garbage.ckpt")}


def assert_one_line_naming(error: BaseException, owner: str, argument: str) -> None:
    """One line that starts with the callback and the argument ("QuantNoise: p must be ...")."""
    message = str(error)
    assert "\n" not in message, message
    assert message.startswith(f"{owner}: {argument}"), message


def cases(table: dict) -> list:
    return [pytest.param(cls, base, argument, settings, id=f"{cls.__name__}-{argument}-{index}")
            for cls, (base, probes) in table.items() for index, (argument, settings) in enumerate(probes)]


@pytest.mark.parametrize(("cls", "base", "argument", "settings"), cases(PROBES))
def test_a_bad_argument_is_refused_in_one_line(cls, base: dict, argument: str, settings: dict) -> None:
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as caught:
        cls(**{**base, **settings})
    assert_one_line_naming(caught.value, cls.__name__, argument)


@pytest.mark.parametrize(("cls", "base", "argument", "settings"),
                         cases({cls: ({}, probes) for cls, probes in TEACHER_PROBES.items()}))
def test_a_bad_distillation_argument_is_refused_in_one_line(files: dict, cls, base: dict, argument: str,
                                                            settings: dict) -> None:
    settings = {key: files.get(value, value) if isinstance(value, str) else value for key, value in settings.items()}
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as caught:
        cls(**{"teacher": files["teacher"], **settings})
    assert_one_line_naming(caught.value, cls.__name__, argument)


@pytest.mark.parametrize(("argument", "settings"), PLATEAU_PROBES)
def test_a_bad_plateau_argument_is_refused_in_one_line(argument: str, settings: dict) -> None:
    with pytest.raises(ValueError) as caught:
        PlateauStopping(**settings)
    assert_one_line_naming(caught.value, "PlateauStopping", argument)


@pytest.mark.parametrize("cls", [*PROBES, *TEACHER_PROBES])
def test_the_defaults_and_good_values_are_accepted(files: dict, cls) -> None:
    """Good values of every type pass: ints for floats, tuples for lists, a Path for a file."""
    extra = {LotteryTicketPruning: dict(round_steps=1, rewind_step=0, sparsity=1 / 2, schedule="restart",
                                        seed=2 ** 63 - 1),
             KnowledgeDistillation: dict(teacher=Path(files["teacher"]), temperature=1, soft_weight=1,
                                         layer_map={"decoder.1": "decoder.2"}, teacher_inputs=[0, "source"]),
             ProgressiveKnowledgeTransfer: dict(teacher=files["teacher"], teacher_layers={"encoder": (2, 4)},
                                                layer_modules={"encoder": "model.blocks"},
                                                embedding_modules={"decoder": ("model.embed", "model.scale")}),
             QuantNoise: dict(p=0, include=("model.*",), block_sizes={"*attn*": 4}, seed=2 ** 63 - 1),
             IterativeProductQuantization: dict(stages=(("*.ffn.*",),), centroid_counts={"*embed*": 4096},
                                                centroids=1, seed=2 ** 63 - 1),
             MagnitudePruning: dict(sparsity=0, frequency=1), QuantizationAwareTraining: dict(bits=4),
             StructuredPruning: dict(prune_heads=0, prune_neurons=1 / 2, importance="magnitude", start_step=0,
                                     end_step=0, include=("model.*",))}
    made = cls(**extra.get(cls, {}))
    if cls is ProgressiveKnowledgeTransfer:
        assert made.layer_modules["encoder"] == "model.blocks"
        assert made.embedding_modules["decoder"] == ["model.embed", "model.scale"]
        assert made.teacher_layers == {"encoder": [2, 4]}


# The defaults, as the papers (and fairseq's code) set them: a changed default changes the method.
DEFAULTS = {
    QuantizationAwareTraining: dict(bits=8, per_channel=False, include=("*",), exclude=(), quantize_embeddings=True,
                                    ema_decay=0.99, start_step=0),  # Q8BERT: 8 bits, EMA of max|x|
    QuantNoise: dict(p=0.1, scheme="int8", block_size=8, block_sizes=None, include=("*",), exclude=(),
                     noise_embeddings=True, per_channel=True, seed=0, compile=False,
                     pq_gradient="straight_through"),  # Fan et al.: p 0.05-0.2, blocks of 8, STE
    IterativeProductQuantization: dict(steps_per_stage=1000, start_step=0, centroids=256, block_size=8, block_sizes=None,
                                       centroid_counts=None, exclude=(), kmeans_iterations=20, centroid_bits=16,
                                       seed=0),  # Stock et al.: 256 codewords, blocks of 8 (4 in attention)
    LotteryTicketPruning: dict(sparsity=0.8, rounds=1, prune_fraction=None, round_steps=None, round_epochs=None,
                               rewind_step=0, schedule="continue", scope="global", include=("*",), exclude=(),
                               prune_embeddings=False, reinitialize=False, masks_from=None, seed=0),
    MagnitudePruning: dict(sparsity=0.8, end_step=1000, start_step=0, frequency=100, scope="global", include=("*",),
                           exclude=(), prune_embeddings=False),  # Zhu & Gupta's cubic schedule
    StructuredPruning: dict(prune_heads=0.5, prune_neurons=0.5, importance="taylor", scope="layer", start_step=100,
                            end_step=1000, frequency=100, include=("*",), exclude=(),
                            attention_layers=("q_proj", "k_proj", "v_proj", "out_proj"),
                            feed_forward_layers=("fc1", "fc2"), masks_from=None),  # Michel et al.; Zhu & Gupta
    KnowledgeDistillation: dict(teacher_loader=None, temperature=2.0, soft_weight=0.5, hard_weight=0.5,
                                hidden_weight=0.0, layer_map=None, teacher_inputs=("source", "decoder_input")),
    ProgressiveKnowledgeTransfer: dict(teacher_loader=None, mode="progressive", stage_steps=1000, feature_weight=100.0,
                                       attention_weight=1.0, soft_weight=0.5, hard_weight=0.5, temperature=1.0,
                                       sides=("encoder", "decoder"), layer_modules=None, embedding_modules=None,
                                       copy_embeddings=True, teacher_layers=None,
                                       teacher_inputs=("source", "decoder_input")),  # MobileBERT's Model Garden
}


@pytest.mark.parametrize("cls", list(DEFAULTS))
def test_the_defaults_are_the_papers(cls, files: dict) -> None:
    import inspect

    from callbacks.product_quantization import DEFAULT_STAGES

    found = {name: parameter.default for name, parameter in inspect.signature(cls).parameters.items()
             if parameter.default is not inspect.Parameter.empty}
    expected = dict(DEFAULTS[cls])
    if cls is IterativeProductQuantization:
        expected["stages"] = DEFAULT_STAGES
    assert found == expected
    # And what an instance made without arguments holds (the signature alone would not show a
    # default that the body replaces).
    required = {LotteryTicketPruning: dict(round_steps=10), KnowledgeDistillation: dict(teacher=files["teacher"]),
                ProgressiveKnowledgeTransfer: dict(teacher=files["teacher"])}.get(cls, {})
    instance = cls(**required)
    held = {name: getattr(instance, name) for name, value in expected.items()
            if hasattr(instance, name) and isinstance(value, (bool, int, float, str))}
    assert held == {name: expected[name] for name in held} and len(held) >= 3


class Unsafe:
    """An object whose unpickling would run code."""


def test_masks_from_is_read_safely(files: dict, tmp_path: Path) -> None:
    """masks_from is checked where given (a file) and read when training starts: a file that is no
    checkpoint, and one holding Python objects, are refused in one line; a checkpoint's contents
    come back as tensors on the CPU."""
    from compression_contract.checkpoints import read_checkpoint

    ticket = LotteryTicketPruning(rounds=0, round_steps=10, masks_from=files["GARBAGE"])
    with pytest.raises(ValueError, match=r"^LotteryTicketPruning: masks_from .*garbage.ckpt: not a checkpoint"):
        read_checkpoint(ticket.masks_from, "LotteryTicketPruning: masks_from")
    torch.save({"state_dict": {}, "payload": Unsafe()}, tmp_path / "unsafe.ckpt")
    with pytest.raises(ValueError, match=r"^Owner: masks_from .*unsafe.ckpt: refused to load: it holds Python "
                                         r"objects that unpickling would run"):
        read_checkpoint(tmp_path / "unsafe.ckpt", "Owner: masks_from")
    torch.save({"state_dict": {"m": torch.ones(2)}}, tmp_path / "good.ckpt")
    assert read_checkpoint(tmp_path / "good.ckpt", "Owner: masks_from")["state_dict"]["m"].device.type == "cpu"
    with pytest.raises(FileNotFoundError, match=r"^Owner: masks_from .*gone.ckpt: no such file$"):
        read_checkpoint(tmp_path / "gone.ckpt", "Owner: masks_from")


@pytest.mark.parametrize("block_sizes", [{3: 4}, {"": 4}, {"*fc*": 4, 0: 8}])
def test_a_glob_mapping_whose_keys_are_not_all_globs_is_refused(block_sizes: dict) -> None:
    from callbacks import QuantNoise

    with pytest.raises(ValueError) as error:
        QuantNoise(block_sizes=block_sizes)
    assert_one_line_naming(error.value, "QuantNoise", "block_sizes")


@pytest.mark.parametrize(("cls", "settings", "allowed"), [
    (QuantizationAwareTraining, dict(ema_decay=1), "a finite number in (0, 1), got 1"),
    (QuantizationAwareTraining, dict(bits=9), "an integer in [2, 8], got 9"),
    (LotteryTicketPruning, dict(round_steps=10, sparsity=1.0), "a finite number in [0, 1), got 1.0"),
    (LotteryTicketPruning, dict(round_steps=10, prune_fraction=0), "a finite number in (0, 1), got 0"),
    (QuantizationAwareTraining, dict(start_step=-1), "an integer >= 0, got -1"),
])
def test_the_message_states_the_range_with_its_open_and_closed_ends(cls, settings: dict, allowed: str) -> None:
    """An open end is said with a parenthesis, a closed one with a bracket: "[0, 1)" tells a user
    that 0 is allowed and 1 is not, which "[0, 1]" would get wrong."""
    with pytest.raises(ValueError) as caught:
        cls(**settings)
    assert str(caught.value).endswith(f"must be {allowed}"), str(caught.value)
