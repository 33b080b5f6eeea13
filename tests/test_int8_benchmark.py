import time
from pathlib import Path

import torch
from torch import nn

from nmt_lightning.export.codecs.int8_kernels import Int8Linear, Int8Weight, quantize_weight

from tests.conftest import import_benchmark


def test_time_in_linear_layers_counts_fp32_and_int8_linears_only() -> None:
    time_in_linear_layers = import_benchmark("int8_quantization").time_in_linear_layers
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    model[2] = Int8Linear(Int8Weight(*quantize_weight(model[2].weight.detach(), bits=8, per_channel=False)), model[2].bias)

    def work() -> None:
        model(torch.randn(8, 16))
        time.sleep(0.05)  # outside any linear layer

    total, inside = time_in_linear_layers(model, work)
    assert set(inside) == {"other linear"}  # neither name is one of the Transformer's
    assert 0.0 < inside["other linear"] < total and total - inside["other linear"] >= 0.05
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in model.modules())


def test_breakdown_says_how_small_the_rest_must_be_for_the_target() -> None:
    benchmark = import_benchmark("int8_quantization")
    rows = [benchmark.Row("fp32", Path("fp32")), benchmark.Row(benchmark.PTQ_ROW, Path("int8"))]
    timings = {"fp32": [(5.0, {"attention": 1.0, "output projection": 2.0}), (6.0, {"attention": 1.0, "output projection": 2.0})],
               benchmark.PTQ_ROW: [(3.5, {"attention": 0.5, "output projection": 1.0})]}
    lines = benchmark.breakdown_table(rows, timings)
    assert "| fp32 | 5.50 | 1.00 | 2.00 | 3.00 | 2.50 | 55% |" in lines
    assert f"| {benchmark.PTQ_ROW} | 3.50 | 0.50 | 1.00 | 1.50 | 2.00 | 43% |" in lines
    assert lines[-1].startswith("The int8 linear layers of the post-training copy are 2.00x as fast")
    assert lines[-1].endswith("for 1.8x it would have to fall to 0.37 s.")  # (3.0 - 1.8 * 1.5) / 0.8 = 0.375 less a rounding error
    timings[benchmark.PTQ_ROW] = [(3.5, {"attention": 1.0, "output projection": 1.0})]
    assert benchmark.breakdown_table(rows, timings)[-1].endswith("1.8x is out of reach whatever it costs.")


def test_speed_ratio_pairs_each_round_with_the_baselines_same_round() -> None:
    benchmark = import_benchmark("int8_quantization")
    fp32, int8 = benchmark.Row("fp32", Path("fp32")), benchmark.Row("int8", Path("int8"))
    # The host slows down after round 2: both models feel it in the same rounds.
    fp32.speeds, int8.speeds = [80.0, 80.0, 60.0, 60.0, 60.0], [160.0, 160.0, 120.0, 120.0, 120.0]
    assert int8.speed_ratio(fp32) == 2.0
    int8.speeds = [160.0, 160.0, 160.0, 120.0, 120.0]  # its slow spell started a round later
    assert int8.speed_ratio(fp32) == 2.0 and int8.speed / fp32.speed > 2.5
