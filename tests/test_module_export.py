"""export_module / load_module: a compressed file for a LightningModule that is not ours.

The classifier of tests/callbacks/classifier.py trained with each callback (and with several at
once) is exported through the checkpoint's codecs and loaded into a fresh instance of its class:
the loaded model computes what the compressed model computed in training, and the file is as
much smaller as the codecs say."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks import IterativeProductQuantization, LotteryTicketPruning, QuantizationAwareTraining, QuantNoise
from callbacks.quantization_aware_training import round_to_grid, weight_absmax
from nmt_lightning.errors import ModelFileError
from nmt_lightning.export import export_module, load_module
from nmt_lightning.export.codecs.int8_kernels import Int8Linear, static_activation_bits
from tests.callbacks.classifier import BagOfWordsClassifier, classification_data
from tests.callbacks.helpers import trainer

TOKENS = torch.randint(0, 30, (16, 6), generator=torch.Generator().manual_seed(7))
FP32_BYTES = (30 * 16 + 16 * 16 + 3 * 16) * 4  # the three weight matrices in fp32


def train(tmp_path: Path, callbacks: list) -> tuple[BagOfWordsClassifier, Path]:
    L.seed_everything(0)
    model = BagOfWordsClassifier()
    fit = trainer(tmp_path / "fit", callbacks, max_steps=12)
    fit.fit(model, classification_data())
    fit.save_checkpoint(tmp_path / "trained.ckpt")
    return model.eval(), tmp_path / "trained.ckpt"


def weight_bytes(path: Path) -> int:
    import json

    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    return sum(end - begin for name, entry in header.items() if name != "__metadata__"
               for begin, end in [entry["data_offsets"]] if name.endswith(".weight") or "weight." in name)


def test_qat_int8_loads_as_int8_layers_computing_what_training_evaluated(tmp_path: Path) -> None:
    """The decoded weights are the fake-quantized ones (the same integer codes; code x scale against
    code / (127 / max|W|) is one float32 rounding apart); the int8 layers compute the
    trained grid in integers: against fake quantization in fp32, an input can land one level
    apart where x * S falls within a rounding of a tie (a CPU without VNNI rounds inputs to 7 bits),
    so each output may differ by up to sum_j |W_ij| * (range / levels), one level on every input."""
    trained, checkpoint = train(tmp_path, [QuantizationAwareTraining(include=["hidden", "out", "embed"])])
    report = export_module(checkpoint, BagOfWordsClassifier(), tmp_path / "int8.safetensors")
    assert report.quantization == "int8" and report.activations == "static"
    plain = load_module(BagOfWordsClassifier(), tmp_path / "int8.safetensors", runtime_layers=False)
    for name in ("hidden", "out", "embed"):
        torch.testing.assert_close(getattr(plain, name).weight, getattr(trained, name).weight, rtol=2.4e-7, atol=0)
    loaded = load_module(BagOfWordsClassifier(), tmp_path / "int8.safetensors")
    assert isinstance(loaded.hidden, Int8Linear) and isinstance(loaded.out, Int8Linear)
    with torch.no_grad():
        x = trained.embed(TOKENS).mean(1)  # the hidden layer's input
        levels = 2 ** (static_activation_bits() - 1) - 1  # 127; 63 where the CPU's kernel needs 7-bit inputs
        bound = trained.hidden.weight.abs().sum(1) * float(trained.hidden.input_quantizer.absmax) / levels
        assert ((loaded.hidden(x) - trained.hidden(x)).abs() <= bound + 1e-5).all()
    assert weight_bytes(tmp_path / "int8.safetensors") < FP32_BYTES * 0.3  # int8 values (+ scales)


def test_quant_noise_int4_loads_the_weights_on_its_grid(tmp_path: Path) -> None:
    """Quant-Noise trains for the int4 grid (evaluation sees exact weights): the file holds and
    the loaded model computes with each row on its 4-bit grid."""
    trained, checkpoint = train(tmp_path, [QuantNoise(p=0.2, scheme="int4", block_size=4, include=["hidden", "out"],
                                                      noise_embeddings=False)])
    export_module(checkpoint, BagOfWordsClassifier(), tmp_path / "int4.safetensors")
    loaded = load_module(BagOfWordsClassifier(), tmp_path / "int4.safetensors", runtime_layers=False)
    for name in ("hidden", "out"):
        weight = getattr(trained, name).weight.detach()
        torch.testing.assert_close(getattr(loaded, name).weight, round_to_grid(weight, weight_absmax(weight, True), 4),
                                   rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded.embed.weight, trained.embed.weight, rtol=0, atol=0)


def test_ipq_and_a_lottery_ticket_load_their_codewords_and_zeros(tmp_path: Path) -> None:
    """The ticket's zeros exactly; the codewords as the file stores them, in fp16 (the default
    centroid_bits): the trained weights rounded to fp16."""
    callbacks = [LotteryTicketPruning(sparsity=0.5, rounds=1, round_steps=4, rewind_step=1, include=["hidden"]),
                 IterativeProductQuantization(steps_per_stage=3, stages=[["out"], ["embed"]], centroids=8, block_size=4,
                                              block_sizes={})]
    trained, checkpoint = train(tmp_path, callbacks)
    report = export_module(checkpoint, BagOfWordsClassifier(), tmp_path / "both.safetensors")
    loaded = load_module(BagOfWordsClassifier(), tmp_path / "both.safetensors")
    torch.testing.assert_close(loaded.hidden.weight, trained.hidden.weight, rtol=0, atol=0)
    assert (loaded.hidden.weight == 0).float().mean() == 0.5  # the ticket's zeros
    for name in ("out", "embed"):
        torch.testing.assert_close(getattr(loaded, name).weight, getattr(trained, name).weight.half().float(),
                                   rtol=0, atol=0)
    assert report.bytes_on_disk < FP32_BYTES  # bitmask + survivors, uint8 assignments + codebooks


def test_a_file_for_another_class_or_checkpoint_is_refused(tmp_path: Path) -> None:
    _, checkpoint = train(tmp_path, [QuantizationAwareTraining(include=["hidden"])])
    export_module(checkpoint, BagOfWordsClassifier(), tmp_path / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"embed.weight is \(30, 16\) in the file but \(30, 8\) in the "
                                          r"BagOfWordsClassifier"):
        load_module(BagOfWordsClassifier(dim=8), tmp_path / "model.safetensors")
    with pytest.raises(ModelFileError, match="the checkpoint lacks 2 weights of the Linear, e.g. model.bias"):
        export_module(checkpoint, torch.nn.Linear(4, 4), tmp_path / "other.safetensors", prefix="model.")


def test_qat_fake_quantizes_multihead_attention_out_proj_by_its_weight_only(tmp_path: Path) -> None:
    """nn.MultiheadAttention applies out_proj from its weight inside F.multi_head_attention_forward,
    never calling it: QAT fake-quantizes that weight alone (a hook on its input never fires, its
    activation range would stay 0), the export stores it in int8 without a range, and loading keeps
    it an nn.Linear of the decoded weight (an int8 layer there would never run and the attention
    would find no weight). The attention then computes what it computed in training's evaluation."""
    from compression_contract.manifest import COMPRESSION_KEY
    from tests.callbacks.test_structured_pruning_torch_layers import WIDTH, TorchEncoder, data, padding

    L.seed_everything(0)
    trained = TorchEncoder()
    fit = trainer(tmp_path / "fit", [QuantizationAwareTraining(include=["*"])], max_steps=6)
    fit.fit(trained, data(sentences=32))
    fit.save_checkpoint(tmp_path / "trained.ckpt")
    trained.eval()
    manifest = torch.load(tmp_path / "trained.ckpt", weights_only=False)[COMPRESSION_KEY]
    assert "activation_range" not in manifest["encoder.layers.0.self_attn.out_proj.weight"][0]
    assert "activation_range" in manifest["encoder.layers.0.linear1.weight"][0]
    assert not hasattr(trained.encoder.layers[0].self_attn.out_proj, "input_quantizer")
    export_module(tmp_path / "trained.ckpt", TorchEncoder(), tmp_path / "int8.safetensors")
    loaded = load_module(TorchEncoder(), tmp_path / "int8.safetensors")
    x = torch.randn(5, 3, WIDTH, generator=torch.Generator().manual_seed(1))  # (T, B, E): the layers are sequence-first
    for trained_layer, loaded_layer in zip(trained.encoder.layers, loaded.encoder.layers):
        out_proj = loaded_layer.self_attn.out_proj
        assert isinstance(out_proj, torch.nn.Linear) and not isinstance(out_proj, Int8Linear)
        assert isinstance(loaded_layer.linear1, Int8Linear)
        torch.testing.assert_close(out_proj.weight, trained_layer.self_attn.out_proj.weight, rtol=2.4e-7, atol=0)
        with torch.no_grad():  # code x scale against code / (127 / max|W|): float32 roundings apart
            torch.testing.assert_close(loaded_layer.self_attn(x, x, x, key_padding_mask=padding(3))[0],
                                       trained_layer.self_attn(x, x, x, key_padding_mask=padding(3))[0],
                                       rtol=1e-5, atol=1e-6)
