"""A pruned model exports as bitmask + surviving values (fp32 or int8) and translates the same."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from callbacks import LotteryTicketPruning, QuantizationAwareTraining
from nmt_lightning.data import TranslationDataModule
from nmt_lightning.translation_file import export_checkpoint, load_exported
from nmt_lightning.export.codecs.sparse import pack_bits, unpack_bits
from nmt_lightning.module import TranslationModule
from nmt_lightning.translate import translate_lines
from tests.conftest import TINY_MODEL, tiny_trainer


def pruned_model(prepared_dir: Path, root: Path, callbacks: tuple = ()) -> tuple[TranslationModule, Path]:
    L.seed_everything(0)
    datamodule = TranslationDataModule(str(prepared_dir), max_tokens=256)
    module = TranslationModule(datamodule.src_vocab_size, datamodule.tgt_vocab_size, **TINY_MODEL)
    pruning = LotteryTicketPruning(sparsity=0.8, rounds=1, round_steps=4, rewind_step=1, prune_embeddings=True)
    trainer = tiny_trainer(root, max_steps=8, callbacks=[pruning, *callbacks])
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(root / "pruned.ckpt")
    return module.eval(), root / "pruned.ckpt"


def effective(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The tensor a layer computes with (through its weight transforms)."""
    path, _, attribute = name.rpartition(".")
    return getattr(model.get_submodule(path), attribute).detach()


def test_bits_round_trip() -> None:
    keep = torch.rand(7, 13) > 0.6
    assert torch.equal(unpack_bits(pack_bits(keep), keep.numel()).view(7, 13), keep)


def test_a_sparse_export_translates_as_the_masked_model(prepared_dir: Path, tmp_path: Path) -> None:
    module, checkpoint = pruned_model(prepared_dir, tmp_path)
    # The embedding tied to the output projection is one weight with one mask.
    embedding, projection = module.model.src_embed, module.model.output_projection
    assert embedding.parametrizations.weight[0].mask is projection.parametrizations.weight[0].mask
    assert torch.equal(embedding.weight, projection.weight)
    dense = export_checkpoint(checkpoint, tmp_path / "sparse.safetensors", "fp32")
    exported = load_exported(dense.output)
    # Every weight decodes to exactly what the masked model computes with.
    for name, tensor in exported.model.state_dict().items():
        torch.testing.assert_close(tensor, effective(module.model, name), rtol=0, atol=0, msg=name)
    lines = (prepared_dir / "test.en").read_text(encoding="utf-8").splitlines()[:10]
    assert translate_lines(exported, lines, beam=2, progress=False) == translate_lines(module, lines, beam=2,
                                                                                       progress=False)
    # The same weights stored dense (the checkpoint without its sparse records) take more bytes:
    # 80% of the Linear and embedding weights are gone, less a bit per weight for the mask.
    saved = torch.load(checkpoint, weights_only=True)
    del saved["compression"]
    torch.save(saved, tmp_path / "unmarked.ckpt")
    unmarked = export_checkpoint(tmp_path / "unmarked.ckpt", tmp_path / "dense.safetensors", "fp32")
    assert unmarked.bytes_on_disk - dense.bytes_on_disk > 0.6 * dense.weight_bytes_fp32
    int8 = export_checkpoint(checkpoint, tmp_path / "sparse.int8.safetensors", "int8")
    assert int8.bytes_on_disk < dense.bytes_on_disk
    assert len(translate_lines(load_exported(int8.output), lines, beam=2, progress=False)) == len(lines)


def test_pruning_composes_with_qat_in_the_export(prepared_dir: Path, tmp_path: Path) -> None:
    module, checkpoint = pruned_model(prepared_dir, tmp_path, callbacks=(QuantizationAwareTraining(),))
    report = export_checkpoint(checkpoint, tmp_path / "qat_sparse.safetensors")
    assert report.quantization.startswith("int8")
    decoded = load_exported(report.output, runtime_layers=False)
    fc1 = "encoder_layers.0.ffn.fc1.weight"
    mask = module.model.encoder_layers[0].ffn.fc1.parametrizations.weight[0].mask
    assert (decoded.model.state_dict()[fc1][mask == 0] == 0).all()
    # The decoded int8 grid is the fake-quantized weight QAT trained with.
    torch.testing.assert_close(decoded.model.state_dict()[fc1], module.model.encoder_layers[0].ffn.fc1.weight.detach(),
                               rtol=0, atol=1e-6)


def test_masks_that_prune_too_little_store_the_weight_dense(prepared_dir: Path, tmp_path: Path) -> None:
    # A checkpoint of round 0 (masks present, nothing pruned yet) exports no larger than the same
    # weights without masks: a bitmask costs 1/32 of an fp32 weight, paid only where it saves more.
    L.seed_everything(0)
    datamodule = TranslationDataModule(str(prepared_dir), max_tokens=256)
    module = TranslationModule(datamodule.src_vocab_size, datamodule.tgt_vocab_size, **TINY_MODEL)
    pruning = LotteryTicketPruning(sparsity=0.8, rounds=1, round_steps=4, rewind_step=1, prune_embeddings=True)
    trainer = tiny_trainer(tmp_path, max_steps=2, callbacks=[pruning])
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "round0.ckpt")
    saved = torch.load(tmp_path / "round0.ckpt", weights_only=True)
    del saved["compression"]
    torch.save(saved, tmp_path / "unmarked.ckpt")
    masked = export_checkpoint(tmp_path / "round0.ckpt", tmp_path / "masked.safetensors", "fp32")
    plain = export_checkpoint(tmp_path / "unmarked.ckpt", tmp_path / "plain.safetensors", "fp32")
    # Bitmasks would add one bit per weight (weight_bytes_fp32 / 32 bytes); only the metadata
    # differs (each weight's chain names the sparse step: some 30 bytes a weight).
    assert abs(masked.bytes_on_disk - plain.bytes_on_disk) < plain.weight_bytes_fp32 / 32 / 2
    exported = load_exported(masked.output)
    for name, tensor in exported.model.state_dict().items():
        torch.testing.assert_close(tensor, effective(module.eval().model, name), rtol=0, atol=0, msg=name)
