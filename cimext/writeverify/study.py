"""speedup_study(): U-SWIM vs SWIM vs magnitude vs random over σ, uniform and non-uniform devices.

For every σ and both device kinds (uniform: every level at σ; non-uniform: σ·level_sigma[level])
the device model is the model's own layout (M / K bits) with σ and th = th_ratio·σ (DESIGN
section 3: th is in levels, full write-verify then costs about the same pulses per device at every
σ). The weights (or devices, with granularity="device") are ranked by each method's sensitivity
and the smallest fraction of the ranking whose mean accuracy over ``instances`` programmed
instances stays within ``tolerance`` of full write-verify is found by bisection on a fixed grid of
fractions (the pulses grow with the fraction, so the smallest passing fraction spends the fewest
pulses). The speedup is the pulses of full write-verify over the pulses there, as in
:func:`selective_write_verify`, and the instances are common to every method and fraction
(program() lands a device the same way under any mask).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .._util import check_finite_weights, check_seed, device_dict
from .._util import progress as _progress
from ..device import DeviceModel
from ..nn import clean, require_cim_layers
from ..reference import splitmix64
from ..worstcase.monte_carlo import instance_seeds
from .hessian import effective_weight, hessian_diag
from .program import check_max_pulses, draw_layer
from .sensitivity import GRANULARITIES, METHODS, expected_hessian_diag, sensitivity, verify_masks
from .sweep import _accuracy

DEFAULT_SIGMAS = (0.1, 0.2, 0.3, 0.4, 0.5)
KINDS = ("uniform", "non-uniform")
NON_UNIFORM = (0.5, 1.5, 1.5, 0.5)
# The bisection grid: from 0.08 to 0.5 in steps of at most 13 % of the fraction (the pulses, and
# so the speedup read on the grid, within about that of the exact smallest passing fraction),
# coarser below (the one pulse of every unverified device dominates there) and above 0.5
# (under 2x anyway).
STUDY_FRACTIONS = (
    *(0.0, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.07),
    *(0.08, 0.09, 0.1, 0.11, 0.12, 0.135, 0.15, 0.17, 0.19, 0.21, 0.23, 0.25, 0.275, 0.3),
    *(0.33, 0.36, 0.4, 0.45, 0.5, 0.6, 0.7, 0.85, 1.0),
)


def _check_batches(data, name: str, dev, chunk: int = 500) -> list:
    """The batches of ``data`` on ``dev``, cut to at most ``chunk`` samples: the study runs
    thousands of forwards, and on the CPU a 2,000-image LeNet batch takes twice as long as four
    of 500 (its activations no longer fit the allocator's cached blocks)."""
    try:
        batches = [
            (x[i : i + chunk].to(dev), y[i : i + chunk].to(dev))
            for x, y in data
            for i in range(0, int(y.shape[0]), chunk)
        ]
    except (TypeError, ValueError, AttributeError, IndexError):
        raise TypeError(f"{name} must be an iterable of (inputs, labels) tensor batches") from None
    if not batches or sum(int(y.numel()) for _, y in batches) == 0:
        raise ValueError(f"speedup_study: {name} yielded no samples")
    return batches


def _check_sigmas(sigmas) -> list[float]:
    try:
        out = [float(s) for s in sigmas]
    except TypeError:
        raise TypeError(f"sigmas must be a sequence of floats, got {sigmas!r}") from None
    if not out or any(not math.isfinite(s) or s <= 0 for s in out):
        raise ValueError(f"sigmas must be a non-empty sequence of finite floats > 0, got {sigmas}")
    return out


def _check_level_sigma(level_sigma, levels: int) -> tuple[float, ...]:
    if level_sigma is None or isinstance(level_sigma, (str, bytes)):
        raise TypeError(f"level_sigma must be a sequence of {levels} floats, got {level_sigma!r}")
    ls = tuple(float(v) for v in level_sigma)
    if len(ls) != levels or any(not math.isfinite(v) or v < 0 for v in ls):
        raise ValueError(
            f"level_sigma must hold {levels} finite floats >= 0 (one per device level), got "
            f"{level_sigma}"
        )
    return ls


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def study_device(base: DeviceModel, sigma: float, th_ratio: float, level_sigma) -> DeviceModel:
    """``base``'s bit layout with σ, th = th_ratio·σ (and verified_sigma = th) and level_sigma."""
    th = th_ratio * sigma
    return dataclasses.replace(
        base, sigma=sigma, th=th, verified_sigma=th, level_sigma=level_sigma, verify=False
    )


class _Evaluator:
    """Mean accuracy over the study's instances for a verify mask, with the pulses spent."""

    def __init__(self, model, layers, batches, device, seeds, max_pulses):
        self.model, self.batches = model, batches
        self.targets = {n: effective_weight(m) for n, m in layers}
        self.draws = [
            {n: draw_layer(self.targets[n], device, s, m.layer_id, max_pulses) for n, m in layers}
            for s in seeds
        ]

    def __call__(self, masks) -> tuple[float, float, list[float]]:
        accs, pulses = [], 0.0
        for draws in self.draws:
            deltas = {}
            for n, d in draws.items():
                w, p = d.program(None if masks is None else masks[n])
                deltas[n] = w.reshape(self.targets[n].shape).to(self.targets[n]) - self.targets[n]
                pulses += float(p.sum())
            accs.append(_accuracy(self.model, self.batches, deltas))
        return sum(accs) / len(accs), pulses / len(self.draws), accs


@torch.no_grad()
def speedup_study(
    model: nn.Module,
    calib: Iterable,
    data: Iterable,
    *,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    level_sigma: Sequence[float] = NON_UNIFORM,
    methods: Sequence[str] = METHODS,
    granularity: str = "device",
    per_pulse: bool = False,
    hessian_instances: int = 0,
    kinds: Sequence[str] = KINDS,
    instances: int = 8,
    seed: int = 0,
    tolerance: float = 0.005,
    th_ratio: float = 0.1,
    max_pulses: int = 100,
    hessian: str = "obd",
    fractions: Sequence[float] = STUDY_FRACTIONS,
    progress: bool = True,
) -> dict:
    """Programming speedup of selective write-verify per sensitivity method, over ``sigmas``, for
    uniform devices and for non-uniform ones (σ·``level_sigma[level]``), on the converted
    ``model`` (its first CiM layer's DeviceModel gives the weight / device bit layout).

    ``calib`` (e.g. training images) gives the Hessian diagonal; accuracies are measured on
    ``data`` with ``instances`` programmed instances (device seeds from ``seed``), the same for
    every method and fraction. th = ``th_ratio``·σ levels. ``granularity`` ("weight" or "device")
    and ``per_pulse`` are passed to :func:`sensitivity` for "uswim" / "swim" (``per_pulse``:
    loss saved per extra pulse). ``hessian_instances`` > 0 replaces the clean Hessian diagonal
    of "uswim" / "swim" by its mean over that many unverified instances at each σ
    (:func:`expected_hessian_diag`; device seeds disjoint from the evaluation instances).
    ``kinds`` picks "uniform" and / or "non-uniform". The smallest fraction of ``fractions`` (0
    and 1 are always included) within ``tolerance`` (0.005 = 0.5 points) of full write-verify's
    mean accuracy is found by bisection.

    With th proportional to σ every device's ΔVar and expected pulses scale as σ² and 1, so the
    ranking by the clean-Hessian score is the same at every σ; what grows with σ is the share of
    ½·H·ΔVar that must be removed to stay within ``tolerance``, hence the falling speedups.

    Returns a JSON-able dict: ``sigma``, ``settings`` and, under "uniform" and "non-uniform",
    lists over σ of ``<method>_speedup``, ``<method>_fraction`` (fraction verified there),
    ``<method>_accuracy``, ``accuracy_unverified``, ``accuracy_full``, ``pulses_full``,
    ``pulses_unverified`` and ``evaluations``; plus ``clean_accuracy`` and ``seconds``.
    """
    layers = require_cim_layers(model, "speedup_study")
    check_finite_weights(model, "speedup_study")
    seed = check_seed(seed)
    sigmas = _check_sigmas(sigmas)
    base = layers[0][1].device
    level_sigma = _check_level_sigma(level_sigma, 2**base.bits_per_device)
    if isinstance(methods, str):
        raise TypeError(f"methods must be a sequence of method names, got {methods!r}")
    methods = list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods or len(set(methods)) != len(methods):
        raise ValueError(
            f"methods must be a non-empty list of distinct names of {METHODS}, got {methods}"
        )
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not isinstance(per_pulse, bool):
        raise TypeError(f"per_pulse must be a bool, got {per_pulse!r}")
    instances = _positive_int(instances, "instances")
    if isinstance(hessian_instances, bool) or not isinstance(hessian_instances, numbers.Integral):
        raise TypeError(f"hessian_instances must be an int >= 0, got {hessian_instances!r}")
    if hessian_instances < 0:
        raise ValueError(f"hessian_instances must be an int >= 0, got {hessian_instances}")
    if isinstance(kinds, str):
        raise TypeError(f"kinds must be a sequence of names of {KINDS}, got {kinds!r}")
    kinds = list(kinds)
    if not kinds or any(k not in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(
            f"kinds must be a non-empty list of distinct names of {KINDS}, got {kinds}"
        )
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real):
        raise TypeError(f"tolerance must be a float, got {tolerance!r}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    if isinstance(th_ratio, bool) or not isinstance(th_ratio, numbers.Real):
        raise TypeError(f"th_ratio must be a float, got {th_ratio!r}")
    if not 0.0 < th_ratio or not math.isfinite(th_ratio):
        raise ValueError(f"th_ratio must be a finite float > 0, got {th_ratio}")
    max_pulses = check_max_pulses(max_pulses)
    if hessian not in ("obd", "hutchinson"):
        raise ValueError(f"hessian must be 'obd' or 'hutchinson', got {hessian!r}")
    try:
        grid = sorted({float(f) for f in fractions} | {0.0, 1.0})
    except TypeError:
        raise TypeError(f"fractions must be a sequence of floats, got {fractions!r}") from None
    if any(not 0.0 <= f <= 1.0 or math.isnan(f) for f in grid):
        raise ValueError(f"fractions must be in [0, 1], got {list(fractions)}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {progress!r}")
    dev = next(model.parameters()).device
    batches = _check_batches(data, "data", dev)
    calib = _check_batches(calib, "calib", dev)

    t0 = time.perf_counter()
    seeds = instance_seeds(seed, instances)
    kinds = {k: (None if k == "uniform" else level_sigma) for k in kinds}
    out: dict = dict(
        sigma=sigmas,
        methods=methods,
        settings=dict(
            instances=instances,
            seed=seed,
            tolerance=float(tolerance),
            th_ratio=float(th_ratio),
            max_pulses=max_pulses,
            hessian=hessian,
            granularity=granularity,
            per_pulse=per_pulse,
            hessian_instances=int(hessian_instances),
            level_sigma=list(level_sigma),
            fractions=grid,
            test_samples=sum(int(y.numel()) for _, y in batches),
            calib_samples=sum(int(y.numel()) for _, y in calib),
            device=device_dict(base),
        ),
    )
    was_training = model.training
    model.eval()
    bar = _progress(total=len(sigmas) * len(kinds), enabled=progress, desc="speedup study")
    try:
        with clean(model):
            out["clean_accuracy"] = _accuracy(model, batches, {})
            h = None
            if any(m in ("uswim", "swim") for m in methods):
                with torch.enable_grad():
                    h = hessian_diag(model, calib, hessian)
            for kind, ls in kinds.items():
                rows: dict[str, list] = {}
                for sigma in sigmas:
                    device = study_device(base, sigma, float(th_ratio), ls)
                    hc = h
                    if h is not None and hessian_instances:
                        # Device seeds disjoint from the evaluation instances' (a different base).
                        with torch.enable_grad():
                            hc = expected_hessian_diag(
                                model, calib, device, int(hessian_instances),
                                seed=splitmix64(seed ^ 0x5EED), method=hessian,
                                max_pulses=max_pulses,
                            )  # fmt: skip
                    cell = _study_cell(
                        model, layers, batches, device, hc, methods, granularity, per_pulse,
                        seeds, seed, max_pulses, tolerance, grid,
                    )  # fmt: skip
                    for k, v in cell.items():
                        rows.setdefault(k, []).append(v)
                    if bar is not None:
                        bar.update(1)
                out[kind] = rows
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    out["seconds"] = time.perf_counter() - t0
    return out


def _study_cell(
    model, layers, batches, device, h, methods, granularity, per_pulse, seeds, seed, max_pulses,
    tolerance, grid,
) -> dict:  # fmt: skip
    """Speedups of every method at one device setting."""
    ev = _Evaluator(model, layers, batches, device, seeds, max_pulses)
    acc_none, p_none, _ = ev(None)
    acc_full, p_full, _ = ev(
        {n: torch.ones(t.numel(), dtype=torch.bool) for n, t in ev.targets.items()}
    )
    floor = acc_full - tolerance
    cell = dict(
        accuracy_unverified=acc_none,
        accuracy_full=acc_full,
        pulses_unverified=p_none,
        pulses_full=p_full,
    )
    evaluations = 2
    for m in methods:
        scores = sensitivity(
            model, batches, device, m, hessian=h, seed=seed, granularity=granularity,
            per_pulse=per_pulse and m in ("uswim", "swim"), max_pulses=max_pulses,
        )  # fmt: skip
        known: dict[int, tuple[float, float]] = {
            0: (acc_none, p_none),
            len(grid) - 1: (acc_full, p_full),
        }
        lo, hi = 0, len(grid) - 1  # lo fails (unless 0 passes), hi passes
        if acc_none >= floor:
            hi = 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            masks, _ = verify_masks(scores, grid[mid])
            a, p, _ = ev(masks)
            known[mid] = (a, p)
            evaluations += 1
            if a >= floor:
                hi = mid
            else:
                lo = mid
        a, p = known[hi]
        cell[f"{m}_speedup"] = p_full / p
        cell[f"{m}_fraction"] = grid[hi]
        cell[f"{m}_accuracy"] = a
        cell[f"{m}_pulses"] = p
    cell["evaluations"] = evaluations
    return cell
