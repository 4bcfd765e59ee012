"""The device model of DESIGN section 3: how a trained weight lands on NVM devices."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeviceModel:
    """Multi-device weights with Gaussian programming error, optionally write-verified.

    A weight of ``weight_bits`` (M) bits is split over D = M / K devices of ``bits_per_device`` (K)
    bits. Device d (d = 0 least significant) at level v has programming error σ·level_sigma[v]·ε in
    units of one of its levels; a write-verified device has clamp(verified_sigma·ε, −th, th). The
    weight noise is ΔW = s/(2^M−1) · Σ_d 2^{dK} n_d with s = max|W| of the layer.
    """

    weight_bits: int = 8
    bits_per_device: int = 2
    sigma: float = 0.1
    level_sigma: tuple[float, ...] | None = None
    verified_sigma: float | None = field(default=None)
    th: float = 0.06
    verify: bool = False

    def __post_init__(self) -> None:
        for name in ("weight_bits", "bits_per_device"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"DeviceModel: {name} must be an int, got {v!r}")
        if not 1 <= self.weight_bits <= 24:
            raise ValueError(f"DeviceModel: weight_bits must be in [1, 24], got {self.weight_bits}")
        if not 1 <= self.bits_per_device <= 8:
            raise ValueError(
                f"DeviceModel: bits_per_device must be in [1, 8], got {self.bits_per_device}"
            )
        if self.weight_bits % self.bits_per_device:
            raise ValueError(
                f"DeviceModel: bits_per_device K={self.bits_per_device} must divide "
                f"weight_bits M={self.weight_bits}"
            )
        _check_nonneg("sigma", self.sigma)
        _check_nonneg("th", self.th)
        if self.verified_sigma is None:
            object.__setattr__(self, "verified_sigma", self.sigma / 10)
        _check_nonneg("verified_sigma", self.verified_sigma)
        if self.level_sigma is not None:
            if isinstance(self.level_sigma, (str, bytes)) or not hasattr(
                self.level_sigma, "__iter__"
            ):
                raise TypeError(
                    f"DeviceModel: level_sigma must be a sequence of numbers, got "
                    f"{self.level_sigma!r}"
                )
            for v in self.level_sigma:
                _check_nonneg("level_sigma", v)
            ls = tuple(float(v) for v in self.level_sigma)
            if len(ls) != 2**self.bits_per_device:
                raise ValueError(
                    f"DeviceModel: level_sigma needs 2**bits_per_device = "
                    f"{2**self.bits_per_device} entries, got {len(ls)}"
                )
            for v in ls:
                _check_nonneg("level_sigma", v)
            object.__setattr__(self, "level_sigma", ls)
        # Only a bool: bool("no") is True, so a string (or any other truthy value) taken as a
        # flag would silently verify every device.
        if not isinstance(self.verify, bool):
            raise TypeError(
                f"DeviceModel: verify must be a bool (True or False), got {self.verify!r}"
            )

    @property
    def devices(self) -> int:
        """D = M / K, the devices that hold one weight."""
        return self.weight_bits // self.bits_per_device

    @property
    def levels(self) -> int:
        """2^M − 1, the largest quantized weight magnitude."""
        return 2**self.weight_bits - 1

    def _place_sum(self, power: int) -> int:
        return sum(2 ** (power * d * self.bits_per_device) for d in range(self.devices))

    def th_g(self) -> float:
        """The weight bound (relative to s) that write-verify with clamp ``th`` guarantees."""
        return self.th * self._place_sum(1) / self.levels

    def weight_std(self) -> float:
        """Std of ΔW / s for an unverified weight with uniform sigma."""
        return self.sigma * math.sqrt(self._place_sum(2)) / self.levels

    @classmethod
    def verified(
        cls,
        th_g: float = 0.03,
        *,
        weight_bits: int = 8,
        bits_per_device: int = 2,
        sigma: float = 0.1,
        verified_sigma: float | None = None,
    ) -> DeviceModel:
        """Every device write-verified, with th chosen so that th_g() equals ``th_g``.

        verified_sigma defaults to th: the Monte Carlo population that the worst-case methods are
        compared with (paper, Table I)."""
        _check_positive("th_g", th_g)
        probe = cls(weight_bits=weight_bits, bits_per_device=bits_per_device, sigma=sigma)
        th = th_g * probe.levels / probe._place_sum(1)
        return cls(
            weight_bits=weight_bits,
            bits_per_device=bits_per_device,
            sigma=sigma,
            verified_sigma=th if verified_sigma is None else verified_sigma,
            th=th,
            verify=True,
        )

    @classmethod
    def rram_nonuniform(cls, sigma: float = 0.1) -> DeviceModel:
        """2-bit RRAM-like devices whose intermediate levels are noisier than the extremes
        (the non-uniform variation case of U-SWIM): level_sigma = (0.5, 1.5, 1.5, 0.5)."""
        return cls(weight_bits=8, bits_per_device=2, sigma=sigma, level_sigma=(0.5, 1.5, 1.5, 0.5))

    def op_args(self) -> dict:
        """Keyword arguments of the low-level ops (cimext.ops) that describe this model."""
        return dict(
            weight_bits=self.weight_bits,
            bits_per_device=self.bits_per_device,
            sigma=float(self.sigma),
            level_sigma=tuple(self.level_sigma or ()),
            verified_sigma=float(self.verified_sigma),
            th=float(self.th),
            verify=self.verify,
        )


def _check_nonneg(name: str, v: float) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"DeviceModel: {name} must be a number, got {v!r}")
    if math.isnan(v) or v < 0 or math.isinf(v):
        raise ValueError(f"DeviceModel: {name} must be finite and >= 0, got {v}")


def _check_positive(name: str, v: float) -> None:
    _check_nonneg(name, v)
    if v == 0:
        raise ValueError(f"{name} must be > 0, got {v}")
