"""LightningCLI for ``nmt-lightning fit|validate|test|predict`` with YAML recipes.

Where a run writes is one setting, ``run_dir``, plus the ``run_suffixes`` add-on recipes append
(``run_suffixes+: [qat]``): the run's directory is ``<run_dir>_<suffix>_<suffix>...``, and the
CLI points everything a run writes there before anything is built:

- ``trainer.default_root_dir`` and every logger's ``save_dir``;
- every ``ModelCheckpoint``'s ``dirpath``: ``<run directory>/checkpoints``;
- ``model.test_output`` (when the recipe asks for one): its file name in the run directory;
- ``PlateauStopping``'s ``record``: ``<run directory>/plateau.json``.

So ``tiny.yaml`` trains in ``runs/libreoffice_en_cs_tiny``, ``tiny.yaml + finetune.yaml + qat.yaml``
in ``runs/libreoffice_en_cs_tiny_finetune_qat``, and an add-on never overwrites the
``last.ckpt`` of the model it started from. Without ``run_dir`` the recipe's own paths stand.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from nmt_lightning.data import TranslationDataModule
from nmt_lightning.module import TranslationModule

__all__ = ["TranslationCLI", "run_directory", "run_lightning_cli"]


def run_directory(run_dir: Optional[str], suffixes: Sequence[str]) -> Optional[str]:
    """``run_dir`` with each suffix appended after an underscore (None without a run_dir)."""
    if not run_dir:
        return None
    return "_".join([str(run_dir).rstrip("/"), *suffixes])


def _class_name(entry: Any) -> str:
    return str(getattr(entry, "class_path", "") or "").rsplit(".", 1)[-1]


def place_run(config: Any) -> Optional[str]:
    """Point every output path of a parsed fit/validate/test/predict ``config`` into its run directory."""
    directory = run_directory(config.get("run_dir"), config.get("run_suffixes") or [])
    if directory is None:
        return None
    trainer = config.trainer
    trainer.default_root_dir = directory
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    for logger in loggers:
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and "save_dir" in init_args:
            init_args.save_dir = directory
    for callback in trainer.callbacks or []:
        init_args = getattr(callback, "init_args", None)
        if init_args is None:
            continue
        if _class_name(callback) == "ModelCheckpoint":
            init_args.dirpath = f"{directory}/checkpoints"
        elif _class_name(callback) == "PlateauStopping":
            init_args.record = f"{directory}/plateau.json"
    model = config.get("model")
    if model is not None and model.get("test_output"):
        model.test_output = f"{directory}/{Path(model.test_output).name}"
    return directory


class TranslationCLI(LightningCLI):
    """The vocabulary sizes come from the prepared data, so recipes never repeat them; the
    run's directory comes from ``run_dir`` and ``run_suffixes`` (see the module docstring)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.src_vocab_size", "model.src_vocab_size", apply_on="instantiate")
        parser.link_arguments("data.tgt_vocab_size", "model.tgt_vocab_size", apply_on="instantiate")
        parser.add_argument("--run_dir", type=Optional[str], default=None,
                            help="where the run writes checkpoints/, logs and test hypotheses (with run_suffixes)")
        parser.add_argument("--run_suffixes", type=list[str], default=[],
                            help="appended to run_dir, each after an underscore; add-on recipes append theirs "
                                 "(run_suffixes+: [qat])")

    def before_instantiate_classes(self) -> None:
        place_run(self.config[self.subcommand] if self.subcommand else self.config)


def run_lightning_cli(argv: Optional[Sequence[str]] = None) -> TranslationCLI:
    """LightningCLI on ``argv`` (default: the command line). The arguments are handed over as
    ``args`` with the process's own hidden: LightningCLI warns, on every run, when it sees both."""
    program = sys.argv
    sys.argv = program[:1]
    try:
        return TranslationCLI(TranslationModule, TranslationDataModule,
                              args=list(program[1:] if argv is None else argv), save_config_kwargs={"overwrite": True})
    finally:
        sys.argv = program
