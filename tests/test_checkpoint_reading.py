"""Untrusted checkpoints: a crafted pickle is refused before any of it runs, by every command."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from nmt_lightning.checkpoint_reading import read_checkpoint
from nmt_lightning.cli import main
from nmt_lightning.errors import ModelFileError
from nmt_lightning.module import TranslationModule


class Payload:
    """Unpickling this runs os.system: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def crafted(tmp_path: Path) -> tuple[Path, Path]:
    """(a .ckpt that looks like a checkpoint and runs a command when unpickled, the command's marker file)."""
    def craft(path: Path, marker: Path) -> Path:
        torch.save({"state_dict": {}, "hyper_parameters": {"payload": Payload(marker)}, "global_step": 1}, path)
        return path

    # The payload is real: unpickling such a file runs its command.
    proof = tmp_path / "proof"
    torch.load(craft(tmp_path / "proof.bin", proof), weights_only=False)
    assert proof.exists()
    (tmp_path / "proof.bin").unlink()
    marker = tmp_path / "ran"
    return craft(tmp_path / "crafted.ckpt", marker), marker


@pytest.mark.parametrize("command", [
    lambda p, out: ["translate", "--checkpoint", str(p), "--input", str(p)],
    lambda p, out: ["export", "--checkpoint", str(p), "--output", str(out / "x.safetensors")],
    lambda p, out: ["average", str(p), "--output", str(out / "avg.ckpt")],
    lambda p, out: ["average", "--dir", str(p.parent), "--last", "2", "--output", str(out / "avg.ckpt")],
], ids=["translate", "export", "average", "average --dir"])
def test_commands_refuse_a_crafted_pickle(crafted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                          command) -> None:
    path, marker = crafted
    assert main(command(path, tmp_path)) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(path) in error and "refused to load" in error
    assert "posix.system" in error or "os.system" in error
    assert not marker.exists()


def test_init_from_refuses_a_crafted_pickle(crafted: tuple[Path, Path]) -> None:
    path, marker = crafted
    with pytest.raises(ValueError, match=rf"init_from: {path}: refused to load"):
        TranslationModule(64, 64, d_model=32, ffn_dim=64, heads=2, encoder_layers=1, decoder_layers=1, init_from=str(path))
    assert not marker.exists()


def test_a_real_checkpoint_loads(trained_checkpoint: Path) -> None:
    checkpoint = read_checkpoint(trained_checkpoint)
    assert {"state_dict", "hyper_parameters", "nmt_lightning_tokenization"} <= set(checkpoint)


def test_truncated_and_missing_files(trained_checkpoint: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(trained_checkpoint.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match=r"truncated.ckpt: not a readable checkpoint"):
        read_checkpoint(truncated)
    with pytest.raises(ModelFileError, match=r"missing.ckpt: no such checkpoint"):
        read_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("content", [b"hello world\n", bytes(range(256)) * 8, b"\x80" + bytes(range(255)) * 8],
                         ids=["text", "random bytes", "a pickle's first byte, then garbage"])
def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path: Path, content: bytes) -> None:
    """Text, random bytes, or a pickle-like start and then garbage: "not a checkpoint", one line,
    never the "Python objects" refusal meant for pickles that would run code."""
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=rf"^{path}: not a checkpoint") as caught:
        read_checkpoint(path)
    assert "\n" not in str(caught.value) and "Python objects" not in str(caught.value)


def test_model_file_errors_and_data_errors_are_told_apart(tmp_path: Path) -> None:
    """A bad checkpoint is a ModelFileError, never a CorpusError (data); both stay ValueErrors."""
    from nmt_lightning.errors import CorpusError
    from nmt_lightning.evaluation import read_lines

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"hello world\n")
    with pytest.raises(ModelFileError) as model_error:
        read_checkpoint(garbage)
    assert isinstance(model_error.value, ValueError) and not isinstance(model_error.value, CorpusError)
    bad_text = tmp_path / "bad.cs"
    bad_text.write_bytes(b"\xff\xfe\n")
    with pytest.raises(CorpusError) as data_error:
        read_lines(bad_text)
    assert isinstance(data_error.value, ValueError) and not isinstance(data_error.value, ModelFileError)
