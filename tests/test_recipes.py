"""Every shipped YAML recipe parses and instantiates; the tiny recipe runs a fast_dev_run."""

from pathlib import Path

import pytest

from nmt_lightning.cli import main
from nmt_lightning.lightning_cli import TranslationCLI
from nmt_lightning.data import TranslationDataModule
from nmt_lightning.module import TranslationModule

RECIPES = Path(__file__).parents[1] / "recipes"
TINY = RECIPES / "libreoffice_en_cs" / "tiny.yaml"
ALL_YAML = sorted(RECIPES.rglob("*.yaml"))
# Add-ons (loggers, compression) are combined with a full recipe.
ADD_ONS = {p for p in ALL_YAML if p.parent.name in ("loggers", "compress")}
SMALL = ["--model.d_model=32", "--model.ffn_dim=64", "--model.heads=2", "--model.encoder_layers=1",
         "--model.decoder_layers=1"]


def test_recipes_exist() -> None:
    assert TINY in ALL_YAML and len(ALL_YAML) >= 4


@pytest.mark.parametrize("recipe", ALL_YAML, ids=lambda p: str(p.relative_to(RECIPES)))
def test_first_line_is_the_command(recipe: Path) -> None:
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# nmt-lightning fit --config ") and str(recipe.relative_to(RECIPES.parent)) in first


@pytest.mark.parametrize("recipe", ALL_YAML, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_instantiates(recipe: Path, prepared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    configs = ["--config", str(TINY), "--config", str(recipe)] if recipe in ADD_ONS else ["--config", str(recipe)]
    # GPU recipes are checked for their keys and types on this CPU machine.
    cli = TranslationCLI(TranslationModule, TranslationDataModule, run=False,
                         args=[*configs, f"--data.data_dir={prepared_dir}", "--trainer.accelerator=cpu",
                               "--trainer.devices=1", *SMALL])
    assert cli.model.hparams.src_vocab_size == cli.datamodule.src_vocab_size


def test_tiny_recipe_fast_dev_run(prepared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(TINY), "--trainer.fast_dev_run=true", f"--data.data_dir={prepared_dir}",
                 "--trainer.enable_progress_bar=false", *SMALL]) == 0
