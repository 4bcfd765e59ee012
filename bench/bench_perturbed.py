"""pytest-benchmark cases for the perturbed ops and noise generation (same cases as `cimext bench`).

    python -m pytest bench/bench_perturbed.py --benchmark-only --benchmark-group-by=param:case

Compare each group's cimext row against its clean (lower bound) and naive rows; `cimext bench`
prints the same comparison as a table with ratios.

Each case records the peak memory of one call (bench.timing.peak_memory) as extra_info
"peak_mb" (in --benchmark-json); `cimext bench` prints it as a table column.
"""

import pytest
import torch
import torch.nn.functional as F

from bench import suite as B
from cimext import ops

LINEAR = [(b, i, o, s) for (b, i, o) in B.LINEAR_SHAPES for s in (1, 8)]


@pytest.mark.parametrize("provider", ["clean", "naive", "cimext"])
@pytest.mark.parametrize("case", LINEAR, ids=lambda c: "b{}-in{}-out{}-S{}".format(*c))
def test_linear(benchmark, case, provider):
    batch, inp, out, S = case
    x, w, b = torch.randn(batch, inp), torch.randn(out, inp) * 0.05, torch.randn(out)
    seeds = list(range(S))
    fns = {
        "clean": lambda: [F.linear(x, w, b) for _ in seeds],
        "naive": lambda: [
            F.linear(x, w + B.SIGMA * w.abs().max() * torch.randn_like(w), b) for _ in seeds
        ],
        "cimext": lambda: ops.perturbed_linear(x, w, b, gaussian=B.SIGMA, seeds=seeds),
    }
    benchmark(fns[provider])
    benchmark.extra_info["peak_mb"] = B.peak_memory(fns[provider])[1]


@pytest.mark.parametrize("provider", ["clean", "naive", "cimext"])
def test_conv2d(benchmark, provider):
    n, cin, h, wd, cout, k = B.CONV_SHAPE
    x, w = torch.randn(n, cin, h, wd), torch.randn(cout, cin, k, k) * 0.05
    fns = {
        "clean": lambda: F.conv2d(x, w, None, 1, 1),
        "naive": lambda: F.conv2d(x, w + B.SIGMA * w.abs().max() * torch.randn_like(w), None, 1, 1),
        "cimext": lambda: ops.perturbed_conv2d(x, w, None, 1, 1, gaussian=B.SIGMA),
    }
    benchmark(fns[provider])
    benchmark.extra_info["peak_mb"] = B.peak_memory(fns[provider])[1]


@pytest.mark.parametrize("provider", ["torch.randn", "cimext"])
def test_noise(benchmark, provider):
    n = 1 << 22
    w = torch.ones(n)
    fns = {"torch.randn": lambda: torch.randn(n), "cimext": lambda: ops.gaussian_noise(w, 1.0, 1)}
    benchmark(fns[provider])
    benchmark.extra_info["peak_mb"] = B.peak_memory(fns[provider])[1]
