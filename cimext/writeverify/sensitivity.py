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
from .program import device_sigmas

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
) -> dict[str, torch.Tensor]:
    """Per-weight write-verify priority of every CiM layer (layer name -> tensor of the weight's
    shape, float64; larger = verify first) by ``method`` (see the module docstring).

    granularity="device" scores every device instead (shape (*weight.shape, D), d = 0 least
    significant; for program()'s per-device masks): uswim / swim give each device its own share
    of the variance, magnitude scores |w|·2^{dK} (the device's weight in the sum).

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
        out[name] = 0.5 * (hd[..., None] if per_device else hd) * (var_u - var_v)
    return out


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
