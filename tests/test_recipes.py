"""Every shipped YAML recipe parses and instantiates; the tiny recipe runs a fast_dev_run."""

from pathlib import Path

import pytest
import torch

from nmt_lightning.cli import main
from nmt_lightning.lightning_cli import TranslationCLI
from nmt_lightning.data import TranslationDataModule
from nmt_lightning.module import TranslationModule
from tests.conftest import SMALL_FIT_OPTIONS

RECIPES = Path(__file__).parents[1] / "recipes"
TINY = RECIPES / "libreoffice_en_cs" / "tiny.yaml"
ALL_YAML = sorted(RECIPES.rglob("*.yaml"))
# Add-ons (loggers, compression, fine-tuning) are combined with a full recipe: their first line
# names more than one --config.
ADD_ONS = {p for p in ALL_YAML if p.read_text().splitlines()[0].count("--config") > 1}
SMALL = SMALL_FIT_OPTIONS


def quick_run(prepared_dir: Path) -> list[str]:
    """Command-line overrides for a 3-step run of the small model on the test corpus."""
    return [f"--data.data_dir={prepared_dir}", "--trainer.enable_progress_bar=false", "--trainer.max_steps=3",
            "--trainer.limit_val_batches=1", "--model.val_bleu_sentences=4", *SMALL]


def test_recipes_exist() -> None:
    assert TINY in ALL_YAML and len(ALL_YAML) >= 4


@pytest.mark.parametrize("recipe", ALL_YAML, ids=lambda p: str(p.relative_to(RECIPES)))
def test_first_line_is_the_command(recipe: Path) -> None:
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# nmt-lightning fit --config ") and str(recipe.relative_to(RECIPES.parent)) in first


def instantiate(recipe: Path, prepared_dir: Path) -> TranslationCLI:
    """The recipe (after tiny.yaml for an add-on) built by the CLI without running; a teacher it
    names is created as an empty checkpoint (callbacks check their files where they are made)."""
    configs = ["--config", str(TINY), "--config", str(recipe)] if recipe in ADD_ONS else ["--config", str(recipe)]
    if "init_from:" in recipe.read_text():  # the checkpoint it fine-tunes does not exist here
        configs += ["--model.init_from=null", "--model.init_layers=null"]
    for line in recipe.read_text().splitlines():
        if line.strip().startswith("teacher:"):
            teacher = Path(line.split(":", 1)[1].strip())
            teacher.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": {}}, teacher)
    # GPU recipes are checked for their keys and types on this CPU machine.
    return TranslationCLI(TranslationModule, TranslationDataModule, run=False,
                          args=[*configs, f"--data.data_dir={prepared_dir}", "--trainer.accelerator=cpu",
                                "--trainer.devices=1", *SMALL])


