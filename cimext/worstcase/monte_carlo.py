"""cimext.worstcase.monte_carlo: accuracy of n device instances of a converted model.

Instance i of a run with seed s has device seed splitmix64(s ^ splitmix64(i)), so (seed, n)
reproduces a run exactly and a run with n instances is a prefix of one with more. Many instances
go through each forward at once (cimext.instance(model, seeds=[...]) folds them into the batch),
so per-call overheads are shared and nothing but the instance seeds is stored.

Under ``torchrun`` the chunks of instances are dealt round-robin to the ranks and the
per-instance accuracies gathered on every rank: each chunk is computed exactly as a single process
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
from ..device import DeviceModel
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
    from ..nn import cim_layers

    layers = [m for _, m in cim_layers(model)]
    saved = [m.device for m in layers]
    try:
        for m in layers:
            m.device = device
        yield
    finally:
        for m, d in zip(layers, saved, strict=True):
            m.device = d


def _progress(it, enabled: bool, total: int, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True)


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
) -> MonteCarloResult:
    """Accuracy of ``n`` device instances of the converted ``model`` over ``data`` (an iterable
    of (inputs, labels) batches), every CiM layer programmed with DeviceModel ``device``.

    Use ``DeviceModel.verified(th_g)`` for the write-verified population that the worst-case
    methods are compared with. ``instances_per_call`` instances share each forward (default: as
    many as keep about 8192 samples per forward). ``start`` offsets the instance indices (a shard
    of a larger run). Under torchrun (a torch.distributed process group of more than one
    process) every rank must call it with the same arguments; the instances are sharded across
    the ranks and every rank gets the full result. Returns a MonteCarloResult.
    """
    from ..nn import clean, instance, require_cim_layers, unfold

    require_cim_layers(model, "monte_carlo")
    if not isinstance(device, DeviceModel):
        raise TypeError(f"device must be a cimext.DeviceModel, got {type(device).__name__}")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if instances_per_call is not None and (
        isinstance(instances_per_call, bool) or int(instances_per_call) < 1
    ):
        raise ValueError(f"instances_per_call must be >= 1, got {instances_per_call!r}")
    p = next(model.parameters())
    batches = [(x.to(p.device), y.to(p.device)) for x, y in data]
    samples = sum(int(y.numel()) for _, y in batches)
    if samples == 0:
        raise ValueError("monte_carlo: the data yielded no samples")
    largest = max(int(y.numel()) for _, y in batches)
    k = int(instances_per_call or max(1, min(n, 8192 // largest)))

    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with clean(model):
            correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in batches)
        clean_acc = correct / samples
        acc = torch.zeros(n, dtype=torch.float64)
        # Under torchrun each rank takes every world-th chunk (chunk boundaries as in one process).
        rank, world = distributed.rank(), distributed.world_size()
        chunks = range(0, n, k)[rank::world]
        progress = progress and rank == 0
        with _population(model, device):
            for c0 in _progress(chunks, progress, len(chunks), "monte carlo"):
                seeds = instance_seeds(seed, min(k, n - c0), start + c0)
                hits = torch.zeros(len(seeds), dtype=torch.int64, device=p.device)
                with instance(model, seeds=seeds):
                    for x, y in batches:
                        pred = unfold(model(x), len(seeds)).argmax(-1)
                        hits += (pred == y).sum(1)
                acc[c0 : c0 + len(seeds)] = hits.cpu().double() / samples
        if world > 1:
            mine = {c0: acc[c0 : c0 + min(k, n - c0)].tolist() for c0 in chunks}
            for part in distributed.all_gather_object(mine):
                for c0, values in part.items():
                    acc[c0 : c0 + len(values)] = torch.tensor(values, dtype=torch.float64)
    finally:
        model.train(was_training)
    return MonteCarloResult(
        accuracies=acc.tolist(),
        seed=int(seed),
        n=int(n),
        device=_device_dict(device),
        clean_accuracy=clean_acc,
        seconds=time.perf_counter() - t0,
        samples=samples,
        settings=dict(instances_per_call=k, start=start, ranks=world),
    )


def _device_dict(device: DeviceModel) -> dict:
    from dataclasses import asdict

    d = asdict(device)
    d["level_sigma"] = list(d["level_sigma"]) if d["level_sigma"] is not None else None
    return d
