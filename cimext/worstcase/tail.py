"""cimext.worstcase.tail: P(accuracy <= a) for a random device instance, at levels plain Monte
Carlo cannot reach.

Three estimators (``method``):

- ``"mc"``: plain Monte Carlo (:func:`monte_carlo`), the fraction of instances at or below the
  threshold, with a Wilson 95% interval. Valid for every p; needs about 100 / p instances.
- ``"is"``: importance sampling with a defensive mixture. The device errors ε (one standard normal
  per device, DESIGN section 3) are drawn from q = α·N(0, I) + (1 − α)·N(θ·d, I), d a unit
  direction in ε-space taken from the worst-case δ (F-LWC by default), θ chosen by the
  cross-entropy rule on the nominal part of the sample. The nominal part (α·n instances) is plain
  Monte Carlo; every weight φ/q = 1 / (α + (1 − α)·exp(θ·z − θ²/2)), z = <ε, d>, is at most 1/α,
  so the estimate is never worse than plain Monte Carlo on α·n instances, and the interval widens
  to the nominal part's whenever the weight diagnostics say the tilt cannot be trusted.
- ``"subset"``: subset simulation (multilevel splitting) in ε-space with preconditioned
  Crank–Nicolson moves ε' = ρ·ε + sqrt(1 − ρ²)·ξ, which leave N(0, I) invariant; the score is the
  K-th smallest per-sample margin (K = the misclassifications that put the accuracy at or below
  the threshold), so the failure set is a union of many half-space-like regions that no single
  mean shift covers. Its instances are ε-vectors, not seeds; they are reproduced from ``seed``.

Without write-verify the device noise is additive, so the tilted instance (seed s, shift θ·d) is
the fused op on the deterministically shifted weight W + Σ_d c_d·θ·d_d and nothing is stored.
With write-verified devices the clamp acts after the tilt; the kernels have no ε-space shift yet,
so that case goes through :func:`tilted_noise_reference` (the one seam to replace once the kernels
take a shift).
"""

from __future__ import annotations

import json
import math
import numbers
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .. import distributed
from .. import reference as ref
from .._util import device_dict
from .._util import progress as _bar
from ..device import DeviceModel
from .monte_carlo import _population, _shard, instance_seeds, monte_carlo

Z95 = 1.959963984540054
# Trust rules of the importance-sampling interval, fixed before any figure was measured (the usual
# rules of thumb for self-normalized weights): at least this many hits, an effective number of
# hits of at least MIN_HIT_ESS and no hit carrying more than MAX_SHARE of the estimate.
MIN_HITS = 10
MIN_HIT_ESS = 10.0
MAX_SHARE = 0.2
DEFENSIVE_ALPHA = 0.3  # share of nominal (untilted) instances in the "is" mixture
ELITE = 0.1  # cross-entropy elite fraction when the nominal sample has too few hits
SUBSET_P0 = 0.1  # conditional probability of each subset-simulation level
SUBSET_RHO = 0.8  # initial pCN correlation (adapted per level towards ~40% acceptance)
METHODS = ("is", "mc", "subset")


# ------------------------------------------------------------------------------------------------
# Result
# ------------------------------------------------------------------------------------------------
@dataclass
class TailResult:
    """P(accuracy <= threshold) for a random device instance and how it was estimated.

    ``p`` the estimate, ``ci`` a 95% interval, ``n`` the instances (network evaluations) spent,
    pilot included, ``ess`` the effective sample size of the weights (n for plain Monte Carlo),
    ``tilt`` the proposal ({} for "mc"), ``notes`` warnings (an interval that cannot be trusted
    says so here), ``trusted`` False when the diagnostics failed (the interval was widened),
    ``diagnostics`` the numbers the trust rules looked at.
    """

    threshold: float
    p: float
    ci: tuple[float, float]
    n: int
    ess: float
    seconds: float
    method: str
    tilt: dict
    notes: list[str]
    trusted: bool
    clean_accuracy: float
    seed: int
    device: dict
    samples: int
    diagnostics: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    # Per-instance accuracies of the plain (nominal) part of the sample, for the plot's histogram.
    nominal_accuracies: list[float] = field(default_factory=list)

    @property
    def rel_halfwidth(self) -> float:
        """Half the interval's width over p (inf when p is 0)."""
        return (self.ci[1] - self.ci[0]) / (2 * self.p) if self.p > 0 else math.inf

    @property
    def se(self) -> float:
        """The standard error implied by the interval (half-width / 1.96)."""
        return (self.ci[1] - self.ci[0]) / (2 * Z95)

    def to_json(self) -> str:
        d = asdict(self)
        d["kind"] = "tail_probability"
        d["ci"] = list(self.ci)
        d["rel_halfwidth"] = None if math.isinf(self.rel_halfwidth) else self.rel_halfwidth
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> TailResult:
        """The TailResult that :meth:`to_json` wrote."""
        d = json.loads(text)
        d.pop("kind", None)
        d.pop("rel_halfwidth", None)
        d["ci"] = tuple(d["ci"])
        return cls(**d)


