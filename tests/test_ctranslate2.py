"""CTranslate2 deployment: conversion exact against our decoder, compressed checkpoints, CLI, errors.

Skipped where ctranslate2 is not installed (it is an optional extra; ``pip install -e .[dev]``
and CI install it), except the test of the error a missing extra gives.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from callbacks import QuantizationAwareTraining
from nmt_lightning.bpe import BOS_ID, EOS_ID
from nmt_lightning.loading import load_translation_module
from nmt_lightning.cli import main
from nmt_lightning.data import TranslationDataModule
from nmt_lightning.deploy import CTranslate2Model, convert_to_ctranslate2, require_ctranslate2
from nmt_lightning.deploy.ctranslate2_converter import convert_module
from nmt_lightning.translation_file import export_checkpoint
from nmt_lightning.module import TranslationModule
from nmt_lightning.prepare import prepare
from nmt_lightning.tokenization import Tokenization
from nmt_lightning.translate import translate_lines
from tests.conftest import prepare_config, synthetic_pairs, train_tiny_checkpoint, write_parallel

ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is an optional extra: pip install -e .[ctranslate2]")

# Both engines compute in fp32 but sum in different orders (MKL's sgemm against torch's
# kernels, fused q/k/v): each logit carries a relative error of some 1e-6 after the model's few
# layers, and log-probabilities here stay under 20 in magnitude, so 1e-4 absolute is about
# 100x the expected difference and far below what a misplaced weight, a norm in the wrong place
# or the wrong position table does (> 0.1).
LOG_PROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def separate_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared synthetic corpus with one sentencepiece model per language."""
    root = tmp_path_factory.mktemp("separate")
    pairs = synthetic_pairs(300, seed=2)
    files = {"train": write_parallel(root / "raw" / "train", pairs[:260]),
             "valid": write_parallel(root / "raw" / "valid", pairs[260:280]),
             "test": write_parallel(root / "raw" / "test", pairs[280:])}
    prepare(prepare_config(files, root / "data", joint_vocab=False, vocab_size=48))
    return root / "data"


def random_module(data_dir: Path, share_embeddings: str, pre_norm: bool, seed: int = 0) -> TranslationModule:
    """A 2+2-layer model of random weights, LayerNorms and biases included (an untrained model
    has gamma 1, beta 0 and zero biases, which would hide a norm or bias put in the wrong place)."""
    torch.manual_seed(seed)
    datamodule = TranslationDataModule(str(data_dir), max_tokens=256)
    module = TranslationModule(datamodule.src_vocab_size, datamodule.tgt_vocab_size, d_model=32, ffn_dim=64, heads=2,
                               encoder_layers=2, decoder_layers=2, dropout=0.0, share_embeddings=share_embeddings,
                               pre_norm=pre_norm, max_positions=64)
    module.tokenization = Tokenization.from_datamodule(datamodule)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return module.eval()


def lines_of(data_dir: Path, count: int = 16) -> list[str]:
    return (data_dir / "test.en").read_text(encoding="utf-8").splitlines()[:count]


def our_log_probs(module: TranslationModule, source: list[int], target: list[int]) -> torch.Tensor:
    """log p(target[t] | ...) for target + eos, from our model (teacher forcing)."""
    src = torch.tensor([source + [EOS_ID]])
    decoder_input = torch.tensor([[BOS_ID] + target])
    with torch.no_grad():
        log_probs = module.model(src, decoder_input).float().log_softmax(-1)[0]
    return log_probs.gather(1, torch.tensor(target + [EOS_ID]).unsqueeze(1)).squeeze(1)


