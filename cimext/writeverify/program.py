"""program(): a write-verify simulator for the devices that hold a converted model's weights.

Every weight of a CiM layer is held by D = M / K devices (DESIGN section 3). Device d of a weight
with quantized magnitude q = round(|w| / s · (2^M − 1)) sits at level v = (q >> dK) & (2^K − 1)
and every programming pulse lands it at its target plus N(0, σ_v²) levels, σ_v = σ·level_sigma[v].
An unverified device gets one pulse. A verified device is read after each pulse and pulsed again
until |error| <= th (levels) or ``max_pulses`` pulses; it keeps the error of its last pulse. The
programmed weight is W + s / (2^M − 1) · Σ_d 2^{dK} · error_d, as in the device noise model.

The pulses are not drawn one by one: the number of pulses a verified device needs after a first
miss is geometric with success probability p_v = P(|σ_v ε| <= th), and its final error is a
Gaussian truncated to [−th, th] (or to its tails when the cap is hit), which is the same
distribution as the pulse loop. Each device gets three fixed draws per (seed, layer): its first
pulse, its pulse count and its final error, so the same seed programs every device the same way
under any verify mask (a selective run differs from full write-verify only where the masks
differ: common random numbers for the sweeps).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .._util import check_seed
from ..device import DeviceModel
from ..nn import require_cim_layers
from ..reference import splitmix64
from .hessian import effective_weight

_SQRT2 = math.sqrt(2.0)


@dataclass
class ProgramResult:
    """The programmed weights (layer name -> tensor of the weight's shape) and the pulses every
    device took (layer name -> int32 tensor of shape (*weight.shape, D), device d = 0 least
    significant)."""

    weights: dict[str, torch.Tensor]
    pulses: dict[str, torch.Tensor]
    seed: int
    settings: dict = field(default_factory=dict)

    @property
    def total_pulses(self) -> int:
        """Pulses over all weights of all layers."""
        return int(sum(int(p.sum()) for p in self.pulses.values()))

    def deltas(self, targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Programmed minus target weights (for cimext.perturbation)."""
        return {k: self.weights[k] - targets[k] for k in self.weights}


@dataclass
class LayerDraws:
    """What a device instance does to one layer, for both outcomes of verification."""

    target: torch.Tensor  # (numel,) the effective weight, flat
    scale: float  # s / (2^M − 1): one unit of the quantized magnitude
    place: torch.Tensor  # (D,) 2^{dK}
    sigma: torch.Tensor  # (numel, D) per-device σ_v in levels
    first: torch.Tensor  # (numel, D) error of the first pulse (the unverified outcome)
    verified: torch.Tensor  # (numel, D) final error when verified
    pulses: torch.Tensor  # (numel, D) pulses when verified (int32)

    def program(
        self, mask: torch.Tensor | None, per_device: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(programmed weight, pulses per weight, or per device (numel, D) with ``per_device``)
        for a verify mask per weight (numel,) or per device (numel, D)."""
        if mask is None:
            err, pulses = self.first, torch.ones_like(self.pulses)
        else:
            m = mask.reshape(self.first.shape[0], -1)  # per weight (n, 1) or per device (n, D)
            err = torch.where(m, self.verified, self.first)
            pulses = torch.where(m, self.pulses, torch.ones_like(self.pulses))
        w = self.target + self.scale * (err * self.place).sum(1)
        return w, pulses if per_device else pulses.sum(1)


def device_sigmas(weight: torch.Tensor, device: DeviceModel) -> tuple[torch.Tensor, float]:
    """(per-device σ_v in levels, shape (numel, D); s / (2^M − 1)) for a layer's weight."""
    levels = device.levels
    s = float(weight.detach().abs().max()) if weight.numel() else 0.0
    flat = weight.detach().reshape(-1).double()
    q = torch.round(flat.abs() / s * levels).clamp(0, levels).long() if s > 0 else flat.long() * 0
    k = device.bits_per_device
    digits = torch.stack([(q >> (d * k)) & (2**k - 1) for d in range(device.devices)], dim=1)
    if device.level_sigma is None:
        sig = torch.full(digits.shape, float(device.sigma), dtype=torch.float64)
    else:
        table = torch.tensor(device.level_sigma, dtype=torch.float64) * device.sigma
        sig = table[digits]
    return sig, s / levels


def success_probability(sigma: torch.Tensor, th: float) -> torch.Tensor:
    """P(|σ ε| <= th) for one pulse (1 where σ = 0)."""
    a = th / sigma.clamp_min(1e-300)
    return torch.where(sigma > 0, torch.erf(a / _SQRT2), torch.ones_like(sigma))


def expected_pulses(sigma: torch.Tensor, th: float, max_pulses: int) -> torch.Tensor:
    """Closed form of the mean pulses of a verified device: (1 − (1 − p)^cap) / p."""
    p = success_probability(sigma, th)
    return (1 - (1 - p) ** max_pulses) / p


def _ndtri(u: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtri(u)


def draw_layer(
    weight: torch.Tensor,
    device: DeviceModel,
    seed: int,
    layer_id: int,
    max_pulses: int,
) -> LayerDraws:
    """The draws of device instance ``seed`` for one layer (see the module docstring)."""
    sig, scale = device_sigmas(weight, device)
    n, dd = sig.shape
    stream = splitmix64((int(seed) & 0xFFFFFFFFFFFFFFFF) ^ splitmix64(int(layer_id)))
    gen = torch.Generator().manual_seed(stream & 0x7FFFFFFFFFFFFFFF)
    eps = torch.randn((n, dd), generator=gen, dtype=torch.float64)
    u_count = torch.rand((n, dd), generator=gen, dtype=torch.float64)
    u_err = torch.rand((n, dd), generator=gen, dtype=torch.float64)
    th = float(device.th)
    first = sig * eps
    hit = first.abs() <= th
    p = success_probability(sig, th)
    # Pulses after a first miss: geometric on {1, 2, ...}, capped at max_pulses − 1.
    tiny = torch.finfo(torch.float64).tiny
    log_q = torch.log1p(-p.clamp(max=1 - 1e-16))
    more = torch.floor(torch.log(u_count.clamp_min(tiny)) / log_q) + 1
    capped = more >= max_pulses  # the cap was reached without a hit on the last pulse
    capped &= ~hit
    more = more.clamp(max=max_pulses - 1)
    pulses = torch.where(hit, torch.ones_like(more), 1 + more)
    if max_pulses == 1:
        pulses = torch.ones_like(more)
        capped = ~hit
    # Final error: N(0, σ²) truncated to [−th, th]; the tails |e| > th when the cap was hit.
    a = th / sig.clamp_min(1e-300)
    lo = torch.special.ndtr(-a)
    inside = sig * _ndtri((lo + u_err * (1 - 2 * lo)).clamp(tiny, 1 - 1e-16))
    tail_u = (1 - lo) + u_err.clamp(max=1 - 1e-12) * lo  # upper tail; sign from the first pulse
    outside = sig * _ndtri(tail_u.clamp(tiny, 1 - 1e-16)) * torch.sign(first)
    verified = torch.where(hit, first, torch.where(capped, outside, inside))
    verified = torch.where(sig > 0, verified, torch.zeros_like(verified))
    place = torch.tensor(
        [2.0 ** (d * device.bits_per_device) for d in range(dd)], dtype=torch.float64
    )
    target = weight.detach().reshape(-1).double()
    return LayerDraws(
        target=target,
        scale=scale,
        place=place,
        sigma=sig,
        first=first,
        verified=verified,
        pulses=pulses.to(torch.int32),
    )


def check_masks(
    model: nn.Module, verify_masks: Mapping[str, torch.Tensor] | None, devices: int = 1
) -> dict[str, torch.Tensor | None]:
    """Validate per-layer verify masks (layer name -> bool tensor of the weight's shape, or of
    shape (*weight.shape, devices) for one flag per device); returns them flat, on the CPU."""
    layers = dict(require_cim_layers(model, "program"))
    if verify_masks is None:
        return dict.fromkeys(layers)
    if not isinstance(verify_masks, Mapping):
        raise TypeError(
            f"verify_masks must map layer names to bool tensors, got {type(verify_masks).__name__}"
        )
    unknown = [k for k in verify_masks if k not in layers]
    if unknown:
        raise KeyError(
            f"program: no CiM layer named {', '.join(map(repr, unknown))}; valid names: "
            f"{', '.join(map(repr, layers))}"
        )
    out: dict[str, torch.Tensor | None] = dict.fromkeys(layers)
    for name, m in verify_masks.items():
        if m is None:
            continue
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"verify_masks[{name!r}] must be a tensor, got {type(m).__name__}")
        if m.dtype != torch.bool:
            raise TypeError(f"verify_masks[{name!r}] must be a bool tensor, got {m.dtype}")
        shape = tuple(layers[name].weight.shape)
        if tuple(m.shape) not in (shape, (*shape, devices)):
            raise ValueError(
                f"verify_masks[{name!r}] has shape {tuple(m.shape)}, weight has {shape} "
                f"(a per-device mask has shape {(*shape, devices)})"
            )
        per_device = tuple(m.shape) != shape
        out[name] = (
            m.detach().reshape(-1, devices) if per_device else m.detach().reshape(-1)
        ).cpu()
    return out


def check_max_pulses(max_pulses) -> int:
    if isinstance(max_pulses, bool) or not isinstance(max_pulses, numbers.Integral):
        raise TypeError(f"max_pulses must be an int, got {max_pulses!r}")
    if max_pulses < 1:
        raise ValueError(f"max_pulses must be >= 1, got {max_pulses}")
    return int(max_pulses)


def program(
    model: nn.Module,
    device: DeviceModel,
    verify_masks: Mapping[str, torch.Tensor] | None,
    seed: int,
    *,
    max_pulses: int = 100,
) -> ProgramResult:
    """Program every CiM layer of ``model`` onto ``device`` with device instance ``seed``.

    ``verify_masks`` maps layer names to bool tensors of the weight's shape (True: write-verify
    all devices of that weight) or of shape (*weight.shape, D) (one flag per device, d = 0 least
    significant); layers left out, or ``None``, are not verified. Returns the
    programmed weights (targets are the layers' effective clean weights) and the pulses of every
    device. ``max_pulses`` caps the pulses of one verified device.
    """
    if not isinstance(device, DeviceModel):
        raise TypeError(f"device must be a cimext.DeviceModel, got {type(device).__name__}")
    seed = check_seed(seed)
    max_pulses = check_max_pulses(max_pulses)
    masks = check_masks(model, verify_masks, device.devices)
    weights, pulses = {}, {}
    for name, layer in require_cim_layers(model, "program"):
        w_eff = effective_weight(layer)
        draws = draw_layer(w_eff, device, seed, layer.layer_id, max_pulses)
        w, p = draws.program(masks[name], per_device=True)
        weights[name] = w.to(w_eff.dtype).reshape(w_eff.shape).to(w_eff.device)
        pulses[name] = p.reshape(*w_eff.shape, device.devices)
    return ProgramResult(
        weights=weights,
        pulses=pulses,
        seed=int(seed),
        settings=dict(max_pulses=max_pulses, th=float(device.th), sigma=float(device.sigma)),
    )