# ------------------------------------------------------------------------------------------------
# ε-space of a model: per layer, the devices' normals and the weight each unit of ε moves
# ------------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    name: str
    module: nn.Module
    layer_id: int
    numel: int
    devices: int  # normals per weight: 1 on the fast path (one Gaussian per weight), else D
    coef: torch.Tensor  # (numel, devices) float64: weight units per unit of ε (before any clamp)
    verified: torch.Tensor | None  # (numel,) bool, None when no device is write-verified
    fast: bool
    lsb: float  # s / (2^M − 1): the weight value of one least significant level


def _layers_of(model: nn.Module, device: DeviceModel) -> list[_Layer]:
    """The ε-space description of every CiM layer programmed with ``device``."""
    from ..nn import cim_layers

    out = []
    for name, m in cim_layers(model):
        w = m._quantized_weight().detach().reshape(-1).float().cpu()
        scale = ref.full_scale(w)
        mask = m.verify_mask
        verified = None
        if mask is not None:
            verified = mask.reshape(-1).to(torch.bool).cpu()
        elif device.verify:
            verified = torch.ones(w.numel(), dtype=torch.bool)
        fast = verified is None and not device.level_sigma
        std, lsb = ref.device_noise_constants(
            scale, device.weight_bits, device.bits_per_device, device.sigma
        )
        if fast:
            coef = torch.full((w.numel(), 1), std, dtype=torch.float64)
        else:
            D, K = device.devices, device.bits_per_device
            levels = device.levels
            q = (w.abs() / scale * levels).round().clamp(0, levels).long() if scale > 0 else None
            cols = []
            for d in range(D):
                if q is None:
                    sd = torch.zeros(w.numel(), dtype=torch.float64)
                else:
                    digit = (q >> (d * K)) & ((1 << K) - 1)
                    table = torch.tensor(
                        [
                            device.sigma * (device.level_sigma[v] if device.level_sigma else 1.0)
                            for v in range(1 << K)
                        ],
                        dtype=torch.float64,
                    )
                    sd = table[digit]
                if verified is not None:
                    sd = torch.where(
                        verified, torch.tensor(device.verified_sigma, dtype=sd.dtype), sd
                    )
                cols.append(lsb * float(1 << (d * K)) * sd)
            coef = torch.stack(cols, 1)
        out.append(
            _Layer(name, m, int(m.layer_id), w.numel(), coef.shape[1], coef, verified, fast, lsb)
        )
    return out


def _signed(stream: int) -> int:
    return stream - 2**64 if stream >= 2**63 else stream


def _normals(stream: int, count: int) -> torch.Tensor:
    """Normals 0 .. count-1 of a Philox stream (float32), as the kernels draw them."""
    op = getattr(torch.ops.cimext, "_philox_normals", None)
    if op is not None:
        try:
            return op(_signed(stream), 0, count)
        except (RuntimeError, TypeError):  # a changed schema: the executable spec is exact
            pass
    return ref.normals(stream, torch.arange(count, dtype=torch.int64))


def instance_eps(layers: Sequence[_Layer], seed: int) -> list[torch.Tensor]:
    """ε of device instance ``seed``: per layer a (numel, devices) float32 tensor."""
    return [
        _normals(ref.stream_seed(seed, L.layer_id), L.numel * L.devices).reshape(L.numel, L.devices)
        for L in layers
    ]


