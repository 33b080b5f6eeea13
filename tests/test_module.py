import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from nmt_lightning.checkpoints import average_checkpoints, load_translation_module
from nmt_lightning.data import TranslationDataModule
from nmt_lightning.module import TranslationModule, inverse_sqrt_schedule
from tests.conftest import TINY_MODEL, tiny_trainer


def test_training_lowers_the_loss(prepared_dir: Path, tmp_path: Path) -> None:
    L.seed_everything(0)
    datamodule = TranslationDataModule(str(prepared_dir), max_tokens=256)
    module = TranslationModule(datamodule.src_vocab_size, datamodule.tgt_vocab_size, **TINY_MODEL)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    before = module.token_losses(module(batch["source"], batch["decoder_input"]), batch["target"])
    tiny_trainer(tmp_path, max_steps=40).fit(module, datamodule=datamodule)
    after = module.token_losses(module(batch["source"], batch["decoder_input"]), batch["target"])
    assert after[1] / after[2] < 0.8 * before[1] / before[2]


def test_registered_loss_terms_are_added(prepared_dir: Path, tmp_path: Path) -> None:
    datamodule = TranslationDataModule(str(prepared_dir), max_tokens=256)
    module = TranslationModule(datamodule.src_vocab_size, datamodule.tgt_vocab_size, **TINY_MODEL)
    calls = []

    def constant(mod, batch, logits):
        calls.append(logits.shape)
        return torch.tensor(5.0)

    module.register_loss_term("extra", constant)
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=datamodule)
    assert len(calls) == 2 and trainer.callback_metrics["train/extra"] == 5.0
    assert trainer.callback_metrics["train/loss"] > 5.0


def test_inverse_sqrt_schedule() -> None:
    multiplier = inverse_sqrt_schedule(100)
    assert multiplier(0) == pytest.approx(0.01)
    assert multiplier(99) == pytest.approx(1.0)
    assert multiplier(399) == pytest.approx(0.5)


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="preset must be one of"):
        TranslationModule(preset="huge")
    with pytest.raises(ValueError, match="label_smoothing"):
        TranslationModule(label_smoothing=1.0)
    with pytest.raises(ValueError, match="beam_size must be >= 1"):
        TranslationModule(beam_size=0)


def test_checkpoint_carries_the_tokenizers(trained_checkpoint: Path, prepared_dir: Path) -> None:
    module = load_translation_module(trained_checkpoint)
    assert module.tokenization.src_lang == "en"
    assert module.tokenization.src_model == (prepared_dir / "spm.model").read_bytes()


def test_test_scores_equal_the_sacrebleu_command_line(trained_checkpoint: Path, prepared_dir: Path, tmp_path: Path) -> None:
    module = load_translation_module(trained_checkpoint)
    module.hparams.test_output = str(tmp_path / "hyp.cs")
    trainer = tiny_trainer(tmp_path)
    (metrics,) = trainer.test(module, datamodule=TranslationDataModule(str(prepared_dir), max_tokens=256), verbose=False)
    hypotheses = (tmp_path / "hyp.cs").read_text().splitlines()
    assert len(hypotheses) == len((prepared_dir / "test.cs").read_text().splitlines())
    for flags, key in (([], "test/bleu"), (["-lc"], "test/bleu_uncased"), (["-m", "chrf"], "test/chrf")):
        result = subprocess.run([sys.executable, "-m", "sacrebleu", str(prepared_dir / "test.cs"), "-i",
                                 str(tmp_path / "hyp.cs"), "-b", "-w", "4", *flags], capture_output=True, text=True, check=True)
        assert float(result.stdout.strip()) == pytest.approx(metrics[key], abs=1e-4)


def test_averaging(trained_checkpoint: Path, tmp_path: Path) -> None:
    state = torch.load(trained_checkpoint, weights_only=False)
    shifted = dict(state, state_dict={k: v + 2 if v.is_floating_point() else v for k, v in state["state_dict"].items()})
    torch.save(shifted, tmp_path / "shifted.ckpt")
    averaged = torch.load(average_checkpoints([trained_checkpoint, tmp_path / "shifted.ckpt"], tmp_path / "avg.ckpt"),
                          weights_only=False)
    name = "model.encoder_layers.0.ffn.fc1.weight"
    torch.testing.assert_close(averaged["state_dict"][name], state["state_dict"][name] + 1)
    assert "optimizer_states" not in averaged
    assert load_translation_module(tmp_path / "avg.ckpt").tokenization is not None
