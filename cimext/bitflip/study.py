"""Accuracy under noisy memory: ``sweep`` over bit-flip probabilities and ``midpoint``, the
probability at which accuracy falls halfway from clean to chance (bisection in log10 p)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .._util import check_finite_weights, check_seed
from .inject import inject


def evaluate(model: nn.Module, data: Iterable) -> tuple[float, int]:
    """(top-1 accuracy, number of classes) in eval mode without gradients; a sample whose
    logits are not all finite counts as wrong (NaN from a flipped exponent decides nothing)."""
    was_training = model.training
    model.eval()
    correct = total = classes = 0
    dev = next((t.device for t in model.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            for x, y in data:
                x, y = x.to(dev), y.to(dev)
                out = model(x)
                classes = out.shape[-1]
                ok = (out.argmax(-1) == y) & torch.isfinite(out).all(-1)
                correct += int(ok.sum())
                total += y.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate: the data yielded no samples")
    return correct / total, classes


def _seeds(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1 (or a list of seeds), got {seeds}")
        return list(range(seeds))
    out = [check_seed(s, "seeds[i]") for s in seeds]
    if not out:
        raise ValueError("seeds must hold at least one seed")
    return out


def noisy_accuracy(model, data, p, seeds, **kw) -> list[float]:
    """Accuracy under ``inject(model, p, seed=s, **kw)`` for every seed s."""
    accs = []
    for s in seeds:
        with inject(model, p, seed=s, **kw):
            accs.append(evaluate(model, data)[0])
    return accs


@dataclass
class SweepResult:
    """Accuracy against bit-flip probability for one storage dtype and bit set."""

    ps: list[float]
    accuracies: list[list[float]]  # [p][seed]
    mean: list[float]
    clean_accuracy: float
    chance: float
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def sweep(
    model: nn.Module,
    data: Iterable,
    ps: Sequence[float],
    *,
    dtype: str = "float32",
    bits: str | int = "all",
    targets: str = "weights",
    seeds: int | Sequence[int] = 3,
    progress=None,
) -> SweepResult:
    """Accuracy of ``model`` on ``data`` under ``inject`` at every p in ``ps`` (several seeds
    each); clean accuracy is p = 0 in the same storage dtype. ``progress``: a callable called
    once per evaluation (a progress bar's update)."""
    t0 = time.perf_counter()
    check_finite_weights(model, "bitflip sweep")
    seeds = _seeds(seeds)
    kw = dict(dtype=dtype, bits=bits, targets=targets)
    with inject(model, 0.0, **kw):
        clean, classes = evaluate(model, data)
    accs, means = [], []
    for p in ps:
        a = noisy_accuracy(model, data, float(p), seeds, **kw)
        accs.append(a)
        means.append(sum(a) / len(a))
        if progress is not None:
            progress(len(seeds))
    return SweepResult(
        ps=[float(p) for p in ps],
        accuracies=accs,
        mean=means,
        clean_accuracy=clean,
        chance=1.0 / classes,
        settings=dict(kw, seeds=seeds),
        seconds=time.perf_counter() - t0,
    )


def midpoint(
    model: nn.Module,
    data: Iterable,
    *,
    dtype: str = "float32",
    bits: str | int = "all",
    targets: str = "weights",
    seeds: int | Sequence[int] = 3,
    lo: float = 1e-10,
    hi: float = 0.5,
    tol: float = 0.05,
    chance: float | None = None,
    progress=None,
) -> float:
    """The bit-flip probability at which the mean accuracy over ``seeds`` falls halfway from
    clean (p = 0, same dtype) to chance (1 / classes unless given): bisection in log10 p on
    [lo, hi] until the bracket is ``tol`` decades wide. Returns math.inf if accuracy is still
    above halfway at ``hi`` and 0.0 if it is already below at ``lo``."""
    if not 0 < lo < hi <= 1:
        raise ValueError(f"midpoint: need 0 < lo < hi <= 1, got lo={lo}, hi={hi}")
    if not tol > 0:
        raise ValueError(f"midpoint: tol must be > 0 decades, got {tol}")
    check_finite_weights(model, "midpoint")
    seeds = _seeds(seeds)
    kw = dict(dtype=dtype, bits=bits, targets=targets)
    with inject(model, 0.0, **kw):
        clean, classes = evaluate(model, data)
    target = 0.5 * (clean + (1.0 / classes if chance is None else chance))

    def above(p: float) -> bool:
        a = noisy_accuracy(model, data, p, seeds, **kw)
        if progress is not None:
            progress(len(seeds))
        return sum(a) / len(a) > target

    if above(hi):
        return math.inf
    if not above(lo):
        return 0.0
    a, b = math.log10(lo), math.log10(hi)
    while b - a > tol:
        mid = 0.5 * (a + b)
        if above(10.0**mid):
            a = mid
        else:
            b = mid
    return 10.0 ** (0.5 * (a + b))


def midpoint_steps(lo: float = 1e-10, hi: float = 0.5, tol: float = 0.05) -> int:
    """Evaluations (per seed) that midpoint makes at most: two ends plus the bisection."""
    return 2 + max(0, math.ceil(math.log2((math.log10(hi) - math.log10(lo)) / tol)))
