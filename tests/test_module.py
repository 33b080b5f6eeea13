import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from nmt_lightning.loading import average_checkpoints, load_translation_module
from nmt_lightning.data import TranslationDataModule
from nmt_lightning.module import LossContext, TranslationModule, inverse_sqrt_schedule
from tests.conftest import TINY_MODEL, run_script, tiny_trainer


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
    contexts: list[LossContext] = []

    def five_per_token(context: LossContext) -> torch.Tensor:
        contexts.append(context)
        return 5.0 * context.num_tokens

    module.register_loss_term("extra", five_per_token, features=["hidden_states", "attention"])
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=datamodule)
    assert len(contexts) == 2 and trainer.callback_metrics["train/extra"] == pytest.approx(5.0)
    assert trainer.callback_metrics["train/loss"] > 5.0
    context = contexts[-1]
    assert context.target_mask.sum() == context.num_tokens and context.logits.shape[:2] == context.target.shape
    features = context.features
    assert len(features.encoder_states) == len(features.decoder_states) == 2  # embeddings + 1 layer
    assert features.cross_attention[0].shape == (*context.target.shape[:1], 2, context.target.shape[1],
                                                 context.batch["source"].shape[1])

    # The cross-entropy can be weighted away: the loss is then the term alone.
    module.set_loss_weight("cross_entropy", 0.0)
    module.set_loss_weight("extra", 2.0)
    second = tiny_trainer(tmp_path, max_steps=3)
    second.fit(module, datamodule=datamodule)
    assert second.callback_metrics["train/loss"] == pytest.approx(10.0)


def test_loss_term_misuse_is_an_error() -> None:
    module = TranslationModule(64, 64, **TINY_MODEL)
    with pytest.raises(ValueError, match="unknown features \\['logits'\\]"):
        module.register_loss_term("x", lambda c: c.num_tokens, features=["logits"])
    with pytest.raises(ValueError, match="'cross_entropy' is the module's own term"):
        module.register_loss_term("cross_entropy", lambda c: c.num_tokens)
    with pytest.raises(ValueError, match="no loss term 'missing'"):
        module.set_loss_weight("missing", 1.0)
    with pytest.raises(ValueError, match="finite number >= 0, got -1"):
        module.set_loss_weight("cross_entropy", -1)


class SGDModule(TranslationModule):
    """Plain SGD with lr 1: one update moves every weight by minus its gradient."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def unequal_batches(prepared_dir: Path) -> list[dict]:
    """Two training batches of very different token counts (2 and 12 sentences)."""
    dataset = TranslationDataModule(str(prepared_dir), max_tokens=256).dataset("train")
    return [dataset[[0, 1]], dataset[list(range(2, 14))]]


def expected_update(prepared_dir: Path) -> dict[str, torch.Tensor]:
    """The weights after one SGD step on the gradient of (sum of the token losses of both batches)
    / (their target tokens): fairseq's normalisation, computed by hand."""
    L.seed_everything(0)
    module = SGDModule(64, 64, **TINY_MODEL)
    total, tokens = 0.0, 0
    for batch in unequal_batches(prepared_dir):
        smoothed, _, count = module.token_losses(module(batch["source"], batch["decoder_input"]), batch["target"])
        total, tokens = total + smoothed, tokens + count
    (total / tokens).backward()
    with torch.no_grad():
        return {name: (p - p.grad).clone() for name, p in module.named_parameters()}


