"""cimext.worstcase.monte_carlo: accuracy of n device instances of a converted model.

Instance i of a run with seed s has device seed splitmix64(s ^ splitmix64(i)), so (seed, n)
reproduces a run exactly and a run with n instances is a prefix of one with more. A few
instances share each forward (cimext.instance(model, seeds=[...]) folds them into the batch), so
per-call overheads are shared. On the CPU each instance's perturbed weights are built once per
chunk and reused for every batch; nothing but one chunk's weights and the seeds is stored.

Under ``torchrun`` each rank computes a contiguous block of the instances and the per-instance
accuracies are gathered on every rank: every instance is computed exactly as a single process
computes it, so the result is identical to the single-process one for the same seeds.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import distributed
from .._util import check_finite_weights, check_seed, device_dict
from .._util import progress as _progress
from ..device import DeviceModel
from ..nn import cim_layers, clean, instance, require_cim_layers, unfold
from ..reference import splitmix64


def instance_seeds(seed: int, n: int, start: int = 0) -> list[int]:
    """Device seeds of instances start .. start + n - 1 of a Monte Carlo run with ``seed``."""
    base = int(seed) & 0xFFFFFFFFFFFFFFFF
    return [splitmix64(base ^ splitmix64(i)) for i in range(start, start + n)]


@dataclass
class MonteCarloResult:
    """Per-instance accuracies of a Monte Carlo run and what reproduces it."""

    accuracies: list[float]
    seed: int
    n: int
    device: dict
    clean_accuracy: float
    seconds: float
    samples: int
    settings: dict = field(default_factory=dict)

    def _t(self) -> torch.Tensor:
        return torch.tensor(self.accuracies, dtype=torch.float64)

    @property
    def min(self) -> float:
        return float(self._t().min())

    @property
    def max(self) -> float:
        return float(self._t().max())

    @property
    def mean(self) -> float:
        return float(self._t().mean())

    @property
    def std(self) -> float:
        return float(self._t().std(unbiased=True)) if self.n > 1 else 0.0

    def quantile(self, q: float) -> float:
        """The q-quantile (0 <= q <= 1) of the per-instance accuracies."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q}")
        return float(torch.quantile(self._t(), q))

    def seeds(self) -> list[int]:
        """The device seed of every instance, in order (cimext.instance(model, s) replays one)."""
        return instance_seeds(self.seed, self.n)

    def summary(self) -> dict:
        return dict(
            n=self.n,
            min=self.min,
            mean=self.mean,
            std=self.std,
            max=self.max,
            q01=self.quantile(0.01),
            median=self.quantile(0.5),
            clean=self.clean_accuracy,
        )

    def to_json(self) -> str:
        d = dict(
            kind="monte_carlo",
            seed=self.seed,
            n=self.n,
            device=self.device,
            clean_accuracy=self.clean_accuracy,
            seconds=self.seconds,
            samples=self.samples,
            settings=self.settings,
            summary=self.summary(),
            accuracies=self.accuracies,
        )
        return json.dumps(d, indent=1)


@contextlib.contextmanager
def _population(model: nn.Module, device: DeviceModel) -> Iterator[None]:
    """Every CiM layer uses ``device`` inside the block; the layers' own models come back after."""

    layers = [m for _, m in cim_layers(model)]
    saved = [m.device for m in layers]
    try:
        for m in layers:
            m.device = device
        yield
    finally:
        for m, d in zip(layers, saved, strict=True):
            m.device = d


