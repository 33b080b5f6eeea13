"""Shared fixtures: tiny synthetic parallel corpora, help trees and prepared data directories."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nmt_lightning.prepare import PrepareConfig, prepare

_EN = "the a file menu click open save cell table insert format sheet page style text window select choose".split()
_CS = "ten jeden soubor nabídka klepněte otevřít uložit buňka tabulka vložit formát list stránka styl text okno vyberte zvolte".split()


def synthetic_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """Distinct pairs of 3-12 pseudo-words; the 'translation' maps word i to word i."""
    rng = random.Random(seed)
    pairs, seen = [], set()
    while len(pairs) < count:
        ids = [rng.randrange(len(_EN)) for _ in range(rng.randint(3, 12))]
        pair = (" ".join(_EN[i] for i in ids).capitalize() + ".", " ".join(_CS[i] for i in ids).capitalize() + ".")
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    return pairs


def write_parallel(prefix: Path, pairs: list[tuple[str, str]], src: str = "en", tgt: str = "cs") -> Path:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.{src}").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    Path(f"{prefix}.{tgt}").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    return prefix


@pytest.fixture
def parallel_files(tmp_path: Path) -> dict[str, Path]:
    """train (400 pairs), valid (30) and test (40) prefixes of a synthetic en-cs corpus."""
    pairs = synthetic_pairs(470)
    return {
        "train": write_parallel(tmp_path / "raw" / "train", pairs[:400]),
        "valid": write_parallel(tmp_path / "raw" / "valid", pairs[400:430]),
        "test": write_parallel(tmp_path / "raw" / "test", pairs[430:]),
    }


def prepare_config(files: dict[str, Path], out_dir: Path, **overrides) -> PrepareConfig:
    options = dict(out_dir=str(out_dir), train=str(files["train"]), valid=str(files["valid"]),
                   test=str(files["test"]), vocab_size=64)
    options.update(overrides)
    return PrepareConfig(**options)


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared data directory (synthetic en-cs, 600 train pairs, vocab 64), shared by tests."""
    root = tmp_path_factory.mktemp("prepared")
    pairs = synthetic_pairs(700, seed=1)
    files = {
        "train": write_parallel(root / "raw" / "train", pairs[:600]),
        "valid": write_parallel(root / "raw" / "valid", pairs[600:650]),
        "test": write_parallel(root / "raw" / "test", pairs[650:]),
    }
    prepare(prepare_config(files, root / "data"))
    return root / "data"


# A tiny model as `nmt-lightning fit` options (the benchmarks' and recipes' tests train through the CLI).
SMALL_FIT_OPTIONS = ["--model.d_model=32", "--model.ffn_dim=64", "--model.heads=2", "--model.encoder_layers=1",
                     "--model.decoder_layers=1"]
TINY_MODEL = dict(d_model=32, ffn_dim=64, heads=2, encoder_layers=1, decoder_layers=1, dropout=0.0,
                  lr=3e-3, warmup_steps=10, val_bleu_sentences=20, beam_size=2)


def tiny_trainer(root: Path, **overrides):
    import lightning as L

    options = dict(accelerator="cpu", devices=1, max_steps=30, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                   num_sanity_val_steps=0, limit_val_batches=0)
    options.update(overrides)
    return L.Trainer(**options)


def tiny_module(prepared_dir: Path, **overrides):
    """(TranslationModule of TINY_MODEL with ``overrides``, TranslationDataModule of ``prepared_dir``)."""
    from nmt_lightning.data import TranslationDataModule
    from nmt_lightning.module import TranslationModule

    datamodule = TranslationDataModule(str(prepared_dir), max_tokens=256)
    module = TranslationModule(datamodule.src_vocab_size, datamodule.tgt_vocab_size, **{**TINY_MODEL, **overrides})
    return module, datamodule


def train_tiny_checkpoint(prepared_dir: Path, root: Path, callbacks: tuple = (), seed: int = 0, max_steps: int = 30,
                          **overrides) -> Path:
    """Train the tiny model (``overrides`` of TINY_MODEL) ``max_steps`` steps on ``prepared_dir``
    from seed ``seed`` and save ``root/model.ckpt``."""
    import lightning as L

    L.seed_everything(seed)
    module, datamodule = tiny_module(prepared_dir, **overrides)
    trainer = tiny_trainer(root, callbacks=list(callbacks), max_steps=max_steps)
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(root / "model.ckpt")
    return root / "model.ckpt"


@pytest.fixture(scope="session")
def trained_checkpoint(prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained 30 steps on ``prepared_dir``, saved as a Lightning checkpoint."""
    return train_tiny_checkpoint(prepared_dir, tmp_path_factory.mktemp("trained"))


SCRIPTS = Path(__file__).parent / "scripts"


def run_script(name: str, *arguments: object, timeout: int = 300) -> None:
    """Run ``tests/scripts/<name>`` (multi-process DDP runs live there) with the repository on
    the path; a failure shows the end of its stderr."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    result = subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, arguments)], env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]


BENCHMARKS = Path(__file__).parents[1] / "recipes" / "benchmarks"


def import_benchmark(name: str):
    """The module ``recipes/benchmarks/<name>.py`` (the benchmarks import each other by file name,
    so their folder is on the path while it loads)."""
    import importlib
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)