@pytest.mark.parametrize("recipe", ALL_YAML, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_instantiates(recipe: Path, prepared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli = instantiate(recipe, prepared_dir)
    assert cli.model.hparams.src_vocab_size == cli.datamodule.src_vocab_size


@pytest.mark.parametrize("add_on", sorted((RECIPES / "compress").glob("*.yaml")), ids=lambda path: path.stem)
def test_every_add_on_writes_to_a_run_directory_of_its_own(add_on: Path, prepared_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An add-on appends its suffix to the run directory (checkpoints, logs): running it never
    replaces the last.ckpt of the model it started from, which benchmarks read as the main job's."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    monkeypatch.chdir(tmp_path)
    cli = instantiate(add_on, prepared_dir)
    suffix = add_on.read_text(encoding="utf-8").split("run_suffixes+: [", 1)[1].split("]", 1)[0]
    expected = f"runs/libreoffice_en_cs_tiny_{suffix}"
    assert cli.trainer.default_root_dir == expected
    assert [c.dirpath for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)] == [
        str(tmp_path / expected / "checkpoints")]  # (Lightning makes it absolute)
    assert cli.trainer.logger.save_dir == expected


def test_tiny_recipe_fast_dev_run(prepared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(TINY), "--trainer.fast_dev_run=true", f"--data.data_dir={prepared_dir}",
                 "--trainer.enable_progress_bar=false", *SMALL]) == 0


def test_train_then_qat_finetune_then_export(prepared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    """The main job's path through the CLI: fit, QAT fine-tune from it, export int8, translate both."""
    monkeypatch.chdir(tmp_path)
    quick = quick_run(prepared_dir)
    assert main(["fit", "--config", str(TINY), *quick]) == 0
    fp32 = Path("runs/libreoffice_en_cs_tiny/checkpoints/last.ckpt")
    assert fp32.is_file()
    assert main(["fit", "--config", str(TINY), "--config", str(RECIPES / "libreoffice_en_cs" / "finetune.yaml"),
                 "--config", str(RECIPES / "compress" / "qat.yaml"), *quick]) == 0
    qat = Path("runs/libreoffice_en_cs_tiny_finetune_qat/checkpoints/last.ckpt")  # an add-on's own run directory
    assert not Path("runs/libreoffice_en_cs_tiny_finetune").exists()
    assert main(["export", "--checkpoint", str(qat), "--output", "model.int8.safetensors"]) == 0
    assert ": int8," in capsys.readouterr().err
    # A checkpoint written by LightningCLI (it carries the CLI's private hyper-parameters) and
    # the exported file both translate.
    for checkpoint in (fp32, Path("model.int8.safetensors")):
        assert main(["translate", "--checkpoint", str(checkpoint), "--input", str(prepared_dir / "test.en"),
                     "--output", "hyp.cs", "--beam", "2"]) == 0
        assert len(Path("hyp.cs").read_text(encoding="utf-8").splitlines()) == len(
            (prepared_dir / "test.en").read_text(encoding="utf-8").splitlines())


def test_quant_noise_then_ipq_through_the_cli(prepared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    """Quant-Noise and iPQ add-ons on one fine-tuning run, export, translate: the paper's recipe."""
    monkeypatch.chdir(tmp_path)
    quick = quick_run(prepared_dir)
    assert main(["fit", "--config", str(TINY), *quick]) == 0
    assert main(["fit", "--config", str(TINY), "--config", str(RECIPES / "libreoffice_en_cs" / "finetune.yaml"),
                 "--config", str(RECIPES / "compress" / "quant_noise.yaml"),
                 "--config", str(RECIPES / "compress" / "ipq.yaml"), *quick]) == 0
    checkpoint = Path("runs/libreoffice_en_cs_tiny_finetune_quant_noise_ipq/checkpoints/last.ckpt")
    assert main(["export", "--checkpoint", str(checkpoint), "--output", "model.safetensors"]) == 0
    assert ": int4+ipq," in capsys.readouterr().err  # feed-forward codebooks (stage 0), int4 elsewhere
    assert main(["translate", "--checkpoint", "model.safetensors", "--input", str(prepared_dir / "test.en"),
                 "--output", "hyp.cs", "--beam", "2"]) == 0


def test_teacher_then_distilled_student_through_the_cli(prepared_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """teacher.yaml, then tiny.yaml + compress/distill.yaml (init from every other teacher layer,
    word-level KD); the student exports and translates without its teacher."""
    monkeypatch.chdir(tmp_path)
    quick = quick_run(prepared_dir)
    assert main(["fit", "--config", str(TINY), "--config", str(RECIPES / "libreoffice_en_cs" / "teacher.yaml"), *quick,
                 "--model.encoder_layers=2", "--model.decoder_layers=2"]) == 0
    assert Path("runs/libreoffice_en_cs_teacher/checkpoints/last.ckpt").is_file()
    assert main(["fit", "--config", str(TINY), "--config", str(RECIPES / "compress" / "distill.yaml"), *quick]) == 0
    student = Path("runs/libreoffice_en_cs_tiny_distilled/checkpoints/last.ckpt")
    assert main(["export", "--checkpoint", str(student), "--output", "student.safetensors"]) == 0
    assert main(["translate", "--checkpoint", "student.safetensors", "--input", str(prepared_dir / "test.en"),
                 "--output", "hyp.cs", "--beam", "2"]) == 0


def test_teacher_then_deep_encoder_shallow_decoder_student_through_the_cli(prepared_dir: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """teacher.yaml, then student_6_2.yaml (here 2+1 of a 2+2 teacher: its whole encoder, its last
    decoder layer, word-level KD): a student with fewer decoder than encoder layers, exported."""
    monkeypatch.chdir(tmp_path)
    quick = quick_run(prepared_dir)
    assert main(["fit", "--config", str(TINY), "--config", str(RECIPES / "libreoffice_en_cs" / "teacher.yaml"), *quick,
                 "--model.encoder_layers=2", "--model.decoder_layers=2"]) == 0
    assert main(["fit", "--config", str(TINY), "--config", str(RECIPES / "libreoffice_en_cs" / "student_6_2.yaml"),
                 *quick, "--model.encoder_layers=2", "--model.decoder_layers=1",
                 "--model.init_layers={encoder: [0, 1], decoder: [1]}"]) == 0
    student = Path("runs/libreoffice_en_cs_student_6_2/checkpoints/last.ckpt")
    assert main(["export", "--checkpoint", str(student), "--output", "student.safetensors"]) == 0
    from nmt_lightning.translation_file import load_exported

    config = load_exported("student.safetensors").model.config
    assert (config.encoder_layers, config.decoder_layers) == (2, 1)
    pytest.importorskip("ctranslate2")
    assert main(["export", "--checkpoint", "student.safetensors", "--format", "ctranslate2", "--output", "ct2"]) == 0
    for model, output in (("student.safetensors", "ours.cs"), ("ct2", "theirs.cs")):
        assert main(["translate", "--checkpoint", model, "--input", str(prepared_dir / "test.en"), "--output", output,
                     "--beam", "1"]) == 0
    assert Path("ours.cs").read_text(encoding="utf-8") == Path("theirs.cs").read_text(encoding="utf-8")


def test_teacher_then_bottleneck_student_with_progressive_transfer_through_the_cli(
        prepared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """teacher.yaml, then tiny.yaml + bottleneck.yaml + compress/progressive_transfer.yaml (3 steps:
    inside the first layer's stage); the deep-thin student exports to int8 and translates."""
    monkeypatch.chdir(tmp_path)
    quick = quick_run(prepared_dir)
    assert main(["fit", "--config", str(TINY), "--config", str(RECIPES / "libreoffice_en_cs" / "teacher.yaml"),
                 *quick]) == 0
    with pytest.warns(UserWarning, match="this fit ends before the distillation stage"):
        assert main(["fit", "--config", str(TINY), "--config", str(RECIPES / "libreoffice_en_cs" / "bottleneck.yaml"),
                     "--config", str(RECIPES / "compress" / "progressive_transfer.yaml"), *quick,
                     "--model.bottleneck_dim=16", "--model.embedding_dim=16"]) == 0
    student = Path("runs/libreoffice_en_cs_bottleneck_pkt/checkpoints/last.ckpt")
    assert main(["export", "--checkpoint", str(student), "--output", "student.safetensors", "--quantize", "int8"]) == 0
    assert main(["translate", "--checkpoint", "student.safetensors", "--input", str(prepared_dir / "test.en"),
                 "--output", "hyp.cs", "--beam", "2"]) == 0
