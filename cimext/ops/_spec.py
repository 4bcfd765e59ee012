"""Argument handling shared by the op wrappers: seeds, noise specs, and validation."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import reference as ref
from ..device import DeviceModel

MAX_SEED = 2**64


def check_seed(seed, name: str = "seed") -> int:
    """A device-instance seed as its int64 bit pattern (seeds live in [0, 2**64))."""
    if isinstance(seed, torch.Tensor) and seed.numel() == 1 and not seed.is_floating_point():
        seed = int(seed)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int in [0, 2**64), got {seed!r}")
    seed = int(seed)
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"{name} must be in [0, 2**64) (a 64-bit seed), got {seed}")
    return seed - MAX_SEED if seed >= 2**63 else seed


def check_seeds(seed, seeds) -> tuple[list[int], bool]:
    """(int64 seed patterns, stacked?) from the ``seed`` / ``seeds`` keywords, as Python ints."""
    if seeds is None:
        return [check_seed(seed)], False
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.reshape(-1).tolist()
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    return [check_seed(s, f"seeds[{i}]") for i, s in enumerate(seeds)], True


def _seed_tensor_arg(name: str, t: torch.Tensor) -> torch.Tensor:
    # int64 tensors are taken as they are (their values are seed bit patterns) and unsigned ones
    # by value: checking values would read them back, which a compiled graph cannot do without a
    # break. Signed narrower integers are refused: a negative entry would wrap around.
    if t.dtype == torch.int64:
        return t.reshape(-1)
    if t.dtype == torch.uint64:
        return t.reshape(-1).view(torch.int64)
    if t.dtype in (torch.uint8, torch.uint16, torch.uint32):
        return t.reshape(-1).to(torch.int64)
    raise TypeError(
        f"{name} must be an int64 tensor of seed bit patterns (or an unsigned integer tensor), "
        f"got {t.dtype}"
    )


def seeds_arg(seed, seeds) -> tuple[torch.Tensor, bool]:
    """The schema's ``seeds`` tensor (int64, (S,), on the CPU unless given as a tensor) and whether
    the output keeps its seed dimension, from the wrapper keywords ``seed`` / ``seeds``.

    Python ints are range-checked ([0, 2**64)); integer tensors pass through without reading
    their values (int64 entries are seed bit patterns), so that a compiled graph can take seeds
    drawn as tensors without a graph break or a recompilation per seed."""
    if seeds is None:
        if isinstance(seed, torch.Tensor):
            if seed.numel() != 1:
                raise ValueError(f"seed must be a single seed, got shape {tuple(seed.shape)}")
            return _seed_tensor_arg("seed", seed), False
        return torch.tensor([check_seed(seed)], dtype=torch.int64), False
    if isinstance(seeds, torch.Tensor):
        if seeds.numel() == 0:
            raise ValueError("seeds must hold at least one seed")
        return _seed_tensor_arg("seeds", seeds), True
    checked, _ = check_seeds(0, seeds)
    return torch.tensor(checked, dtype=torch.int64), True


def check_layer_id(layer_id) -> int:
    if isinstance(layer_id, bool) or not isinstance(layer_id, numbers.Integral):
        raise TypeError(f"layer_id must be an int, got {layer_id!r}")
    if not 0 <= int(layer_id) < 2**63:
        raise ValueError(f"layer_id must be in [0, 2**63), got {layer_id}")
    return int(layer_id)


def check_nonnegative(name: str, v) -> float:
    """``v`` as a float, or a TypeError / ValueError naming ``name`` unless finite and >= 0."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {v}")
    return v


@dataclass(frozen=True)
class NoiseArgs:
    """The noise arguments of the op schemas (CIMEXT_NOISE_ARGS in csrc/cimext.cpp) by name.

    One field per schema argument, with the schema's name: ops are called through
    ``_registry.bind(op, **noise.fields(), ...)``, so adding an argument to the schema is adding
    one field here (and its default), not editing positional tuples."""

    seeds: torch.Tensor | None = None
    layer_id: int = 0
    kind: int = ref.KIND_NONE
    scale: float | None = None
    weight_bits: int = 8
    bits_per_device: int = 2
    sigma: float = 0.0
    level_sigma: tuple[float, ...] = ()
    verified_sigma: float = 0.0
    th: float = 0.0
    verify: bool = False
    verify_mask: torch.Tensor | None = None

    def fields(self) -> dict:
        """The fields as schema keywords (level_sigma as the list the schema takes)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["level_sigma"] = list(self.level_sigma)
        return out

    @classmethod
    def of(cls, named: dict) -> NoiseArgs:
        """The noise arguments out of a call's arguments by name (``_registry.named``)."""
        kw = {f.name: named[f.name] for f in dataclasses.fields(cls)}
        kw["level_sigma"] = tuple(kw["level_sigma"])
        return cls(**kw)

    def ref_kwargs(self) -> dict:
        """Keywords of cimext.reference's noise functions (seeds as a list of ints)."""
        kw = self.fields()
        kw["seeds"] = seeds_as_uint(self.seeds)
        kw["mode"] = kw.pop("kind")
        kw["level_sigma"] = tuple(self.level_sigma)
        return kw


