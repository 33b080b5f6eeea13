import sys
import time
from pathlib import Path

import torch
from torch import nn

BENCHMARKS = Path(__file__).parents[1] / "recipes" / "benchmarks"


def test_time_in_linear_layers_counts_fp32_and_int8_linears_only() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from int8_quantization import time_in_linear_layers
    finally:
        sys.path.pop(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    model[2] = torch.ao.quantization.quantize_dynamic(nn.Sequential(model[2]), {nn.Linear}, dtype=torch.qint8)

    def work() -> None:
        model(torch.randn(8, 16))
        time.sleep(0.05)  # outside any linear layer

    total, inside = time_in_linear_layers(model, work)
    assert set(inside) == {"other linear"}  # neither name is one of the Transformer's
    assert 0.0 < inside["other linear"] < total and total - inside["other linear"] >= 0.05
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in model.modules())
