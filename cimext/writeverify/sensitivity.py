"""sensitivity(): which weights to write-verify first (U-SWIM, SWIM and two baselines).

A weight left unverified is programmed with error Δ instead of the verified error Δ_v. To second
order the expected loss increase is g·E[Δ − Δ_v] + ½·H·(E[Δ²] − E[Δ_v²]) with g the gradient and
H the Hessian diagonal. The device errors are zero-mean, so the gradient term vanishes in
expectation (it is computed all the same: it would not for a biased device), leaving

- "uswim": ½·H_ii·(Var_i − Var_v,i), with *this weight's own* variances: its D devices sit at
  levels given by its value, each with σ·level_sigma[level] (non-uniform variation), and the
  verified variance of a Gaussian truncated to ±th per device;
- "swim":  ½·H_ii·(Var − Var_v) with one variance per layer, as if every device had σ (the
  uniform-variation metric of SWIM: the Hessian and the layer scale, not the levels);
- "magnitude": |w| (large weights first);
- "random": uniform random scores (seeded).

Scores are comparable across layers (loss units for the first two), so a global top-k picks the
weights to verify.

``per_pulse=True`` divides the "uswim" / "swim" score of a weight (or device) by the pulses that
verifying it adds on average (expected pulses of a verified device minus the one pulse of an
unverified one, summed over the weight's devices; each method with its own σ assumption). The
budget is pulses, so the greedy answer to "most loss saved for a pulse budget" (a knapsack) ranks
by loss saved per pulse: a device at a noisy level saves more loss but also needs more pulses
than one at a quiet level (about 18.7 against 6.3 at level_sigma (0.5, 1.5, 1.5, 0.5) and
th = σ/10). It changes nothing where every device costs the same (uniform σ).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .._util import check_seed
from ..device import DeviceModel
from ..nn import require_cim_layers
from .hessian import effective_weight, hessian_diag
from .program import check_max_pulses, device_sigmas, expected_pulses

METHODS = ("uswim", "swim", "magnitude", "random")
GRANULARITIES = ("weight", "device")


def truncated_variance(sigma: torch.Tensor, th: float) -> torch.Tensor:
    """Var of N(0, σ²) conditioned on |x| <= th: σ²(1 − 2aφ(a) / (2Φ(a) − 1)), a = th / σ."""
    a = th / sigma.clamp_min(1e-300)
    phi = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    mass = torch.erf(a / math.sqrt(2.0))
    ratio = torch.where(mass > 1e-12, 2 * a * phi / mass.clamp_min(1e-300), torch.ones_like(a))
    v = sigma.square() * (1 - ratio)
    # Small a: the truncated Gaussian tends to uniform on [−th, th].
    v = torch.where(a < 1e-4, torch.full_like(v, th * th / 3), v)
    return torch.where(sigma > 0, v, torch.zeros_like(v))


def weight_variances(
    weight: torch.Tensor, device: DeviceModel, *, uniform: bool = False, per_device: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(unverified, verified) variance of every weight's programming error, in weight units²,
    shape of ``weight`` (or (*weight.shape, D): each device's share, with ``per_device``).
    ``uniform``: every device at σ (level_sigma ignored)."""
    sig, scale = device_sigmas(weight, device)
    if uniform:
        sig = torch.full_like(sig, float(device.sigma))
    place2 = torch.tensor(
        [4.0 ** (d * device.bits_per_device) for d in range(device.devices)], dtype=torch.float64
    )
    var_u = sig.square() * place2 * scale**2
    var_v = truncated_variance(sig, float(device.th)) * place2 * scale**2
    if per_device:
        shape = (*weight.shape, device.devices)
        return var_u.reshape(shape), var_v.reshape(shape)
    return var_u.sum(1).reshape(weight.shape), var_v.sum(1).reshape(weight.shape)


