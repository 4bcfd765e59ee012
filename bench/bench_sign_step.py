"""pytest-benchmark cases for sign_step_ (the same cases as `cimext bench --case sign_step`).

    python -m pytest bench/bench_sign_step.py --benchmark-only --benchmark-group-by=param:model

One F-LWC / weight-PGD step over deltas shaped like every parameter of the model: the fused
multi-tensor op against the naive per-tensor PyTorch loop.

Each case records the peak memory of one call (bench.timing.peak_memory) as extra_info
"peak_mb" (in --benchmark-json); `cimext bench` prints it as a table column.
"""

import pytest
import torch

from bench import suite as B
from cimext import ops


@pytest.mark.parametrize("provider", ["naive", "cimext"])
@pytest.mark.parametrize("model", B.SIGN_STEP_MODELS)
def test_sign_step(benchmark, model, provider):
    shapes = B.sign_step_shapes(model)
    deltas = [0.01 * torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    bounds = [0.01 * (1 + i % 3) for i in range(len(shapes))]
    eta = 0.003

    def naive():
        for d, g, b in zip(deltas, grads, bounds, strict=True):
            d.sub_(eta * g.sign()).clamp_(-b, b)

    fns = {"naive": naive, "cimext": lambda: ops.sign_step_(deltas, grads, eta, bounds)}
    benchmark(fns[provider])
    benchmark.extra_info["peak_mb"] = B.peak_memory(fns[provider])[1]
