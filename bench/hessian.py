"""Benchmarks of the Hessian diagonal: "obd" against one forward + backward (the cost floor), the
exact diagonal GGN and Hutchinson, timed interleaved in one process; and how well "obd" ranks
weights against the exact diagonal GGN (Spearman correlation). Run by bench/bench_hdiag.py and
``cimext bench --case hessian``."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from bench.timing import interleaved
from cimext import models
from cimext.nn import convert
from cimext.writeverify.hessian import diag_ggn_exact, hessian_diag


def _lenet_batch(batch: int, device: torch.device):
    torch.manual_seed(0)
    model = convert(models.lenet()).to(device)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, x, y


def bench_obd(
    *,
    batch: int = 256,
    min_time: float,
    rounds: int,
    device: torch.device | str = "cpu",
    extra: bool = False,
) -> dict:
    """Timings of one forward + backward ("clean") and obd ("cimext") on LeNet (28x28) with one
    batch; with ``extra`` also the exact diagonal GGN and Hutchinson with 10 probes."""
    device = torch.device(device)
    model, x, y = _lenet_batch(batch, device)
    plain = copy.deepcopy(model)
    data = [(x, y)]

    def fwd_bwd():
        plain.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()

    fns = {"clean": fwd_bwd, "cimext": lambda: hessian_diag(model, data, "obd")}
    if extra:
        fns["exact diag GGN"] = lambda: diag_ggn_exact(model, data, chunk=64)
        fns["hutchinson 10 probes"] = lambda: hessian_diag(model, data, "hutchinson", probes=10)
    return interleaved(fns, rounds, min_time)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two flat tensors (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a.double().cpu().numpy(), b.double().cpu().numpy()).statistic)


def ggn_agreement(model, data) -> dict:
    """Spearman correlation of obd against the exact diagonal GGN, over all weights and per
    layer, and the relative L2 difference."""
    obd = hessian_diag(model, data, "obd")
    exact = diag_ggn_exact(model, data)
    a = torch.cat([obd[k].reshape(-1) for k in obd])
    b = torch.cat([exact[k].reshape(-1) for k in obd])
    return dict(
        spearman=spearman(a, b),
        per_layer={k: spearman(obd[k].reshape(-1), exact[k].reshape(-1)) for k in obd},
        rel_l2=float((a - b).norm() / b.norm()),
    )