def _direction(layers: Sequence[_Layer], deltas: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """The unit ε-space direction whose least-norm image is the weight-space δ: per weight,
    u_d = c_d·δ / Σ_d c_d² (the smallest ε move that shifts the weight by δ), normalized."""
    us = []
    for L in layers:
        delta = deltas.get(L.name)
        if delta is None:
            us.append(torch.zeros(L.numel, L.devices, dtype=torch.float64))
            continue
        dl = delta.detach().reshape(-1).double().cpu()
        c2 = (L.coef**2).sum(1)
        u = L.coef * torch.where(c2 > 0, dl / c2.clamp_min(1e-300), torch.zeros_like(dl))[:, None]
        us.append(u)
    norm = math.sqrt(sum(float((u**2).sum()) for u in us))
    if not norm > 0 or not math.isfinite(norm):
        raise ValueError("direction: the worst-case δ moves no weight that has device variation")
    return [u / norm for u in us]


def tilted_noise_reference(
    layers: Sequence[_Layer], eps: Sequence[torch.Tensor], device: DeviceModel
) -> dict[str, torch.Tensor]:
    """ΔW of every layer for explicit device errors ``eps`` (already tilted: ε + θ·d), with the
    write-verify clamp applied after the tilt: ΔW = s/(2^M−1)·Σ_d 2^{dK}·n_d, n_d =
    clamp(verified_sigma·ε_d, −th, th) on a verified device, σ_v·ε_d otherwise.

    THE SEAM: this materializes ΔW per instance (fine for LeNet-sized models). The fused kernels
    can replace it once their noise arguments take an ε-space shift: a float tensor of shape
    (numel, D) per layer (θ·d for the device normals j = i·D + d; (numel,) on the one-Gaussian fast
    path), added to each normal right after Box–Muller and before the level σ and the clamp. The
    likelihood ratio stays that of the unclamped Gaussian draws.
    """
    out = {}
    for L, e in zip(layers, eps, strict=True):
        e = e.double()
        lin = L.coef * e  # weight units per device, before any clamp
        if L.verified is not None:
            place = torch.tensor(
                [float(1 << (d * device.bits_per_device)) for d in range(L.devices)],
                dtype=torch.float64,
            )
            clamped = torch.clamp(device.verified_sigma * e, -device.th, device.th)
            lin = torch.where(L.verified[:, None], L.lsb * place * clamped, lin)
        dw = lin.sum(1).float().reshape(L.module.weight.shape)
        out[L.name] = dw.to(L.module.weight.device, L.module.weight.dtype)
    return out


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def _evaluate(model: nn.Module, batches, deltas: Mapping[str, torch.Tensor], need: int):
    """(accuracy, score) of the model with the explicit ΔW ``deltas`` added to its weights.

    score: the ``need``-th smallest per-sample margin (``need`` misclassifications put the accuracy
    at or below the threshold), forced to <= 0 exactly when the accuracy is at or below it and to
    > 0 otherwise, so that {score <= 0} is the failure event and ties of the accuracy are broken
    by how close the next sample is to flipping."""
    from ..nn import clean, perturbation
    from .lwc import margin

    ms, correct, total = [], 0, 0
    with clean(model), perturbation(model, deltas):
        for x, y in batches:
            out = model(x).float()
            correct += int((out.argmax(-1) == y).sum())
            total += int(y.numel())
            ms.append(margin(out, y))
    m = torch.cat(ms)
    k = min(max(need, 1), m.numel())
    s = float(torch.kthvalue(m.cpu(), k).values)
    failed = total - correct >= need
    score = min(s, 0.0) - 1e-12 if failed else max(s, 1e-12)
    return correct / total, score


def _z_values(layers: Sequence[_Layer], dirs: Sequence[torch.Tensor], seeds: Sequence[int]):
    """z = <ε(seed), d> for every seed (float64), sharded over torchrun ranks."""
    rank, world = distributed.rank(), distributed.world_size()
    mine = _shard(len(seeds), rank, world)
    flat = [d.float() for d in dirs]
    z = torch.zeros(len(seeds), dtype=torch.float64)
    for i in mine:
        eps = instance_eps(layers, seeds[i])
        z[i] = sum(float((e * d).sum(dtype=torch.float64)) for e, d in zip(eps, flat, strict=True))
    if world > 1:
        for lo, vals in distributed.all_gather_object((mine.start, z[mine].tolist())):
            z[lo : lo + len(vals)] = torch.tensor(vals, dtype=torch.float64)
    return z


def _tilted_accuracies(
    model, batches, device, layers, dirs, theta, seed, start, count, progress
) -> torch.Tensor:
    """Accuracies of instances start .. start+count-1 of ``seed`` with ε shifted by θ·d."""
    from ..nn import perturbation

    if all(L.verified is None for L in layers):
        # Additive noise: the tilted instance is the fused op on W + Σ_d c_d·θ·d_d, the instance
        # is still its seed (monte_carlo's chunking, tuning and sharding apply unchanged).
        shifts = {
            L.name: (theta * (L.coef * d).sum(1))
            .float()
            .reshape(L.module.weight.shape)
            .to(L.module.weight.device, L.module.weight.dtype)
            for L, d in zip(layers, dirs, strict=True)
        }
        with perturbation(model, shifts):
            res = monte_carlo(
                model,
                batches,
                device,
                count,
                seed=seed,
                start=start,
                progress=progress,
                clean_accuracy=False,
            )
        return torch.tensor(res.accuracies, dtype=torch.float64)
    # Write-verified devices: the clamp acts after the tilt (the seam, materialized ΔW).
    seeds = instance_seeds(seed, count, start)
    rank, world = distributed.rank(), distributed.world_size()
    mine = _shard(count, rank, world)
    acc = torch.zeros(count, dtype=torch.float64)
    bar = _bar(total=len(mine), desc="tilted instances", enabled=progress and rank == 0)
    with _population(model, device):
        for i in mine:
            eps = [
                e.double() + theta * d
                for e, d in zip(instance_eps(layers, seeds[i]), dirs, strict=True)
            ]
            acc[i] = _evaluate(model, batches, tilted_noise_reference(layers, eps, device), 1)[0]
            bar.update(1)
    bar.close()
    if world > 1:
        for lo, vals in distributed.all_gather_object((mine.start, acc[mine].tolist())):
            acc[lo : lo + len(vals)] = torch.tensor(vals, dtype=torch.float64)
    return acc


# ------------------------------------------------------------------------------------------------
# Intervals
# ------------------------------------------------------------------------------------------------
def wilson(hits: int, n: int) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial proportion (hits of n)."""
    if n <= 0:
        return (0.0, 1.0)
    ph = hits / n
    z2 = Z95 * Z95
    c = (ph + z2 / (2 * n)) / (1 + z2 / n)
    h = Z95 * math.sqrt(ph * (1 - ph) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # the exact interval holds hits/n (c ± h only misses it by rounding at 0 or n hits)
    return (max(0.0, min(c - h, ph)), min(1.0, max(c + h, ph)))


# ------------------------------------------------------------------------------------------------
# Argument checks and the direction
# ------------------------------------------------------------------------------------------------
def _check_common(model, device, threshold, n, method, seed, progress) -> None:
    from ..nn import require_cim_layers

    require_cim_layers(model, "tail_probability")
    if not isinstance(device, DeviceModel):
        raise TypeError(f"device must be a cimext.DeviceModel, got {type(device).__name__}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1] (an accuracy), got {threshold}")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {progress!r}")
    if _zero_variation(model, device):
        raise ValueError(
            "device: the device model has zero variation (sigma = 0, or every device verified "
            "with verified_sigma = 0 or th = 0): every instance is the clean model"
        )


def _zero_variation(model, device: DeviceModel) -> bool:
    from ..nn import cim_layers

    sig = device.sigma * max(device.level_sigma) if device.level_sigma else device.sigma
    ver = device.verified_sigma * device.th
    masks = [m.verify_mask for _, m in cim_layers(model)]
    if device.verify and all(mk is None for mk in masks):
        return ver == 0
    any_unverified = any(mk is None or not bool(mk.all()) for mk in masks)
    any_verified = any(mk is not None and bool(mk.any()) for mk in masks)
    return (sig == 0 or not any_unverified) and (ver == 0 or not any_verified)


def _direction_deltas(model, batches, direction, progress) -> tuple[dict, dict]:
    """Weight-space δ of the direction argument and a description of where it came from."""
    from ..nn import cim_layers
    from .flwc import flwc
    from .results import WorstCaseResult

    if direction is None:
        r = flwc(model, batches, 0.03, progress=progress)
        return dict(r.deltas), dict(source="flwc", th_g=0.03, worst_accuracy=r.accuracy)
    if isinstance(direction, WorstCaseResult):
        src = dict(source=direction.method, worst_accuracy=direction.accuracy)
        direction = direction.deltas
    elif isinstance(direction, Mapping):
        src = dict(source="given")
    else:
        raise TypeError(
            "direction must be None, a WorstCaseResult or a dict layer name -> tensor, got "
            f"{type(direction).__name__}"
        )
    layers = dict(cim_layers(model))
    unknown = [k for k in direction if k not in layers]
    if unknown:
        raise ValueError(f"direction names layers the model does not have: {unknown}")
    for k, d in direction.items():
        if not isinstance(d, torch.Tensor):
            raise TypeError(f"direction[{k!r}] must be a tensor, got {type(d).__name__}")
        if tuple(d.shape) != tuple(layers[k].weight.shape):
            raise ValueError(
                f"direction[{k!r}] has shape {tuple(d.shape)}, the layer's weight has "
                f"{tuple(layers[k].weight.shape)}"
            )
        if not bool(torch.isfinite(d).all()):
            raise ValueError(f"direction[{k!r}] has non-finite entries")
    return dict(direction), src


# ------------------------------------------------------------------------------------------------
# The estimators
# ------------------------------------------------------------------------------------------------
def _hit(acc: torch.Tensor, threshold: float) -> torch.Tensor:
    return (acc <= threshold + 1e-12).double()


def _mc(model, batches, device, threshold, n, seed, progress):
    res = monte_carlo(model, batches, device, n, seed=seed, progress=progress, clean_accuracy=False)
    acc = torch.tensor(res.accuracies, dtype=torch.float64)
    hits = int(_hit(acc, threshold).sum())
    return dict(
        p=hits / n,
        ci=wilson(hits, n),
        n=n,
        ess=float(n),
        tilt={},
        notes=[],
        trusted=True,
        diagnostics=dict(hits=hits),
        nominal_accuracies=res.accuracies,
    )


def _is(model, batches, device, threshold, n, seed, progress, direction, alpha):
    """Defensive-mixture importance sampling along one ε-space direction (module docstring)."""
    layers = _layers_of(model, device)
    deltas, src = _direction_deltas(model, batches, direction, progress)
    dirs = _direction(layers, deltas)
    n0 = min(n, max(1, math.ceil(alpha * n)))
    n1 = n - n0
    seeds = instance_seeds(seed, n)
    # Nominal part: plain Monte Carlo instances 0 .. n0-1, also the pilot that picks θ.
    res0 = monte_carlo(
        model, batches, device, n0, seed=seed, progress=progress, clean_accuracy=False
    )
    acc0 = torch.tensor(res0.accuracies, dtype=torch.float64)
    z0 = _z_values(layers, dirs, seeds[:n0])
    h0 = _hit(acc0, threshold)
    # Cross-entropy choice of θ for the mean-shift family: θ* = E[z | failure]. With too few
    # nominal failures, the failure set is replaced by the ELITE fraction of lowest accuracies
    # (a higher level: a smaller, conservative shift).
    if int(h0.sum()) >= max(1, int(ELITE * n0)):
        elite = h0.bool()
        level = threshold
    else:
        level = max(threshold, float(torch.quantile(acc0, ELITE)))
        elite = acc0 <= level + 1e-12
    theta = max(0.0, float(z0[elite].mean())) if n1 > 0 and bool(elite.any()) else 0.0
    notes = []
    if n1 > 0 and theta == 0.0:
        notes.append("the direction does not lower the accuracy on the pilot: θ = 0 (plain MC)")
    if n1 > 0:
        acc1 = _tilted_accuracies(
            model, batches, device, layers, dirs, theta, seed, n0, n1, progress
        )
        z1 = _z_values(layers, dirs, seeds[n0:]) + theta  # z of the tilted draw
    else:
        acc1 = torch.zeros(0, dtype=torch.float64)
        z1 = torch.zeros(0, dtype=torch.float64)
    a = n0 / n  # the exact mixture share (deterministic allocation keeps the estimate unbiased)
    z = torch.cat([z0, z1])
    acc = torch.cat([acc0, acc1])
    h = _hit(acc, threshold)
    # w = φ / (a·φ + (1 − a)·φ_θ) = 1 / (a + (1 − a)·exp(θz − θ²/2)), computed in log space.
    if a < 1:
        logq = torch.logaddexp(
            torch.full_like(z, math.log(a)), math.log1p(-a) + theta * z - theta**2 / 2
        )
    else:
        logq = torch.zeros_like(z)
    w = torch.exp(-logq)
    t = w * h
    p = float(t.mean())
    # Stratified variance (the two parts have fixed sizes).
    var = 0.0
    for part, m in ((t[:n0], n0), (t[n0:], n1)):
        if m > 1:
            var += (m / n) ** 2 * float(part.var(unbiased=True)) / m
    se = math.sqrt(var)
    ci = (max(0.0, p - Z95 * se), min(1.0, p + Z95 * se))
    hits = int(h.sum())
    sw, sw2 = float(w.sum()), float((w**2).sum())
    ess = sw * sw / sw2
    st, st2 = float(t.sum()), float((t**2).sum())
    hit_ess = st * st / st2 if st2 > 0 else 0.0
    share = float(t.max()) / st if st > 0 else 1.0
    hits0 = int(h0.sum())
    nom_ci = wilson(hits0, n0)
    agree = not (ci[1] < nom_ci[0] or ci[0] > nom_ci[1])
    trusted = hits >= MIN_HITS and hit_ess >= MIN_HIT_ESS and share <= MAX_SHARE and agree
    if not trusted:
        why = []
        if hits < MIN_HITS:
            why.append(f"{hits} hits < {MIN_HITS}")
        if hit_ess < MIN_HIT_ESS:
            why.append(f"effective hits {hit_ess:.1f} < {MIN_HIT_ESS:g}")
        if share > MAX_SHARE:
            why.append(f"one instance carries {share:.0%} of the estimate")
        if not agree:
            why.append(
                f"the nominal part ({hits0}/{n0} hits, {nom_ci[0]:.2e}..{nom_ci[1]:.2e}) "
                "disagrees with the weighted estimate"
            )
        notes.append(
            "the importance-sampling interval cannot be trusted (" + "; ".join(why) + "): "
            "widened to include the plain Monte Carlo interval of the nominal part"
        )
        ci = (min(ci[0], nom_ci[0]), max(ci[1], nom_ci[1]))
    diagnostics = dict(
        hits=hits,
        hits_nominal=hits0,
        hits_tilted=hits - hits0,
        hit_ess=hit_ess,
        max_weight_share=share,
        weight_max=float(w.max()),
        weight_bound=1 / a,
        nominal_ci=list(nom_ci),
        is_se=se,
        pilot_level=level,
    )
    tilt = dict(
        theta=theta,
        alpha=a,
        n_nominal=n0,
        n_tilted=n1,
        rule="cross-entropy (theta = E[z | failure] on the nominal part)",
        direction=src,
    )
    return dict(
        p=p,
        ci=ci,
        n=n,
        ess=ess,
        tilt=tilt,
        notes=notes,
        trusted=trusted,
        diagnostics=diagnostics,
        nominal_accuracies=res0.accuracies,
    )


def _subset(model, batches, device, threshold, n, seed, progress, p0, rho):
    """Subset simulation with pCN moves in ε-space; ``n`` samples per level."""
    layers = _layers_of(model, device)
    samples = sum(int(y.numel()) for _, y in batches)
    need = samples - math.floor(threshold * samples + 1e-9)  # misclassifications for failure
    sizes = [L.numel * L.devices for L in layers]

    def unflat(v: torch.Tensor) -> list[torch.Tensor]:
        out, o = [], 0
        for L, s in zip(layers, sizes, strict=True):
            out.append(v[o : o + s].reshape(L.numel, L.devices))
            o += s
        return out

    def draw(s: int) -> torch.Tensor:
        return torch.cat([e.reshape(-1) for e in instance_eps(layers, s)])

    evals = 0
    bar = _bar(desc="subset simulation", enabled=progress)

    def score(v: torch.Tensor) -> tuple[float, float]:
        nonlocal evals
        evals += 1
        bar.update(1)
        return _evaluate(model, batches, tilted_noise_reference(layers, unflat(v), device), need)

    nc = max(1, round(p0 * n))
    base = int(seed) & 0xFFFFFFFFFFFFFFFF
    # ξ of move number i: a Philox stream of its own, keyed apart from the level-0 instances.
    move_key = ref.splitmix64(base ^ 0x5DB5E7A5A3F0C9D1)
    with _population(model, device):
        X = torch.stack([draw(s) for s in instance_seeds(seed, n)])
        res = [score(x) for x in X]
        accs0 = [a for a, _ in res]
        S = torch.tensor([s for _, s in res], dtype=torch.float64)
        logp, delta2, levels, moves = 0.0, 0.0, [], 0
        s_move = math.sqrt(1 - rho * rho)
        prev: list[list[float]] | None = None  # the chains that drew the current samples
        for _level in range(64):
            order = torch.argsort(S)
            b = float(S[order[nc - 1]])
            if b <= 0 or len(levels) >= 40:
                break
            # Rejected moves repeat states, so several samples can share the level's score:
            # every sample at or below it counts (and seeds a chain).
            below = int((S <= b).sum())
            pj = below / n
            logp += math.log(pj)
            # Au & Beck: the level's binomial variance, inflated by the correlation of the
            # indicators {score <= b} along the chains that drew these samples.
            delta2 += (1 - pj) / (n * pj) * (1 + (_chain_gamma(prev, b) if prev else 0.0))
            chains = order[:below]
            steps = [n // below + (1 if c < n % below else 0) for c in range(below)]
            newX, newS, ind = [], [], []
            accepted = tried = 0
            group_acc = group_try = 0
            group = max(1, below // 10)
            for c, start in enumerate(chains.tolist()):
                x, sx = X[start], float(S[start])
                row_x, row_s = [x], [sx]
                r = math.sqrt(max(0.0, 1 - s_move * s_move))
                for _ in range(steps[c] - 1):
                    xi = draw(ref.splitmix64(move_key ^ ref.splitmix64(moves)))
                    moves += 1
                    cand = r * x + s_move * xi
                    _, sc = score(cand)
                    tried += 1
                    group_try += 1
                    if sc <= b:
                        x, sx = cand, sc
                        accepted += 1
                        group_acc += 1
                    row_x.append(x)
                    row_s.append(sx)
                newX += row_x
                newS += row_s
                ind.append(row_s)
                if (c + 1) % group == 0 and group_try:
                    # Adaptive conditional sampling (Papaioannou et al. 2015): between chains,
                    # move the step towards 44% acceptance; each chain keeps one step, so
                    # every chain is still a N(0, I)-reversible chain restricted to the level.
                    s_move *= math.exp((group_acc / group_try - 0.44) / math.sqrt(c // group + 1))
                    s_move = min(0.99, max(0.02, s_move))
                    group_acc = group_try = 0
            X = torch.stack(newX)
            S = torch.tensor(newS, dtype=torch.float64)
            levels.append(dict(level=b, p=pj, acceptance=accepted / max(1, tried), step=s_move))
            prev = ind
        fails = int((S <= 0).sum())
        pm = fails / n
        gamma = _chain_gamma(prev, 0.0) if prev else 0.0
    bar.close()
    p = math.exp(logp) * pm
    notes = []
    if pm > 0:
        delta2 += (1 - pm) / (n * pm) * (1 + gamma)
        sig = math.sqrt(math.log1p(delta2))
        ci = (p * math.exp(-Z95 * sig), min(1.0, p * math.exp(Z95 * sig)))
    else:
        ci = (0.0, min(1.0, math.exp(logp)))
        notes.append("subset simulation stopped without a failure at the last level")
    cov = math.sqrt(delta2)
    trusted = pm > 0 and cov <= 0.5
    if not trusted:
        notes.append(
            f"subset simulation: coefficient of variation {cov:.2f}: the interval is rough"
        )
    notes.append(
        "subset-simulation intervals follow Au & Beck (2001): per-level binomial variance "
        "inflated by the chains' correlation, levels taken as independent (approximate)"
    )
    return dict(
        p=p,
        ci=ci,
        n=evals,
        ess=float(n) / (1 + gamma) if levels else float(n),
        tilt=dict(p0=p0, rho0=rho, per_level=n, levels=levels),
        notes=notes,
        trusted=trusted,
        diagnostics=dict(cov=cov, final_fraction=pm, gamma_last=gamma),
        nominal_accuracies=accs0,
    )


def _chain_gamma(chains: list[list[float]], b: float) -> float:
    """Au & Beck's γ: the correlation factor of the failure indicators {score <= b} along the
    chains (γ = 2·Σ_k (1 − k/L)·ρ_k)."""
    L = min(len(c) for c in chains)
    if L < 2:
        return 0.0
    ind = torch.tensor([[1.0 if s <= b else 0.0 for s in c[:L]] for c in chains])
    p = float(ind.mean())
    r0 = p * (1 - p)
    if r0 <= 0:
        return 0.0
    g = 0.0
    for k in range(1, L):
        rk = float((ind[:, : L - k] * ind[:, k:]).mean()) - p * p
        g += 2 * (1 - k / L) * rk / r0
    return max(0.0, g)


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def tail_probability(
    model: nn.Module,
    data: Iterable,
    device: DeviceModel,
    threshold: float,
    *,
    n: int = 1000,
    method: str = "is",
    direction=None,
    seed: int = 0,
    progress: bool = True,
    alpha: float = DEFENSIVE_ALPHA,
    p0: float = SUBSET_P0,
    rho: float = SUBSET_RHO,
) -> TailResult:
    """P(accuracy <= ``threshold``) for a random device instance of ``device`` (every CiM layer of
    the converted ``model`` programmed with it), over ``data`` (an iterable of batches).

    ``method``: "is" (default; importance sampling with a defensive mixture along ``direction``,
    n instances of which ceil(alpha·n) are plain Monte Carlo), "mc" (plain Monte Carlo, n
    instances) or "subset" (subset simulation, n samples per level, conditional probability
    ``p0`` per level, pCN correlation ``rho`` to start with; the result's n counts every
    evaluation). ``direction`` (method "is"): None (the F-LWC worst-case δ at th_g = 0.03), a
    WorstCaseResult, or a dict layer name -> weight-space δ; it is mapped to ε-space as the
    least-norm device-error move that produces it. Instance i of "is" / "mc" is the device seed
    ``instance_seeds(seed, n)[i]`` (the tilted part adds the shift θ·d to its ε); "subset" is
    reproduced from ``seed``. "is" and "mc" shard their instances under torchrun like
    :func:`monte_carlo` (every rank calls with the same arguments and gets the same result);
    "subset" is sequential (every rank computes the whole run).

    A threshold at or above the clean accuracy is not a rare event: it returns plain Monte Carlo's
    estimate (p = 1 exactly for threshold 1) with a note. ``result.trusted`` is False and
    ``result.notes`` says why when the weight diagnostics fail; the interval is then widened.
    Returns a TailResult.
    """
    _check_common(model, device, threshold, n, method, seed, progress)
    if method == "is" and not (isinstance(alpha, numbers.Real) and 0 < float(alpha) <= 1):
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    if method == "subset":
        if not (isinstance(p0, numbers.Real) and 0 < float(p0) < 0.5):
            raise ValueError(f"p0 must be in (0, 0.5), got {p0!r}")
        if not (isinstance(rho, numbers.Real) and 0 <= float(rho) < 1):
            raise ValueError(f"rho must be in [0, 1), got {rho!r}")
        if round(p0 * n) < 1 or n < 10:
            raise ValueError(f"n must be >= 10 and n·p0 >= 1 for method 'subset', got n={n}")
    threshold = float(threshold)
    p = next(model.parameters())
    batches = [(x.to(p.device), y.to(p.device)) for x, y in data]
    samples = sum(int(y.numel()) for _, y in batches)
    if samples == 0:
        raise ValueError("data: the data yielded no samples")
    from ..nn import clean

    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), clean(model):
            correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in batches)
        clean_acc = correct / samples
        if threshold >= 1.0:
            out = dict(
                p=1.0,
                ci=(1.0, 1.0),
                n=0,
                ess=0.0,
                tilt={},
                trusted=True,
                diagnostics={},
                notes=["threshold 1: every accuracy is <= 1, p = 1 exactly"],
                nominal_accuracies=[],
            )
            used = "exact"
        elif threshold >= clean_acc and method != "mc":
            out = _mc(model, batches, device, threshold, n, seed, progress)
            out["notes"].append(
                f"threshold {threshold:g} >= clean accuracy {clean_acc:g}: not a rare event, "
                "estimated by plain Monte Carlo"
            )
            used = "mc"
        elif method == "mc":
            out = _mc(model, batches, device, threshold, n, seed, progress)
            if threshold >= clean_acc:
                out["notes"].append(
                    f"threshold {threshold:g} >= clean accuracy {clean_acc:g}: not a rare event"
                )
            used = "mc"
        elif method == "is":
            out = _is(model, batches, device, threshold, n, seed, progress, direction, float(alpha))
            used = "is"
        else:
            out = _subset(model, batches, device, threshold, n, seed, progress, p0, rho)
            used = "subset"
    finally:
        model.train(was_training)
    return TailResult(
        threshold=threshold,
        method=used,
        seconds=time.perf_counter() - t0,
        clean_accuracy=clean_acc,
        seed=int(seed),
        device=device_dict(device),
        samples=samples,
        settings=dict(requested_method=method, n_argument=int(n), ranks=distributed.world_size()),
        **out,
    )


def tail_report(
    model: nn.Module,
    data: Iterable,
    device: DeviceModel,
    thresholds: float | Sequence[float],
    *,
    n: int = 1000,
    method: str = "is",
    direction=None,
    seed: int = 0,
    progress: bool = True,
    **kwargs,
) -> list[TailResult]:
    """:func:`tail_probability` at every threshold (a number or a sequence, e.g. (0.9, 0.8)),
    one TailResult each; for "is" the worst-case direction is searched once (F-LWC when
    ``direction`` is None) and shared. What ``cimext montecarlo --tail 0.9,0.8`` prints."""
    from .flwc import flwc

    if isinstance(thresholds, numbers.Real) and not isinstance(thresholds, bool):
        thresholds = [thresholds]
    thresholds = list(thresholds)
    if not thresholds:
        raise ValueError("thresholds must name at least one accuracy")
    batches = list(data)
    for t in thresholds:  # every bad threshold is reported before any work is done
        _check_common(model, device, t, n, method, seed, progress)
    if method == "is" and direction is None:
        direction = flwc(model, batches, 0.03, progress=progress)
    return [
        tail_probability(
            model,
            batches,
            device,
            t,
            n=n,
            method=method,
            direction=direction,
            seed=seed,
            progress=progress,
            **kwargs,
        )
        for t in thresholds
    ]


def plot_tail(
    results: Sequence[TailResult],
    path=None,
    *,
    accuracies: Sequence[float] | None = None,
    worst: float | None = None,
    title: str | None = None,
):
    """The tail curve P(accuracy <= a) against a on a log scale: the estimates with their 95%
    intervals, the empirical tail of plain Monte Carlo ``accuracies`` (default: the nominal
    accuracies of the results) with their histogram on a second axis, and the worst-case
    accuracy ``worst`` as a vertical line (an extension of the paper's Fig. 1). Saves to
    ``path`` (PNG) when given; returns the matplotlib Figure."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    results = sorted(results, key=lambda r: r.threshold)
    if accuracies is None:
        accuracies = max((r.nominal_accuracies for r in results), key=len, default=[])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(accuracies):
        acc = torch.tensor(list(accuracies), dtype=torch.float64).sort().values
        emp = torch.arange(1, len(acc) + 1, dtype=torch.float64) / len(acc)
        ax.step(acc.tolist(), emp.tolist(), where="post", color="0.4", label="plain MC tail")
        ax2 = ax.twinx()
        ax2.hist(acc.tolist(), bins=40, color="tab:blue", alpha=0.2)
        ax2.set_ylabel(f"instances (plain MC, n={len(acc)})")
    shown = [r for r in results if r.p > 0]
    if shown:
        xs = [r.threshold for r in shown]
        ps = [r.p for r in shown]
        lo = [max(r.p - r.ci[0], 0.0) for r in shown]
        hi = [r.ci[1] - r.p for r in shown]
        ax.errorbar(
            xs,
            ps,
            yerr=[lo, hi],
            fmt="o-",
            color="tab:red",
            capsize=3,
            label=f"P(acc <= a), {shown[0].method}, 95% CI",
        )
    for r in results:
        if r.p == 0:
            ax.plot([r.threshold], [r.ci[1]], "v", color="tab:red")
    if worst is not None:
        ax.axvline(worst, color="k", ls="--", label=f"worst case {worst:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("accuracy a")
    ax.set_ylabel("P(accuracy <= a)")
    ax.set_title(title or "Tail of the accuracy over device instances")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig
