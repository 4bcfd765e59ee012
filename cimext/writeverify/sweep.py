"""selective_write_verify(): accuracy against the fraction verified and the pulses spent.

For each method the weights are ranked once by sensitivity; for each fraction f the top f of all
weights are write-verified. Every programmed instance i (device seed i of the run's seed, as in
Monte Carlo) is drawn once and reused for every method and fraction (common random numbers:
program() gives a device the same outcome under any mask), so differences between methods are
not sampling noise of the instances. The speedup of a method is the pulses of full write-verify
over the fewest pulses with which its mean accuracy is within ``tolerance`` of full
write-verify's.
"""

from __future__ import annotations

import json
import math
import numbers
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .._util import check_finite_weights, check_seed, device_dict
from .._util import progress as _progress
from ..device import DeviceModel
from ..nn import clean, perturbation, require_cim_layers
from ..worstcase.monte_carlo import instance_seeds
from .hessian import effective_weight, hessian_diag
from .program import check_max_pulses, draw_layer, expected_pulses
from .sensitivity import METHODS, sensitivity, verify_masks

DEFAULT_FRACTIONS = (
    *(0.0, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075),
    *(0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.4, 0.5, 1.0),
)


@dataclass
class SweepPoint:
    """One (method, fraction) cell: accuracies over the instances and the pulses spent."""

    fraction: float
    verified: int
    pulses: float  # mean total pulses over the instances
    mean: float
    q01: float
    std: float
    min: float


@dataclass
class SweepResult:
    """Accuracy of selective write-verify per method and fraction, and the speedups."""

    methods: dict[str, list[SweepPoint]]
    full: SweepPoint
    none: SweepPoint
    clean_accuracy: float
    weights: int
    speedup: dict[str, dict]
    tolerance: float
    instances: int
    seed: int
    device: dict
    seconds: float
    settings: dict = field(default_factory=dict)

    def to_json(self) -> str:
        d = dict(
            kind="selective_write_verify",
            clean_accuracy=self.clean_accuracy,
            weights=self.weights,
            instances=self.instances,
            seed=self.seed,
            tolerance=self.tolerance,
            device=self.device,
            seconds=self.seconds,
            settings=self.settings,
            full=asdict(self.full),
            none=asdict(self.none),
            speedup=self.speedup,
            methods={k: [asdict(p) for p in v] for k, v in self.methods.items()},
        )
        return json.dumps(d, indent=1)

    def plot(self, path_prefix: str) -> list[str]:
        """Accuracy (mean solid, 1st percentile dashed) against the fraction verified and against
        total pulses; writes <prefix>_fraction.png and <prefix>_pulses.png, returns the paths."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        paths = []
        for xkey, xlabel, fname in (
            ("fraction", "fraction of weights write-verified", "fraction"),
            ("pulses", "total programming pulses", "pulses"),
        ):
            fig, ax = plt.subplots(figsize=(6, 4))
            for i, (method, pts) in enumerate(self.methods.items()):
                color = f"C{i}"
                xs = [getattr(p, xkey) for p in pts]
                ax.plot(xs, [100 * p.mean for p in pts], "-o", ms=3, color=color, label=method)
                ax.plot(xs, [100 * p.q01 for p in pts], "--", color=color, alpha=0.6)
            ax.axhline(100 * self.full.mean, color="k", lw=0.8, label="full write-verify")
            ax.axhline(
                100 * (self.full.mean - self.tolerance), color="k", lw=0.8, ls=":", label="-tol"
            )
            if xkey == "pulses":
                ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("accuracy % (mean; dashed: 1st percentile)")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = f"{path_prefix}_{fname}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            paths.append(path)
        return paths


def _point(fraction, verified, pulses, acc: torch.Tensor) -> SweepPoint:
    return SweepPoint(
        fraction=float(fraction),
        verified=int(verified),
        pulses=float(pulses),
        mean=float(acc.mean()),
        q01=float(torch.quantile(acc, 0.01)),
        std=float(acc.std()) if acc.numel() > 1 else 0.0,
        min=float(acc.min()),
    )


def _accuracy(model, batches, deltas) -> float:
    correct = total = 0
    with perturbation(model, deltas):
        for x, y in batches:
            correct += int((model(x).argmax(-1) == y).sum())
            total += int(y.numel())
    return correct / total


def _batched_accuracy(model, layers, batches, weight_sets, chunk: int = 16) -> list[float]:
    """Accuracy of the model with each of ``weight_sets`` (layer name -> weight) in place of the
    CiM weights: vmap over stacked weights, so many programmed copies share each forward."""
    from torch.func import functional_call, vmap

    if any(m.quant is not None and m.quant.weight_bits is not None for _, m in layers):
        # The layer would quantize a substituted weight again: perturb the target instead.
        targets = {n: effective_weight(m) for n, m in layers}
        return [
            _accuracy(model, batches, {n: ws[n] - targets[n] for n in targets})
            for ws in weight_sets
        ]
    keys = [(n, f"{n}.weight" if n else "weight") for n, _ in layers]
    out: list[float] = []
    for c0 in range(0, len(weight_sets), chunk):
        sets = weight_sets[c0 : c0 + chunk]
        params = {pn: torch.stack([ws[n] for ws in sets]) for n, pn in keys}
        correct = torch.zeros(len(sets), dtype=torch.int64)
        total = 0
        for x, y in batches:
            logits = vmap(lambda p, x=x: functional_call(model, p, (x,)))(params)
            correct += (logits.argmax(-1) == y).sum(1).cpu()
            total += int(y.numel())
        out += (correct.double() / total).tolist()
    return out


@torch.no_grad()
def selective_write_verify(
    model: nn.Module,
    data: Iterable,
    device: DeviceModel,
    *,
    calib: Iterable | None = None,
    methods: Sequence[str] = METHODS,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    instances: int = 100,
    seed: int = 0,
    max_pulses: int = 100,
    tolerance: float = 0.005,
    hessian: str = "obd",
    granularity: str = "weight",
    progress: bool = True,
) -> SweepResult:
    """Accuracy over ``data`` of ``instances`` programmed instances of the converted ``model`` for
    each sensitivity ``method`` and each fraction of weights verified, on DeviceModel ``device``.

    Sensitivities use ``calib`` (default ``data``) for the Hessian. granularity="device" verifies
    single devices (fractions are then of all devices) instead of all devices of a weight.
    ``tolerance`` is the accuracy loss (a fraction: 0.005 = 0.5 points) against full
    write-verify at which speedups are read.
    Returns a SweepResult (``.to_json()``, ``.plot(prefix)``).
    """
    layers = require_cim_layers(model, "selective_write_verify")
    seed = check_seed(seed)
    check_finite_weights(model, "selective_write_verify")
    if not isinstance(device, DeviceModel):
        raise TypeError(f"device must be a cimext.DeviceModel, got {type(device).__name__}")
    methods = list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods must be a non-empty list of {METHODS}, got {methods}")
    fr = sorted({float(f) for f in fractions} | {0.0, 1.0})
    if any(not 0.0 <= f <= 1.0 or math.isnan(f) for f in fr):
        raise ValueError(f"fractions must be in [0, 1], got {list(fractions)}")
    if isinstance(instances, bool) or not isinstance(instances, numbers.Integral) or instances < 1:
        raise ValueError(f"instances must be an int >= 1, got {instances!r}")
    if granularity not in ("weight", "device"):
        raise ValueError(f"granularity must be 'weight' or 'device', got {granularity!r}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    max_pulses = check_max_pulses(max_pulses)
    t0 = time.perf_counter()
    dev = next(model.parameters()).device
    batches = [(x.to(dev), y.to(dev)) for x, y in data]
    if not batches or sum(int(y.numel()) for _, y in batches) == 0:
        raise ValueError("selective_write_verify: the data yielded no samples")
    calib = batches if calib is None else calib

    was_training = model.training
    model.eval()
    try:
        with clean(model):
            clean_acc = _accuracy(model, batches, {})
            h = None
            if any(m in ("uswim", "swim") for m in methods):
                with torch.enable_grad():
                    h = hessian_diag(model, calib, hessian)
            scores = {
                m: sensitivity(
                    model, calib, device, m, hessian=h, seed=seed, granularity=granularity
                )
                for m in methods
            }
            targets = {n: effective_weight(m) for n, m in layers}
            inner = [f for f in fr if 0.0 < f < 1.0]
            masks = {
                m: [verify_masks(scores[m], f) for f in inner] for m in methods
            }  # (masks, k) per fraction
            total_weights = sum(t.numel() for t in targets.values())
            acc = {m: torch.zeros(len(inner), instances, dtype=torch.float64) for m in methods}
            pulses = {m: torch.zeros(len(inner), instances, dtype=torch.float64) for m in methods}
            acc_none = torch.zeros(instances, dtype=torch.float64)
            acc_full = torch.zeros(instances, dtype=torch.float64)
            p_none = p_full = 0.0
            bar = _progress(total=instances, enabled=progress, desc="write-verify instances")
            full_masks = {n: torch.ones(t.numel(), dtype=torch.bool) for n, t in targets.items()}
            # Every (method, fraction) cell of one instance: the "none" and "full" rows first.
            cells = [(None, None, lambda n: None), (None, None, lambda n: full_masks[n])]
            for m in methods:
                for j, (mk, _) in enumerate(masks[m]):
                    cells.append((m, j, lambda n, mk=mk: mk[n].reshape(-1)))
            for i, s in enumerate(instance_seeds(seed, instances)):
                draws = {
                    n: draw_layer(targets[n], device, s, m.layer_id, max_pulses) for n, m in layers
                }
                weight_sets, totals = [], []
                for _, _, mask_of in cells:
                    ws, total = {}, 0
                    for n, d in draws.items():
                        w, p = d.program(mask_of(n))
                        ws[n] = w.reshape(targets[n].shape).to(targets[n])
                        total += int(p.sum())
                    weight_sets.append(ws)
                    totals.append(total)
                accs = _batched_accuracy(model, layers, batches, weight_sets)
                acc_none[i], acc_full[i] = accs[0], accs[1]
                p_none += totals[0] / instances
                p_full += totals[1] / instances
                for (m, j, _), a, t in zip(cells[2:], accs[2:], totals[2:], strict=True):
                    acc[m][j, i], pulses[m][j, i] = a, t
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
    finally:
        model.train(was_training)

    none = _point(0.0, 0, p_none, acc_none)
    units = total_weights * (device.devices if granularity == "device" else 1)
    full = _point(1.0, units, p_full, acc_full)
    out_methods: dict[str, list[SweepPoint]] = {}
    speedup: dict[str, dict] = {}
    for m in methods:
        pts = [none]
        for j, f in enumerate(inner):
            pts.append(_point(f, masks[m][j][1], float(pulses[m][j].mean()), acc[m][j]))
        pts.append(full)
        out_methods[m] = pts
        ok = [p for p in pts if p.mean >= full.mean - tolerance]
        best = min(ok, key=lambda p: p.pulses)
        speedup[m] = dict(
            fraction=best.fraction,
            pulses=best.pulses,
            mean=best.mean,
            q01=best.q01,
            speedup=full.pulses / best.pulses,
        )
    sig_mean = None
    if device.level_sigma is not None:
        sig_mean = [float(device.sigma * v) for v in device.level_sigma]

    return SweepResult(
        methods=out_methods,
        full=full,
        none=none,
        clean_accuracy=clean_acc,
        weights=total_weights,
        speedup=speedup,
        tolerance=float(tolerance),
        instances=int(instances),
        seed=int(seed),
        device=device_dict(device),
        seconds=time.perf_counter() - t0,
        settings=dict(
            fractions=fr,
            max_pulses=max_pulses,
            hessian=hessian,
            granularity=granularity,
            level_sigmas=sig_mean,
            expected_pulses_per_verified_device=[
                float(expected_pulses(torch.tensor([float(s)]), float(device.th), max_pulses))
                for s in (sig_mean or [device.sigma])
            ],
        ),
    )
