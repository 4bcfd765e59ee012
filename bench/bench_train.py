"""pytest-benchmark cases for training steps (the same cases as `cimext bench --case "train step"`).

    python -m pytest bench/bench_train.py --benchmark-only --benchmark-group-by=param:batch

One optimizer step of LeNet (28x28, batch 128): vanilla on the plain model (the baseline), and
on the converted model VA / TRICE (noise in every forward), adversarial weight training and
A-TRICE (alpha = 0.5: sign-step perturbation search, adversarial pass and RCG noise pass). The
issue's target: an A-TRICE step costs at most 3.5x a vanilla step; `cimext bench --case atrice`
prints the ratio measured in one process with interleaved rounds.

Each case records the peak memory of one call (bench.timing.peak_memory) as extra_info
"peak_mb" (in --benchmark-json); `cimext bench` prints it as a table column.
"""

import copy

import pytest
import torch

from bench import suite as B
from cimext import models
from cimext.nn import convert
from cimext.train import METHODS, StepContext

SETTINGS = dict(
    th_g=0.03, step_size=0.03, adv_steps=1, kappa=0.0, alpha=0.5, sigma_t=0.1, th_rcg=1.0
)


@pytest.mark.parametrize("batch", [128])
@pytest.mark.parametrize("method", ["vanilla", "va", "trice", "adv", "atrice"])
def test_train_step(benchmark, method, batch):
    torch.manual_seed(0)
    plain = models.lenet()
    model = plain if method == "vanilla" else convert(copy.deepcopy(plain))
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    settings = dict(SETTINGS, device=None)
    gen = torch.Generator().manual_seed(0)

    def step():
        loss = METHODS[method](model, x, y, StepContext(settings, 0, 0, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    benchmark(step)
    benchmark.extra_info["peak_mb"] = B.peak_memory(step)[1]
