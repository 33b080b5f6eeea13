"""What a converted directory holds besides CTranslate2's own files, and the optional import.

A CTranslate2 directory written by ``nmt-lightning export --format ctranslate2``:

- ``model.bin``, ``config.json``, ``*_vocabulary.json``: CTranslate2's files (its converter API
  writes them); vocabularies are sentencepiece pieces, so any CTranslate2 user can run the model
  with sentencepiece tokens (source without eos: ``config.json`` sets ``add_source_eos``);
- ``source.spm.model`` / ``target.spm.model`` (one ``spm.model`` for a joint vocabulary);
- ``nmt_lightning.json``: the languages, Moses normalisation, the decoding defaults the model
  was trained with (length penalty, the length cap ``max_len_a * source + max_len_b``) and
  where it came from, so ``nmt-lightning translate --checkpoint DIR`` behaves as for our files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SETTINGS_FILE = "nmt_lightning.json"
SETTINGS_FORMAT = "nmt-lightning-ctranslate2/1"
# CTranslate2's weight types (its converter's --quantization); int8_float16 / int8_bfloat16 are
# compute types chosen when loading, on a GPU, from an int8 directory.
QUANTIZATIONS = ("int8", "int8_float32", "int16", "float16", "bfloat16", "float32")
INSTALL_HINT = "pip install -e '.[ctranslate2]' (or pip install ctranslate2)"


def require_ctranslate2() -> Any:
    """The ``ctranslate2`` module, or an ImportError that names the extra to install."""
    try:
        import ctranslate2
    except ImportError:
        raise ImportError(f"CTranslate2 is not installed; it is an optional extra of nmt-lightning: {INSTALL_HINT}") from None
    return ctranslate2


def is_ctranslate2_model(path: str | os.PathLike) -> bool:
    """A directory holding a CTranslate2 model (``model.bin``)."""
    return Path(path).is_dir() and (Path(path) / "model.bin").is_file()


def write_settings(directory: Path, settings: dict[str, Any]) -> None:
    (directory / SETTINGS_FILE).write_text(json.dumps({"format": SETTINGS_FORMAT, **settings}, indent=2) + "\n",
                                           encoding="utf-8")


def read_settings(directory: Path) -> dict[str, Any]:
    path = directory / SETTINGS_FILE
    if not path.is_file():
        raise ValueError(f"{directory}: a CTranslate2 model, but not one written by 'nmt-lightning export "
                         f"--format ctranslate2' (no {SETTINGS_FILE}: the sentencepiece models and decoding "
                         f"settings are missing)")
    settings = json.loads(path.read_text(encoding="utf-8"))
    if settings.get("format") != SETTINGS_FORMAT:
        raise ValueError(f"{path}: unknown format {settings.get('format')!r}, expected {SETTINGS_FORMAT!r}")
    return settings