# Instances per forward. The fused path (GPU) takes every instance of a call in one launch, so
# large calls pay: about FUSED_SAMPLES samples per forward. On the CPU path the best number
# depends on the machine: measured with bench/bench_monte_carlo.py on 2 cores (LeNet, batches of
# 256), one thread was fastest at 1-2 instances per forward (from 4 on, activations leave the
# cache: 1.3-1.5x), while two threads on a loaded machine gained from 4-16 (fewer, larger
# parallel regions). So monte_carlo times the first chunks with TUNE_CANDIDATES instances per
# forward in turn (real instances: nothing is wasted), stops at the first that is clearly slower
# per instance than the best so far (bigger chunks only cost more memory from there), keeps the
# fastest and remembers it for the same model, batch shape and thread count (_TUNED).
FUSED_SAMPLES = 8192
TUNE_CANDIDATES = (1, 2, 4, 8)
TUNE_SLOWER = 1.10  # a candidate this much slower per instance than the best ends the tuning
MAX_FOLD_SAMPLES = 2048  # CPU path: at most this many samples per forward (activation memory)
DEFAULT_INSTANCES = 2  # CPU path, when there are too few instances to tune
# The CPU path keeps k perturbed copies of the weights per chunk: at most this many bytes.
WEIGHT_BUDGET = 512 * 2**20
_TUNED: dict[tuple, int] = {}


