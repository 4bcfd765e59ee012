"""cimext.ops.bitflip / bitflip_: flip bits of a tensor's raw representation (noisy memory)."""

from __future__ import annotations

import math
import numbers

import torch

from .. import reference as ref
from ..backend import resolve
from . import _spec
from ._registry import check, check_in_fake, on_namespace, register_ref, schema_op

bit_mask = ref.bit_mask


def _probability(name: str, p) -> float:
    if isinstance(p, torch.Tensor) and p.numel() == 1:
        p = p.item()
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"bitflip: {name} must be a number in [0, 1], got {p!r}")
    p = float(p)
    if math.isnan(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"bitflip: {name} must be a probability in [0, 1], got {p}")
    return p


def _args(t, p, seed, mask, p01, p10, layer_id, zero_nonfinite) -> tuple:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"bitflip: t must be a torch.Tensor, got {type(t).__name__}")
    if p is None and (p01 is None or p10 is None):
        raise TypeError("bitflip: give p, or both p01 and p10")
    if p is not None:
        p = _probability("p", p)
    p01 = p if p01 is None else _probability("p01", p01)
    p10 = p if p10 is None else _probability("p10", p10)
    m = ref.bit_mask(t.dtype, "all" if mask is None else mask)
    if not isinstance(zero_nonfinite, bool):
        raise TypeError(f"bitflip: zero_nonfinite must be a bool, got {zero_nonfinite!r}")
    return (
        t,
        p01,
        p10,
        m,
        _spec.check_seed(seed),
        _spec.check_layer_id(layer_id),
        zero_nonfinite,
    )


def bitflip(
    t: torch.Tensor,
    p: float | None = None,
    *,
    seed: int,
    mask: int | str | None = None,
    p01: float | None = None,
    p10: float | None = None,
    layer_id: int = 0,
    zero_nonfinite: bool = False,
) -> tuple[torch.Tensor, int]:
    """A copy of ``t`` whose eligible bits each flipped with probability p (0→1 with p01, 1→0
    with p10 where given), and the number of flips. ``mask``: int, or "all" / "sign" /
    "exponent" / "mantissa" (joined with "+"); NaN / Inf made by a flip stay unless
    ``zero_nonfinite``. The same (seed, layer_id) flips the same bits on every backend."""
    args = _args(t, p, seed, mask, p01, p10, layer_id, zero_nonfinite)
    with torch.no_grad():
        out, flips = schema_op("bitflip", resolve(t.device))(*args)
    return out, int(flips)


def bitflip_(
    t: torch.Tensor,
    p: float | None = None,
    *,
    seed: int,
    mask: int | str | None = None,
    p01: float | None = None,
    p10: float | None = None,
    layer_id: int = 0,
    zero_nonfinite: bool = False,
) -> int:
    """bitflip in place; returns the number of flips. Nothing is written if an argument is bad."""
    args = _args(t, p, seed, mask, p01, p10, layer_id, zero_nonfinite)
    with torch.no_grad():
        flips = schema_op("bitflip_", resolve(t.device))(*args)
    return int(flips)


def _ref_bitflip(t, p01, p10, mask, seed, layer_id, zero_nonfinite):
    check("bitflip", (t, p01, p10, mask, seed, layer_id, zero_nonfinite, False))
    return ref.bitflip(t, p01, p10, mask, seed, layer_id, zero_nonfinite)


def _ref_bitflip_(t, p01, p10, mask, seed, layer_id, zero_nonfinite):
    check("bitflip", (t, p01, p10, mask, seed, layer_id, zero_nonfinite, True))
    return ref.bitflip_(t, p01, p10, mask, seed, layer_id, zero_nonfinite)


# The fakes run the op's checks (they are also the Meta kernels); on fake tensors the checks
# skip what needs memory or values.
def _fake_bitflip(t, p01, p10, mask, seed, layer_id, zero_nonfinite):
    check_in_fake("bitflip", (t, p01, p10, mask, seed, layer_id, zero_nonfinite, False))
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    return out, torch.empty((), dtype=torch.int64, device=t.device)


def _fake_bitflip_(t, p01, p10, mask, seed, layer_id, zero_nonfinite):
    check_in_fake("bitflip", (t, p01, p10, mask, seed, layer_id, zero_nonfinite, True))
    return torch.empty((), dtype=torch.int64, device=t.device)


register_ref("bitflip", _ref_bitflip)
register_ref("bitflip_", _ref_bitflip_)


def _register(ns: str) -> None:
    torch.library.register_fake(f"{ns}::bitflip", _fake_bitflip)
    torch.library.register_fake(f"{ns}::bitflip_", _fake_bitflip_)


on_namespace(_register)