def sensitivity(
    model: nn.Module,
    data: Iterable,
    device: DeviceModel,
    method: str = "uswim",
    *,
    hessian: str | dict[str, torch.Tensor] = "obd",
    seed: int = 0,
    granularity: str = "weight",
    per_pulse: bool = False,
    max_pulses: int = 100,
) -> dict[str, torch.Tensor]:
    """Per-weight write-verify priority of every CiM layer (layer name -> tensor of the weight's
    shape, float64; larger = verify first) by ``method`` (see the module docstring).

    granularity="device" scores every device instead (shape (*weight.shape, D), d = 0 least
    significant; for program()'s per-device masks): uswim / swim give each device its own share
    of the variance, magnitude scores |w|·2^{dK} (the device's weight in the sum).

    ``per_pulse`` (uswim / swim only) scores loss saved per extra pulse of verifying (see the
    module docstring); ``max_pulses`` is then program()'s cap on the pulses of one device.

    ``hessian`` is the hessian_diag method ("obd" or "hutchinson") or a precomputed diagonal
    (reused by a sweep that scores several methods). ``seed`` seeds "random".
    """
    layers = require_cim_layers(model, "sensitivity")
    if not isinstance(device, DeviceModel):
        raise TypeError(f"device must be a cimext.DeviceModel, got {type(device).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not isinstance(per_pulse, bool):
        raise TypeError(f"per_pulse must be a bool, got {per_pulse!r}")
    max_pulses = check_max_pulses(max_pulses)
    if per_pulse and method not in ("uswim", "swim"):
        raise ValueError(f"per_pulse applies to 'uswim' and 'swim' only, not {method!r}")
    per_device = granularity == "device"
    place = torch.tensor(
        [2.0 ** (d * device.bits_per_device) for d in range(device.devices)], dtype=torch.float64
    )
    if method == "magnitude":
        mags = {n: effective_weight(m).abs().double().cpu() for n, m in layers}
        return {n: v[..., None] * place for n, v in mags.items()} if per_device else mags
    if method == "random":
        gen = torch.Generator().manual_seed(check_seed(seed) & 0x7FFFFFFFFFFFFFFF)
        extra = (device.devices,) if per_device else ()
        return {
            n: torch.rand((*m.weight.shape, *extra), generator=gen, dtype=torch.float64)
            for n, m in layers
        }
    if isinstance(hessian, str):
        h = hessian_diag(model, data, hessian)
    elif isinstance(hessian, dict):
        h = hessian
    else:
        raise TypeError(f"hessian must be 'obd', 'hutchinson' or a dict, got {hessian!r}")
    out = {}
    for name, m in layers:
        if name not in h:
            raise KeyError(f"sensitivity: the Hessian diagonal has no entry for layer {name!r}")
        w = effective_weight(m)
        var_u, var_v = weight_variances(w, device, uniform=method == "swim", per_device=per_device)
        hd = h[name].detach().double().cpu()
        score = 0.5 * (hd[..., None] if per_device else hd) * (var_u - var_v)
        if per_pulse:
            extra = extra_pulses(w, device, max_pulses, uniform=method == "swim")
            score = score / (extra if per_device else extra.sum(-1)).clamp_min(1e-12)
        out[name] = score
    return out


def extra_pulses(
    weight: torch.Tensor, device: DeviceModel, max_pulses: int = 100, *, uniform: bool = False
) -> torch.Tensor:
    """Mean pulses that verifying each device of ``weight`` adds to its one unverified pulse,
    shape (*weight.shape, D); ``uniform``: every device at σ (level_sigma ignored)."""
    sig, _ = device_sigmas(weight, device)
    if uniform:
        sig = torch.full_like(sig, float(device.sigma))
    extra = expected_pulses(sig, float(device.th), max_pulses) - 1
    return extra.reshape(*weight.shape, device.devices)


def verify_masks(
    scores: dict[str, torch.Tensor], fraction: float
) -> tuple[dict[str, torch.Tensor], int]:
    """Masks that verify the top ``fraction`` of all weights by score (ties broken by position);
    returns (layer name -> bool mask, number verified)."""
    if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).double() for n in names])
    k = int(round(fraction * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        chosen[torch.argsort(flat, descending=True, stable=True)[:k]] = True
    masks, i = {}, 0
    for n in names:
        c = scores[n].numel()
        masks[n] = chosen[i : i + c].reshape(scores[n].shape)
        i += c
    return masks, k


def expected_hessian_diag(
    model: nn.Module,
    data: Iterable,
    device: DeviceModel,
    instances: int = 4,
    *,
    seed: int = 0,
    method: str = "obd",
    max_pulses: int = 100,
) -> dict[str, torch.Tensor]:
    """Hessian diagonal averaged over ``instances`` unverified programmed instances of ``model``
    on ``device`` (device seeds from ``seed``; see :func:`hessian_diag` for ``method``).

    The "uswim" score ½·H_ii·ΔVar is a second-order expansion around the clean weights; when σ is
    large every weight is far from them (the ReLU patterns and the softmax confidences change),
    and the curvature that matters is the one met by a weight while the others carry their
    unverified errors. Passed as ``hessian=`` to :func:`sensitivity`.
    """
    from ..nn import perturbation
    from .program import program

    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise ValueError(f"instances must be an int >= 1, got {instances!r}")
    if not isinstance(device, DeviceModel):
        raise TypeError(f"device must be a cimext.DeviceModel, got {type(device).__name__}")
    from ..worstcase.monte_carlo import instance_seeds

    layers = require_cim_layers(model, "expected_hessian_diag")
    targets = {n: effective_weight(m) for n, m in layers}
    total: dict[str, torch.Tensor] = {}
    for s in instance_seeds(check_seed(seed), instances):
        prog = program(model, device, None, s, max_pulses=max_pulses)
        with perturbation(model, prog.deltas(targets)):
            h = hessian_diag(model, data, method)
        for k, v in h.items():
            total[k] = total[k] + v if k in total else v.clone()
    return {k: v / instances for k, v in total.items()}