def assert_same_model(module: TranslationModule, directory: Path, lines: list[str]) -> None:
    """Teacher-forced log-probabilities agree at every position, and greedy translations are identical."""
    translator = ctranslate2.Translator(str(directory), intra_threads=1)
    source_ids = module.tokenization.encode_source(lines)
    # Any target text, within the model's 64 positions.
    target_ids = [ids[:40] for ids in module.tokenization._processor("tgt").encode(lines[::-1], out_type=int)]
    to_pieces = module.tokenization._processor("src").id_to_piece
    to_target_pieces = module.tokenization._processor("tgt").id_to_piece
    scored = translator.score_batch([to_pieces(s) for s in source_ids], [to_target_pieces(t) for t in target_ids])
    for source, target, result in zip(source_ids, target_ids, scored):
        torch.testing.assert_close(torch.tensor(result.log_probs), our_log_probs(module, source, target),
                                   rtol=0, atol=LOG_PROB_TOLERANCE)
    ours = translate_lines(module, lines, beam=1, batch_size=4, progress=False)
    theirs = CTranslate2Model(directory, threads=1).translate_lines(lines, beam=1, batch_size=4, progress=False)
    assert theirs == ours


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("share_embeddings", ["all", "decoder", "none"])
def test_conversion_is_exact(share_embeddings: str, pre_norm: bool, prepared_dir: Path, separate_vocab_dir: Path,
                             tmp_path: Path) -> None:
    data_dir = prepared_dir if share_embeddings == "all" else separate_vocab_dir
    module = random_module(data_dir, share_embeddings, pre_norm)
    report = convert_module(module, tmp_path / "ct2")
    assert report.quantization == "float32" and (tmp_path / "ct2" / "model.bin").is_file()
    assert_same_model(module, tmp_path / "ct2", lines_of(data_dir))


def test_beam_search_scores_agree(prepared_dir: Path, trained_checkpoint: Path, tmp_path: Path) -> None:
    """Beam search: both engines rank with log p / length (length penalty 1); where they return
    the same translation, its score is the same."""
    convert_to_ctranslate2(trained_checkpoint, tmp_path / "ct2")
    module = load_translation_module(trained_checkpoint)
    lines = lines_of(prepared_dir, 24)
    ours = translate_lines(module, lines, beam=4, batch_size=8, progress=False)
    theirs = CTranslate2Model(tmp_path / "ct2", threads=1).translate_lines(lines, beam=4, batch_size=8, progress=False)
    same = sum(a == b for a, b in zip(ours, theirs))
    # The two beam searches stop differently (ours: when every hypothesis of a sentence has
    # ended; CTranslate2: when the best one has), which may change a few translations.
    assert same >= len(lines) * 3 // 4, (same, list(zip(ours, theirs)))


def test_qat_checkpoint_converts_with_its_trained_grid(prepared_dir: Path, tmp_path: Path) -> None:
    checkpoint = train_tiny_checkpoint(prepared_dir, tmp_path / "qat",
                                       callbacks=(QuantizationAwareTraining(per_channel=True, include=["model.*"]),))
    # float32: the dequantized int8 grid, exactly what our model computes its products with.
    convert_to_ctranslate2(checkpoint, tmp_path / "fp32")
    grid = load_translation_module(checkpoint, runtime_layers=False)
    linear = grid.model.decoder_layers[0].ffn.fc1
    steps = linear.weight / linear.weight.abs().amax(1, keepdim=True) * 127  # whole numbers on a per-row grid
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)
    assert_same_model(grid, tmp_path / "fp32", lines_of(prepared_dir))
    # int8: CTranslate2 quantizes the grid per row again, 1 byte per weight plus a 4-byte scale per
    # row instead of 4 bytes per weight (the position tables stay fp32), less at most 64 bytes per
    # matrix for its scale's entry (name and header) in model.bin.
    report = convert_to_ctranslate2(checkpoint, tmp_path / "int8", "int8")
    matrices = {id(p): p for p in grid.model.parameters() if p.dim() == 2}.values()
    saved = sum(3 * p.numel() - 4 * p.shape[0] - 64 for p in matrices)
    assert (tmp_path / "fp32" / "model.bin").stat().st_size - report.model_bytes >= saved
    translations = CTranslate2Model(tmp_path / "int8").translate_lines(lines_of(prepared_dir), progress=False)
    assert len(translations) == 16 and any(translations)