def test_accumulated_batches_are_normalised_by_their_tokens_together(prepared_dir: Path, tmp_path: Path) -> None:
    """With 2 accumulated batches of 2 and 12 sentences, each token weighs the same: the update is
    not the mean of two per-batch means."""
    L.seed_everything(0)
    module = SGDModule(64, 64, **TINY_MODEL)
    batches = unequal_batches(prepared_dir)
    tiny_trainer(tmp_path, max_steps=1, accumulate_grad_batches=2).fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    expected = expected_update(prepared_dir)
    for name, parameter in module.named_parameters():
        torch.testing.assert_close(parameter.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_ranks_with_unequal_shards_are_normalised_by_all_tokens(prepared_dir: Path, tmp_path: Path) -> None:
    """Two DDP ranks, one with 2 sentences and one with 12: the same update as one process with both."""
    run_script("token_normalisation_ddp.py", prepared_dir, tmp_path)
    expected = expected_update(prepared_dir)
    for rank in range(2):
        weights = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, tensor in weights.items():
            torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")


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
    state = torch.load(trained_checkpoint, weights_only=True)
    shifted = dict(state, state_dict={k: v + 2 if v.is_floating_point() else v for k, v in state["state_dict"].items()})
    torch.save(shifted, tmp_path / "shifted.ckpt")
    averaged = torch.load(average_checkpoints([trained_checkpoint, tmp_path / "shifted.ckpt"], tmp_path / "avg.ckpt"),
                          weights_only=True)
    name = "model.encoder_layers.0.ffn.fc1.weight"
    torch.testing.assert_close(averaged["state_dict"][name], state["state_dict"][name] + 1)
    assert "optimizer_states" not in averaged
    assert load_translation_module(tmp_path / "avg.ckpt").tokenization is not None


def test_average_last_takes_the_latest_steps_not_the_newest_files(trained_checkpoint: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """ModelCheckpoint keeps the best 3 by BLEU and last.ckpt: the files' modification times say
    nothing about their training steps."""
    from nmt_lightning.cli import main

    state = torch.load(trained_checkpoint, weights_only=True)
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    for step, name, mtime in ((100, "epoch01-bleu20.0.ckpt", 3), (300, "epoch03-bleu19.0.ckpt", 1),
                              (200, "epoch02-bleu21.0.ckpt", 4), (300, "last.ckpt", 2)):
        torch.save(dict(state, global_step=step), directory / name)
        os.utime(directory / name, (mtime, mtime))
    assert main(["average", "--dir", str(directory), "--last", "2", "--output", str(tmp_path / "avg.ckpt")]) == 0
    averaged = torch.load(tmp_path / "avg.ckpt", weights_only=True)["averaged_from"]
    assert [Path(p).name for p in averaged] == ["epoch02-bleu21.0.ckpt", "epoch03-bleu19.0.ckpt"]


def test_average_refuses_different_models(trained_checkpoint: Path, tmp_path: Path) -> None:
    state = torch.load(trained_checkpoint, weights_only=True)
    other = dict(state, hyper_parameters={**state["hyper_parameters"], "pre_norm": True})
    torch.save(other, tmp_path / "pre_norm.ckpt")
    with pytest.raises(ValueError, match=r"pre_norm.ckpt and .*model.ckpt are different models .*pre_norm=True vs False"):
        average_checkpoints([trained_checkpoint, tmp_path / "pre_norm.ckpt"], tmp_path / "avg.ckpt")
    name = "model.encoder_layers.0.ffn.fc1.weight"
    resized = dict(state, state_dict={**state["state_dict"], name: torch.zeros(3, 3)})
    torch.save(resized, tmp_path / "resized.ckpt")
    with pytest.raises(ValueError, match=rf"resized.ckpt and .*model.ckpt differ in the shape of {name}: \(3, 3\) vs \(64, 32\)"):
        average_checkpoints([trained_checkpoint, tmp_path / "resized.ckpt"], tmp_path / "avg.ckpt")


def test_test_translates_every_line_however_long(tmp_path: Path) -> None:
    """A test line longer than eval_max_tokens (and than the position limit) is translated in a
    batch of its own, never dropped: the hypotheses and the references keep their line count."""
    from nmt_lightning.prepare import prepare
    from tests.conftest import prepare_config, synthetic_pairs, write_parallel

    pairs = synthetic_pairs(460, seed=2)
    long_pair = (" ".join(["Click the file menu"] * 40) + ".", " ".join(["Klepněte soubor nabídka"] * 40) + ".")
    test = pairs[420:] + [long_pair]
    files = {"train": write_parallel(tmp_path / "raw" / "train", pairs[:400]),
             "valid": write_parallel(tmp_path / "raw" / "valid", pairs[400:420]),
             "test": write_parallel(tmp_path / "raw" / "test", test)}
    prepare(prepare_config(files, tmp_path / "data"))
    datamodule = TranslationDataModule(str(tmp_path / "data"), max_tokens=256, eval_max_tokens=64,
                                       max_source_positions=100, max_target_positions=100)
    module = TranslationModule(datamodule.src_vocab_size, datamodule.tgt_vocab_size,
                               **{**TINY_MODEL, "max_len_a": 0.0, "max_len_b": 5}, test_output=str(tmp_path / "hyp.cs"))
    tiny_trainer(tmp_path).test(module, datamodule=datamodule, verbose=False)
    assert len((tmp_path / "hyp.cs").read_text(encoding="utf-8").splitlines()) == len(test)


def test_resume_in_the_middle_of_an_epoch_equals_uninterrupted(prepared_dir: Path, tmp_path: Path) -> None:
    """The training loader resumes with the batch after the checkpoint (a plain DataLoader would
    replay the epoch from its start), and the token normalisation carries over."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root: Path, steps: int, ckpt_path=None, saver=None) -> TranslationModule:
        L.seed_everything(0)
        datamodule = TranslationDataModule(str(prepared_dir), max_tokens=256)
        module = TranslationModule(datamodule.src_vocab_size, datamodule.tgt_vocab_size, **TINY_MODEL)
        trainer = tiny_trainer(root, max_steps=steps, callbacks=[saver] if saver else [],
                               enable_checkpointing=saver is not None)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        return module

    batches_per_epoch = len(TranslationDataModule(str(prepared_dir), max_tokens=256).train_dataloader())
    stop = batches_per_epoch // 2
    straight = run(tmp_path / "a", batches_per_epoch + 3)
    run(tmp_path / "b", stop, saver=ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop, filename="mid"))
    resumed = run(tmp_path / "c", batches_per_epoch + 3, ckpt_path=tmp_path / "ckpt" / "mid.ckpt")
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