def _shard(n: int, rank: int, world: int) -> range:
    """The contiguous block of instance indices ``rank`` of ``world`` computes. It depends only
    on n and the world size (not on instances per forward, which each rank may choose itself)."""
    return range(n * rank // world, n * (rank + 1) // world)


def _tune_key(model: nn.Module, batches: list, fused: bool) -> tuple:

    x = batches[0][0]
    layers = tuple((n, tuple(m.weight.shape)) for n, m in cim_layers(model))
    return (
        type(model).__qualname__,
        layers,
        tuple(x.shape),
        x.dtype,
        str(x.device),
        fused,
        torch.get_num_threads(),
    )


def _plan(
    n: int, largest: int, weight_bytes: int, fused: bool, key: tuple, given: int | None
) -> tuple[list[int], bool]:
    """Chunk sizes to start with and whether to time them (tuning); the last size repeats."""
    if given is not None:
        return [given], False
    if fused:
        return [max(1, min(n, FUSED_SAMPLES // largest))], False
    cap = max(1, min(WEIGHT_BUDGET // max(1, weight_bytes), MAX_FOLD_SAMPLES // largest))
    if key in _TUNED:
        return [max(1, min(_TUNED[key], cap, n))], False
    cands = [k for k in TUNE_CANDIDATES if k <= cap]
    if len(cands) < 2 or n < sum(cands):  # nothing to choose, or too few instances to time
        return [max(1, min(DEFAULT_INSTANCES, cap, n))], False
    return cands, True


@torch.no_grad()
def monte_carlo(
    model: nn.Module,
    data: Iterable,
    device: DeviceModel,
    n: int,
    *,
    seed: int = 0,
    instances_per_call: int | None = None,
    progress: bool = True,
    start: int = 0,
    fused: bool | None = None,
    clean_accuracy: bool = True,
) -> MonteCarloResult:
    """Accuracy of ``n`` device instances of the converted ``model`` over ``data`` (an iterable
    of (inputs, labels) batches), every CiM layer programmed with DeviceModel ``device``.

    Use ``DeviceModel.verified(th_g)`` for the write-verified population that the worst-case
    methods are compared with. Instances are evaluated ``instances_per_call`` at a time (default:
    measured on the first chunks, see TUNE_CANDIDATES), each exactly as
    ``cimext.instance(model, seed)`` evaluates one instance, so the accuracies do not depend on
    the chunking.

    On the CPU each chunk builds every layer's W + δ + ΔW once (O(parameters) per instance, in
    storage reused from chunk to chunk) and runs the data through plain GEMMs and convolutions;
    ``fused=True`` (the default on a GPU, and for weights over WEIGHT_BUDGET bytes) calls the
    fused ops instead, which regenerate ΔW per batch and store no weights. Memory stays bounded
    whatever ``n``: one chunk's weights (CPU) and activations. ``start`` offsets the instance
    indices (a shard of a larger run); ``clean_accuracy=False`` skips the clean pass (the
    result's clean_accuracy is then NaN).
    Under torchrun (a torch.distributed process group of more than one process) every rank must
    call it with the same arguments; each rank computes a contiguous block of the instances and
    every rank gets the full result. Returns a MonteCarloResult.
    """

    require_cim_layers(model, "monte_carlo")
    seed = check_seed(seed)
    check_finite_weights(model, "monte_carlo")
    if not isinstance(device, DeviceModel):
        raise TypeError(f"device must be a cimext.DeviceModel, got {type(device).__name__}")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if instances_per_call is not None and (
        isinstance(instances_per_call, bool)
        or not isinstance(instances_per_call, numbers.Integral)
        or instances_per_call < 1
    ):
        raise ValueError(f"instances_per_call must be an int >= 1, got {instances_per_call!r}")
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool or None, got {fused!r}")
    if isinstance(start, bool) or not isinstance(start, numbers.Integral) or start < 0:
        raise ValueError(f"start must be an int >= 0, got {start!r}")
    if not isinstance(clean_accuracy, bool):
        raise TypeError(f"clean_accuracy must be a bool, got {clean_accuracy!r}")
    p = next(model.parameters())
    batches = [(x.to(p.device), y.to(p.device)) for x, y in data]
    samples = sum(int(y.numel()) for _, y in batches)
    if samples == 0:
        raise ValueError("monte_carlo: the data yielded no samples")
    largest = max(int(y.numel()) for _, y in batches)
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for _, m in cim_layers(model))
    if fused is None:
        # The fused ops store no weights: on a GPU they win, and a model whose weights exceed
        # the budget would not fit one instance's copy.
        fused = p.device.type != "cpu" or weight_bytes > WEIGHT_BUDGET
    rank, world = distributed.rank(), distributed.world_size()
    mine = _shard(n, rank, world)
    key = _tune_key(model, batches, fused)
    sizes, tuning = _plan(len(mine), largest, weight_bytes, fused, key, instances_per_call)

    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        clean_acc = float("nan")
        if clean_accuracy:
            with clean(model):
                correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in batches)
            clean_acc = correct / samples
        acc = torch.zeros(n, dtype=torch.float64)
        bar = _progress(total=len(mine), enabled=progress and rank == 0, desc="monte carlo")
        timings: dict[int, float] = {}
        # Storage of the chunk's perturbed weights, allocated once and reused by every chunk.
        buffers: dict = {}
        c0 = mine.start
        pending = list(sizes) if tuning else []
        k = sizes[0]
        with _population(model, device):
            while c0 < mine.stop:
                if pending:
                    k = pending.pop(0)
                seeds = instance_seeds(seed, min(k, mine.stop - c0), start + c0)
                t_chunk = time.perf_counter()
                hits = torch.zeros(len(seeds), dtype=torch.int64, device=p.device)
                # One instance: the plain instance mode (no stacking of per-instance outputs).
                which = dict(seed=seeds[0]) if len(seeds) == 1 else dict(seeds=seeds)
                ctx = instance(model, **which, reuse_weights=not fused, _buffers=buffers)
                with ctx:
                    for x, y in batches:
                        pred = unfold(model(x), len(seeds)).argmax(-1)
                        hits += (pred == y).sum(1)
                acc[c0 : c0 + len(seeds)] = hits.cpu().double() / samples
                if tuning:
                    timings[k] = (time.perf_counter() - t_chunk) / len(seeds)
                    best = min(timings, key=timings.get)
                    if not pending or timings[k] > TUNE_SLOWER * timings[best]:
                        k = _TUNED[key] = best
                        pending, tuning = [], False
                c0 += len(seeds)
                if bar is not None:
                    bar.update(len(seeds))
        if bar is not None:
            bar.close()
        del buffers
        if world > 1:
            for lo, values in distributed.all_gather_object((mine.start, acc[mine].tolist())):
                acc[lo : lo + len(values)] = torch.tensor(values, dtype=torch.float64)
    finally:
        model.train(was_training)
    return MonteCarloResult(
        accuracies=acc.tolist(),
        seed=int(seed),
        n=int(n),
        device=device_dict(device),
        clean_accuracy=clean_acc,
        seconds=time.perf_counter() - t0,
        samples=samples,
        settings=dict(
            instances_per_call=k,
            tuned={str(k): v for k, v in timings.items()},
            start=start,
            ranks=world,
            fused=fused,
        ),
    )