def test_conversion_leaves_the_model_unchanged(prepared_dir: Path, tmp_path: Path) -> None:
    module = random_module(prepared_dir, "all", pre_norm=True)
    before = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    for quantization in ("int8", "int16", "float16"):
        convert_module(module, tmp_path / quantization, quantization)
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_export_file_converts(trained_checkpoint: Path, prepared_dir: Path, tmp_path: Path) -> None:
    export_checkpoint(trained_checkpoint, tmp_path / "model.safetensors")
    convert_to_ctranslate2(tmp_path / "model.safetensors", tmp_path / "ct2")
    assert_same_model(load_translation_module(trained_checkpoint), tmp_path / "ct2", lines_of(prepared_dir))


def test_cli_export_and_translate(trained_checkpoint: Path, prepared_dir: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "ct2"
    assert main(["export", "--format", "ctranslate2", "--checkpoint", str(trained_checkpoint), "--output", str(output),
                 "--quantization", "int8"]) == 0
    assert "CTranslate2 model, weights int8" in capsys.readouterr().err
    hypotheses = tmp_path / "test.hyp"
    assert main(["translate", "--checkpoint", str(output), "--input", str(prepared_dir / "test.en"),
                 "--output", str(hypotheses), "--ref", str(prepared_dir / "test.cs"), "--beam", "2"]) == 0
    err = capsys.readouterr().err
    assert "BLEU (cased)" in err and "chrF2" in err
    lines = (prepared_dir / "test.en").read_text(encoding="utf-8").splitlines()
    expected = CTranslate2Model(output).translate_lines(lines, beam=2, progress=False)
    assert hypotheses.read_text(encoding="utf-8").splitlines() == expected
    # Our own options are refused where they do not apply, naming them.
    assert main(["translate", "--checkpoint", str(trained_checkpoint), "--parallel-batches", "2",
                 "--input", str(prepared_dir / "test.en")]) == 2
    assert "--parallel-batches applies to CTranslate2" in capsys.readouterr().err
    assert main(["export", "--format", "ctranslate2", "--checkpoint", str(trained_checkpoint), "--output",
                 str(tmp_path / "other"), "--quantize", "int8"]) == 2
    assert "--quantization" in capsys.readouterr().err


def test_bad_output_paths(trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def export(output: Path, *extra: str) -> str:
        assert main(["export", "--format", "ctranslate2", "--checkpoint", str(trained_checkpoint),
                     "--output", str(output), *extra]) == 2
        return capsys.readouterr().err

    (tmp_path / "file").write_text("x")
    assert "is a file" in export(tmp_path / "file")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    assert "not a CTranslate2 model" in export(tmp_path / "notes", "--force")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"  # nothing lost
    assert main(["export", "--format", "ctranslate2", "--checkpoint", str(trained_checkpoint),
                 "--output", str(tmp_path / "model")]) == 0
    assert "--force replaces it" in export(tmp_path / "model")
    assert main(["export", "--format", "ctranslate2", "--checkpoint", str(trained_checkpoint),
                 "--output", str(tmp_path / "model"), "--force", "--quantization", "int16"]) == 0
    assert "no such checkpoint" in export(tmp_path / "other", "--checkpoint", str(tmp_path / "missing.ckpt"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left behind


def test_unsupported_model_is_refused(prepared_dir: Path, tmp_path: Path) -> None:
    module = random_module(prepared_dir, "all", pre_norm=False)
    module.model.decoder_layers[0].ffn = torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.Linear(8, 32))
    with pytest.raises(ValueError, match="feed-forward block is not two plain nn.Linear"):
        convert_module(module, tmp_path / "ct2")
    assert not (tmp_path / "ct2").exists()


@pytest.mark.parametrize("architecture, message", [
    (dict(bottleneck_dim=16), "BottleneckEncoderLayer .* is not a standard Transformer layer"),
    (dict(embedding_dim=16), "embeddings of width 16 projected to d_model=32 have no place"),
])
def test_bottleneck_students_are_refused(prepared_dir: Path, tmp_path: Path, architecture: dict, message: str) -> None:
    datamodule = TranslationDataModule(str(prepared_dir), max_tokens=256)
    module = TranslationModule(datamodule.src_vocab_size, datamodule.tgt_vocab_size, d_model=32, ffn_dim=64, heads=2,
                               encoder_layers=1, decoder_layers=1, **architecture)
    module.tokenization = Tokenization.from_datamodule(datamodule)
    with pytest.raises(ValueError, match=message):
        convert_module(module, tmp_path / "ct2")


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch, trained_checkpoint: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # import ctranslate2 now raises ImportError
    with pytest.raises(ImportError, match=r"\.\[ctranslate2\]"):
        require_ctranslate2()
    assert main(["export", "--format", "ctranslate2", "--checkpoint", str(trained_checkpoint),
                 "--output", str(tmp_path / "ct2")]) == 2
    assert "pip install -e '.[ctranslate2]'" in capsys.readouterr().err


def test_a_product_quantized_checkpoint_converts_with_its_codewords(prepared_dir: Path, tmp_path: Path) -> None:
    from callbacks import IterativeProductQuantization

    checkpoint = train_tiny_checkpoint(prepared_dir, tmp_path / "ipq", callbacks=(
        IterativeProductQuantization(steps_per_stage=8, centroids=16),))
    convert_to_ctranslate2(checkpoint, tmp_path / "ct2")
    decoded = load_translation_module(checkpoint, runtime_layers=False)  # every weight its codewords, dense
    assert len(torch.unique(decoded.model.decoder_layers[0].ffn.fc1.weight.view(-1, 8), dim=0)) <= 16
    assert_same_model(decoded, tmp_path / "ct2", lines_of(prepared_dir))


def structurally_pruned_checkpoint(data_dir: Path, path: Path, scope: str) -> Path:
    """A random 2+2 model (2 heads of 16 per attention) structurally pruned and saved as a
    checkpoint. "layer": half the heads and neurons of every layer, by magnitude. "global": a
    quarter of the heads, by importances set so that the second encoder layer loses one head
    and the first none (uneven)."""
    from callbacks import StructuredPruning

    module = random_module(data_dir, "all", pre_norm=False)
    if scope == "layer":
        pruning = StructuredPruning(prune_heads=0.5, prune_neurons=0.5, importance="magnitude", start_step=0, end_step=0)
        pruning.setup(None, module, "fit")
        pruning.on_train_start(None, module)
    else:
        pruning = StructuredPruning(prune_heads=0.25, prune_neurons=0.0, scope="global", start_step=1, end_step=1)
        pruning.setup(None, module, "fit")
        # attentions in order: encoder 0, encoder 1, decoder 0 self, cross, decoder 1 self, cross
        pruning.scores = torch.tensor([1.0, 1.0] + [1.0, 0.001] * 5, dtype=torch.float64)
    pruning.prune(step=pruning.end_step)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    pruning.on_save_checkpoint(None, module, checkpoint)
    torch.save(checkpoint, path)
    return path


def test_a_structurally_pruned_model_converts_exactly(prepared_dir: Path, tmp_path: Path) -> None:
    """One head of 16 left in every attention (CTranslate2's head_dim option, as d_model / heads
    would be 32) and 32 of 64 neurons per layer: CTranslate2 computes what our decoder does."""
    from nmt_lightning.translation_file import load_exported

    checkpoint = structurally_pruned_checkpoint(prepared_dir, tmp_path / "pruned.ckpt", "layer")
    export_checkpoint(checkpoint, tmp_path / "pruned.safetensors")
    ours = load_exported(tmp_path / "pruned.safetensors", runtime_layers=False)
    assert {layer.self_attn.heads for layer in ours.model.encoder_layers} == {1}
    assert {layer.ffn.fc1.out_features for layer in ours.model.decoder_layers} == {32}
    convert_to_ctranslate2(tmp_path / "pruned.safetensors", tmp_path / "ct2")
    assert_same_model(ours, tmp_path / "ct2", lines_of(prepared_dir))


def test_uneven_heads_are_refused_with_the_reason(prepared_dir: Path, tmp_path: Path) -> None:
    """Our decoder runs a globally pruned model; CTranslate2 cannot hold it, and says why."""
    from nmt_lightning.translation_file import load_exported

    checkpoint = structurally_pruned_checkpoint(prepared_dir, tmp_path / "pruned.ckpt", "global")
    export_checkpoint(checkpoint, tmp_path / "pruned.safetensors")
    ours = load_exported(tmp_path / "pruned.safetensors")
    assert [layer.self_attn.heads for layer in ours.model.encoder_layers] == [2, 1]
    assert translate_lines(ours, lines_of(prepared_dir, 2), beam=2, progress=False)  # decodes
    with pytest.raises(ValueError, match=r"the encoder's attention modules have \[1, 2\] heads; CTranslate2 holds one "
                                         r"number of heads per stack .*\(scope='layer'\)"):
        convert_to_ctranslate2(tmp_path / "pruned.safetensors", tmp_path / "ct2")


class RecordingTranslator:
    """Stands in for a ctranslate2.Translator: runs each batch at once and keeps every best
    hypothesis (its pieces, as the engine returned them)."""

    def __init__(self, translator) -> None:
        self.translator, self.hypotheses = translator, []

    def translate_batch(self, batch, asynchronous: bool = False, **options):
        results = self.translator.translate_batch(batch, **options)
        self.hypotheses += [result.hypotheses[0] for result in results]
        return [type("Done", (), {"result": lambda self, found=result: found})() for result in results]


def test_max_output_tokens_stops_each_search_after_that_many_tokens(trained_checkpoint: Path, prepared_dir: Path,
                                                                     tmp_path: Path) -> None:
    """Greedy search cut after k tokens is the first k tokens of the uncut greedy search (each step
    depends only on the tokens before it); beam search cut after one token returns at most one."""
    convert_to_ctranslate2(trained_checkpoint, tmp_path / "ct2")
    model = CTranslate2Model(tmp_path / "ct2", threads=1)
    model.translator = RecordingTranslator(model.translator)
    lines = lines_of(prepared_dir, 40)
    model.translate_lines(lines, beam=1, progress=False)
    uncut, model.translator.hypotheses = model.translator.hypotheses, []
    model.translate_lines(lines, beam=1, progress=False, max_output_tokens=3)
    assert [h[:3] for h in uncut] == model.translator.hypotheses and any(len(h) > 3 for h in uncut)
    model.translator.hypotheses = []
    model.translate_lines(lines, beam=4, progress=False, max_output_tokens=1)
    assert len(model.translator.hypotheses) == len(lines) and all(len(h) <= 1 for h in model.translator.hypotheses)
    with pytest.raises(ValueError, match="max_output_tokens must be None or >= 1, got 0"):
        model.translate_lines(lines, max_output_tokens=0)


def test_translating_with_a_converted_model_does_not_import_lightning() -> None:
    """A process that only translates with CTranslate2 (``nmt-lightning translate DIR``, the
    benchmarks' workers) loads neither Lightning nor the training module: Lightning's import
    costs seconds per process. A fresh interpreter, as this test process has Lightning loaded."""
    import subprocess

    code = ("import sys\n"
            "import nmt_lightning.cli, nmt_lightning.deploy, nmt_lightning.evaluation\n"
            "from nmt_lightning.deploy import CTranslate2Model\n"
            "loaded = sorted(name for name in ('lightning', 'nmt_lightning.module') if name in sys.modules)\n"
            "print(','.join(loaded))\n")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == ""