def make_spec(device=None, rcg=None, gaussian=None) -> NoiseArgs:
    """The kind of noise (NoiseArgs without seeds) from the user keywords ``device``
    (DeviceModel), ``rcg`` ((sigma_t, th)) and ``gaussian`` (sigma relative to the full scale);
    at most one may be given."""
    given = [
        n for n, v in (("device", device), ("rcg", rcg), ("gaussian", gaussian)) if v is not None
    ]
    if len(given) > 1:
        raise ValueError(f"give at most one of device, rcg, gaussian; got {', '.join(given)}")
    if device is not None:
        if not isinstance(device, DeviceModel):
            raise TypeError(f"device must be a cimext.DeviceModel, got {type(device).__name__}")
        a = device.op_args()
        a["level_sigma"] = tuple(a["level_sigma"])
        return NoiseArgs(kind=ref.KIND_DEVICE, **a)
    if rcg is not None:
        if isinstance(rcg, (str, bytes)) or not isinstance(rcg, Sequence):
            raise TypeError(f"rcg must be a pair (sigma_t, th), got {rcg!r}")
        try:
            sigma_t, th = rcg
        except (TypeError, ValueError):
            raise TypeError(f"rcg must be a pair (sigma_t, th), got {rcg!r}") from None
        return NoiseArgs(
            kind=ref.KIND_RCG,
            sigma=check_nonnegative("rcg sigma_t", sigma_t),
            th=check_nonnegative("rcg th", th),
        )
    if gaussian is not None:
        return NoiseArgs(kind=ref.KIND_GAUSSIAN, sigma=check_nonnegative("gaussian", gaussian))
    return NoiseArgs()


def check_bool(name: str, v) -> bool:
    """``v`` unless it is not a bool: a TypeError naming ``name`` (no truthy strings as flags)."""
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {v!r}")
    return v


def check_scale(scale) -> float | None:
    """The schema's full scale: None (the op computes max|W| itself) or a number >= 0.

    A tensor is read back as a Python number (a host sync on a GPU, a graph break under
    torch.compile); leave ``scale`` None on hot paths."""
    if scale is None:
        return None
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a single number, got shape {tuple(scale.shape)}")
        scale = float(scale.detach())
    return check_nonnegative("scale", scale)


def check_tensor(name: str, t, *, like: torch.Tensor | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but weight is on {like.device}")


def seeds_as_uint(seeds: Sequence[int] | torch.Tensor) -> list[int]:
    """int64 bit patterns (a list or the schema's tensor) back to seeds in [0, 2**64)."""
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.tolist()
    return [s & (MAX_SEED - 1) for s in seeds]


def prepare_call(
    x,
    weight,
    bias,
    delta,
    *,
    device,
    rcg,
    gaussian,
    seed,
    seeds,
    x_stacked,
    layer_id,
    verify_mask,
    scale,
) -> tuple[bool, NoiseArgs]:
    """Validate the keywords shared by the perturbed-op wrappers (the Python types; the values
    are checked by the op itself, the same on every backend). Returns whether the output keeps
    its seed dimension, and the NoiseArgs of the call."""
    check_tensor("x", x)
    check_tensor("weight", weight)
    for name, t in (("bias", bias), ("delta", delta), ("verify_mask", verify_mask)):
        if t is not None:
            check_tensor(name, t)
    check_bool("x_stacked", x_stacked)
    kind = make_spec(device=device, rcg=rcg, gaussian=gaussian)
    seed_t, stacked = seeds_arg(seed, seeds)
    if x_stacked and not stacked:
        raise ValueError("x_stacked=True needs seeds=[...] (one slice of x per seed)")
    noise = dataclasses.replace(
        kind,
        seeds=seed_t,
        layer_id=check_layer_id(layer_id),
        scale=check_scale(scale),
        verify_mask=verify_mask,
    )
    return stacked, noise
