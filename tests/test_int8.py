"""Int8Linear: the int8 products equal integer arithmetic on the stored grid, static and dynamic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from callbacks import QuantizationAwareTraining
from nmt_lightning.export.codecs.int8_kernels import Int8Linear, Int8Weight, quantize_weight, static_activation_bits, use_int8_linears


def small_grid_weight(out_features: int, in_features: int, per_channel: bool, seed: int = 0) -> Int8Weight:
    """int8 values within +-64: no pair of uint8 x int8 products can saturate 16 bits, so the
    check below is exact on CPUs without VNNI too (see nmt_lightning/export/codecs/int8_kernels.py)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(-64, 65, (out_features, in_features), generator=generator, dtype=torch.int8)
    scale = (torch.rand(out_features, 1, generator=generator) * 0.01 + 0.001) if per_channel else torch.tensor(0.004)
    return Int8Weight(values, scale)


def away_from_ties(x: torch.Tensor, step: float) -> torch.Tensor:
    """x moved off the rounding midpoints of the grid (the kernel and this test round x / step in
    different precisions, which may disagree within a hair of .5)."""
    fraction = torch.frac((x / step).abs())
    return torch.where((fraction - 0.5).abs() < 0.02, x + 0.05 * step, x)


def integer_reference(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor, activation_bits: int) -> torch.Tensor:
    """What the kernel must compute: x rounded on the static grid of ``activation_bits``, an exact
    integer product, then scaled. 8 bits: the kernel's uint8 code (zero point 128) keeps one level
    below training's -127; fewer bits: clipped to +-M, as in training."""
    limit = 2 ** (activation_bits - 1) - 1
    step = weight.input_absmax / limit
    levels = (-128, 127) if activation_bits == 8 else (-limit, limit)
    codes = torch.clamp(torch.round(x.double() / step), *levels).long()
    product = codes @ weight.values.long().t()  # exact in int64
    return (product.double() * step * weight.scale.double().reshape(1, -1) + bias.double()).float()


@pytest.mark.parametrize("per_channel", [False, True])
def test_static_int8_linear_is_exact_integer_arithmetic(per_channel: bool) -> None:
    weight = small_grid_weight(48, 32, per_channel)
    weight = Int8Weight(weight.values, weight.scale, input_absmax=2.5)
    bias = torch.randn(48)
    layer = Int8Linear(weight, bias)
    step = 2.5 / (2 ** (layer.activation_bits - 1) - 1)
    x = away_from_ties(torch.randn(5, 7, 32) * 1.2, step)  # some inputs beyond the range: they are clipped
    y = layer(x)
    assert y.shape == (5, 7, 48) and y.dtype == torch.float32 and layer.static
    assert layer.activation_bits == static_activation_bits() in (7, 8)  # 7 on CPUs without VNNI
    expected = integer_reference(x.reshape(-1, 32), weight, bias, layer.activation_bits).reshape(5, 7, 48)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_static_int8_linear_matches_the_fake_quantized_layer() -> None:
    """The deployed layer computes what the fake-quantized layer computed in training (inputs within its range)."""
    torch.manual_seed(0)
    qat = torch.nn.Sequential(torch.nn.Linear(32, 24))
    QuantizationAwareTraining(per_channel=True).quantize_modules(qat)
    qat = qat.eval()
    qat[0].input_quantizer.absmax.fill_(3.0)
    x = away_from_ties(torch.randn(16, 32).clamp(-3.0, 3.0), 3.0 / 127)
    raw = qat[0].parametrizations.weight.original.detach()
    int8 = Int8Linear(Int8Weight(*quantize_weight(raw, 8, per_channel=True), input_absmax=3.0), qat[0].bias)
    if int8.activation_bits < 8:
        pytest.skip("this CPU's int8 kernel saturates 8-bit products (no VNNI): static layers run 7-bit")
    with torch.no_grad():
        torch.testing.assert_close(int8(x), qat(x), rtol=1e-5, atol=1e-5)


