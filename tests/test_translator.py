"""Translator: an export loaded for translation only, without Lightning, translates exactly as the
TranslationModule loaded from the same file, with the file's architecture and decoding settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from nmt_lightning.loading import load_for_translation
from nmt_lightning.model import config_from_hyperparameters
from nmt_lightning.module import TranslationModule
from nmt_lightning.translate import translate_lines
from nmt_lightning.translation_file import export_checkpoint, load_exported, load_translator
from nmt_lightning.translator import DECODING_DEFAULTS, Translator
from tests.conftest import train_tiny_checkpoint

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def capped_checkpoint(prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose decoding settings are not the defaults: outputs capped at
    0.5 * source length + 3 tokens, length penalty 0.6, so a loader that fell back to the
    defaults (1.2 * length + 10, 1.0) would translate differently."""
    return train_tiny_checkpoint(prepared_dir, tmp_path_factory.mktemp("capped"), max_len_a=0.5, max_len_b=3,
                                 length_penalty=0.6)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_translator_translates_as_the_module_of_the_same_file(capped_checkpoint: Path, prepared_dir: Path,
                                                                 tmp_path: Path, quantize) -> None:
    exported = export_checkpoint(capped_checkpoint, tmp_path / "model.safetensors", quantize=quantize).output
    lines = (prepared_dir / "valid.en").read_text(encoding="utf-8").splitlines()[:12]
    module, translator = load_exported(exported), load_translator(exported)
    assert isinstance(translator, Translator) and not isinstance(translator, TranslationModule)
    assert translator.model.config == module.model.config
    assert vars(translator.hparams) == dict(beam_size=2, length_penalty=0.6, max_len_a=0.5, max_len_b=3)
    for beam in (1, 3):
        expected = translate_lines(module, lines, beam=beam, batch_size=5, progress=False)
        assert translate_lines(translator, lines, beam=beam, batch_size=5, progress=False) == expected
    # the file's settings matter on these lines: with the defaults the same weights translate otherwise
    translator.hparams = SimpleNamespace(**DECODING_DEFAULTS)
    assert translate_lines(translator, lines, beam=3, batch_size=5, progress=False) != expected


def test_load_for_translation_takes_a_checkpoint_through_the_module(capped_checkpoint: Path) -> None:
    assert isinstance(load_for_translation(capped_checkpoint, "cpu"), TranslationModule)


@pytest.mark.parametrize("hyper_parameters", [
    dict(src_vocab_size=50, tgt_vocab_size=60, share_embeddings="none"),
    dict(src_vocab_size=50, tgt_vocab_size=50, preset="base", decoder_layers=2, heads=4, pre_norm=True,
         max_positions=64, dropout=None),
    dict(src_vocab_size=50, tgt_vocab_size=50, preset="tiny-bottleneck", encoder_layers=2, decoder_layers=1),
])
def test_the_architecture_is_the_modules(hyper_parameters: dict) -> None:
    """The preset, its fields overridden where given (None keeps the preset's), the other fields
    with the module's defaults; keys that are not the architecture's (the learning rate) ignored."""
    module = TranslationModule(**hyper_parameters)
    assert config_from_hyperparameters({**hyper_parameters, "lr": 1.0}) == module.model.config
    assert config_from_hyperparameters(dict(module.hparams)) == module.model.config


def test_the_defaults_of_a_file_without_the_keys_are_the_modules_signature_defaults() -> None:
    """DECODING_DEFAULTS and ARCHITECTURE_DEFAULTS repeat TranslationModule's defaults (reading the
    signature would import Lightning where translation must not); a default changed in one place
    only fails here."""
    import inspect

    from nmt_lightning.model.transformer import ARCHITECTURE_DEFAULTS

    signature = inspect.signature(TranslationModule.__init__).parameters
    for defaults in (DECODING_DEFAULTS, ARCHITECTURE_DEFAULTS):
        assert defaults == {name: signature[name].default for name in defaults}
    assert signature["preset"].default == "tiny"  # config_from_hyperparameters' preset when absent


def test_an_unknown_preset_is_named() -> None:
    with pytest.raises(ValueError, match="preset must be one of .*, got 'small'"):
        config_from_hyperparameters(dict(preset="small"))


def test_translating_an_export_does_not_import_lightning(trained_checkpoint: Path, prepared_dir: Path,
                                                        tmp_path: Path) -> None:
    """``nmt-lightning translate FILE.safetensors`` and the benchmarks' workers: Lightning's import
    costs seconds per process. A fresh interpreter, as this test process has Lightning loaded."""
    exported = export_checkpoint(trained_checkpoint, tmp_path / "model.safetensors").output
    code = ("import sys\n"
            "from nmt_lightning.cli import main\n"
            f"main(['translate', '--checkpoint', {str(exported)!r}, '--input', {str(prepared_dir / 'valid.en')!r},\n"
            f"      '--output', {str(tmp_path / 'out.cs')!r}, '--beam', '2'])\n"
            "print(','.join(sorted(n for n in ('lightning', 'nmt_lightning.module') if n in sys.modules)))\n")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.strip().splitlines()[-1:] in ([], [""])
    assert len((tmp_path / "out.cs").read_text(encoding="utf-8").splitlines()) == len(
        (prepared_dir / "valid.en").read_text(encoding="utf-8").splitlines())