def test_static_4_bit_grid_clips_at_the_trained_range() -> None:
    values = torch.randint(-7, 8, (8, 16), dtype=torch.int8)
    weight = Int8Weight(values, torch.tensor(0.1), input_absmax=1.0, bits=4)
    x = away_from_ties(torch.randn(10, 16) * 2, 1.0 / 7)  # well beyond the range: 4-bit codes stop at +-7
    expected = integer_reference(x, weight, torch.zeros(8), activation_bits=4)
    torch.testing.assert_close(Int8Linear(weight, None)(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
def test_dynamic_int8_linear_is_close_to_fp32(per_channel: bool) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = Int8Linear(Int8Weight(*quantize_weight(linear.weight.detach(), 8, per_channel)), linear.bias)
    assert not layer.static and "dynamic" in repr(layer)
    x = torch.randn(20, 64)
    with torch.no_grad():
        expected = linear(x)
    error = (layer(x) - expected).abs().max() / expected.abs().max()
    assert error < 0.05  # 8-bit weights, 7-bit activations
    calls = []
    layer.register_forward_hook(lambda *_: calls.append(1))
    assert layer(x.bfloat16()).dtype == torch.bfloat16  # the kernels run fp32; the caller's dtype comes back
    assert len(calls) == 1  # the fp32 detour does not run the module's hooks a second time


def test_weight_values_are_the_stored_grid() -> None:
    weight = small_grid_weight(6, 4, per_channel=True)
    values, scale = Int8Linear(weight, None).weight_values()
    assert torch.equal(values, weight.values)
    torch.testing.assert_close(scale, weight.scale)


def test_use_int8_linears_keeps_the_bias_and_the_shapes() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = model(x)
    use_int8_linears(model, {"2": Int8Weight(*quantize_weight(model[2].weight.detach(), 8, False))})
    assert isinstance(model[2], Int8Linear) and type(model[0]) is torch.nn.Linear
    torch.testing.assert_close(model(x), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("bits", [8, 4])
def test_exact_ties_round_half_to_even_in_the_export_as_in_qat(bits: int) -> None:
    """max|W| = M makes the scale exactly 1, so every x.5 is an exact tie; IEEE rounding (half to
    even, torch.round's and the QAT forward's) gives these codes, written by hand. Rounding half
    away from zero (floor(x + 0.5)) would give 1, 2, 3, -1, -2, -3 and break the export's promise
    of the very codes QAT trained with."""
    from callbacks.quantization_aware_training import round_to_grid, weight_absmax

    limit = 2 ** (bits - 1) - 1
    weight = torch.tensor([[float(limit), 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, limit - 0.5]])
    values, scale = quantize_weight(weight, bits, per_channel=False)
    assert values.tolist() == [[limit, 0, 2, 2, 0, -2, -2, limit - 1]]  # M is odd: M - 0.5 goes down to even M - 1
    assert float(scale) == 1.0
    trained = round_to_grid(weight, weight_absmax(weight, per_channel=False), bits)  # what QAT's forward used
    assert torch.equal(trained, values.float() * scale)


def test_bad_int8_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="2-D int8 tensor"):
        Int8Linear(Int8Weight(torch.zeros(4, 4), torch.tensor(1.0)), None)
    with pytest.raises(ValueError, match="input_absmax must be > 0"):
        Int8Linear(Int8Weight(torch.zeros(4, 4, dtype=torch.int8), torch.tensor(1.0), input_absmax=0.0), None)


SATURATING_CPU = """
import torch
from nmt_lightning.export.codecs.int8_kernels import Int8Linear, Int8Weight, static_activation_bits
from tests.test_int8 import away_from_ties, integer_reference
assert static_activation_bits() == 7, static_activation_bits()
torch.manual_seed(0)
weight = Int8Weight(torch.randint(-127, 128, (64, 256), dtype=torch.int8), torch.tensor(0.01), input_absmax=1.0)
x = away_from_ties(torch.rand(32, 256) * 1.5, 1.0 / 63)  # positive, partly beyond the range: the inputs that saturate 8-bit pairs
torch.testing.assert_close(Int8Linear(weight, None)(x), integer_reference(x, weight, torch.zeros(64), 7),
                           rtol=1e-5, atol=1e-5)
"""


def test_a_cpu_without_vnni_gets_exact_7_bit_static_layers() -> None:
    """FBGEMM_ENABLE_INSTRUCTIONS=AVX2 makes FBGEMM take its AVX2 kernels (16-bit pair sums) on any x86 CPU."""
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        pytest.skip(f"FBGEMM is not this machine's quantized engine ({torch.backends.quantized.engine})")
    root = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", SATURATING_CPU], cwd=root, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
