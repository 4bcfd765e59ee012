"""Triton kernel of ``cimext::noise``: ΔW of a weight tensor for S device instances.

The float32 op order follows ``cimext.reference.noise_flat`` (and csrc/kernels/noise.h) so that
results agree within 1e-6. ``noise_tile`` is the per-element noise model; the perturbed matmul
kernels call it on each weight tile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from cimext.ops._registry import named
from cimext.ops._spec import NoiseArgs

from .philox import as_key, normal_at, normals_row4, stream_tensor

KIND_NONE, KIND_GAUSSIAN, KIND_DEVICE, KIND_RCG = 0, 1, 2, 3
# How write-verification is decided per weight (a constexpr of the kernels).
VERIFY_NONE, VERIFY_ALL, VERIFY_MASK = 0, 1, 2
NOISE_BLOCK = 1024
MAX_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2
_M64 = 0xFFFFFFFFFFFFFFFF


def _f32(x: float) -> float:
    """x rounded to the nearest float32, as a Python float (passes to kernels exactly)."""
    return torch.tensor(x, dtype=torch.float32).item()


@dataclass(frozen=True)
class NoiseParams:
    """Host-side noise constants (float64 math rounded to float32) and the kernels' constexprs."""

    kind: int
    devices: int
    bits_per_device: int
    verify_mode: int
    level_table: bool
    std_or_coef: float
    lsb: float
    q_scale: float
    q_levels: float
    sigma: float
    verified_sigma: float
    th: float
    dev_std: tuple[float, ...]

    def scalars(self) -> dict:
        """Runtime float arguments of the kernels."""
        return dict(
            std_or_coef=self.std_or_coef,
            lsb=self.lsb,
            q_scale=self.q_scale,
            q_levels=self.q_levels,
            sigma=self.sigma,
            verified_sigma=self.verified_sigma,
            th=self.th,
        )

    def constexprs(self) -> dict:
        """Compile-time arguments of the kernels."""
        return dict(
            KIND=self.kind,
            DEVICES=self.devices,
            BITS=self.bits_per_device,
            VERIFY=self.verify_mode,
            LEVEL_TABLE=self.level_table,
        )

    def dev_std_tensor(self, device) -> torch.Tensor:
        """The per-level std table σ·level_sigma[v] as float32 (a dummy when unused)."""
        return torch.tensor(self.dev_std, dtype=torch.float32, device=device)


def make_noise_params(noise: NoiseArgs, scale: float) -> NoiseParams:
    """The constants of a noise spec (checked by cimext::_check_<op>) with full scale ``scale``,
    computed as reference.py / noise.h do."""
    mode, weight_bits, bits_per_device = noise.kind, noise.weight_bits, noise.bits_per_device
    sigma, verified_sigma, th, verify = noise.sigma, noise.verified_sigma, noise.th, noise.verify
    level_sigma = tuple(float(v) for v in noise.level_sigma)
    has_mask = noise.verify_mask is not None
    n_levels = 1 << bits_per_device
    levels = (1 << weight_bits) - 1
    devices = weight_bits // bits_per_device
    # The kernels' KIND 1 is "one Gaussian per weight with std std_or_coef": mode 1 (std s·σ) and
    # device noise without level sigma or any verification (reference.noise_kind's fast path,
    # std s·σ·sqrt(Σ_d 4^{dK})/(2^M−1)).
    kind = mode
    if mode == KIND_DEVICE and not level_sigma and not verify and not has_mask:
        kind = KIND_GAUSSIAN
        sum4 = float(sum(4 ** (d * bits_per_device) for d in range(devices)))
        std_or_coef = scale * sigma * math.sqrt(sum4) / levels
    elif mode in (KIND_GAUSSIAN, KIND_RCG):
        std_or_coef = scale * sigma
    else:
        std_or_coef = 0.0
    if kind != KIND_DEVICE:
        verify_mode = VERIFY_NONE  # only device noise looks at verification
    elif has_mask:
        verify_mode = VERIFY_MASK
    elif verify:
        verify_mode = VERIFY_ALL
    else:
        verify_mode = VERIFY_NONE
    table = tuple(_f32(sigma * (level_sigma[v] if level_sigma else 1.0)) for v in range(n_levels))
    # q = round(|w| / s * levels) is 0 when s <= 0; dividing by 1 and multiplying by 0 gives that
    # without a branch (or a division by zero) in the kernel.
    q_scale, q_levels = (_f32(scale), float(levels)) if scale > 0 else (1.0, 0.0)
    return NoiseParams(
        kind=kind,
        devices=devices,
        bits_per_device=bits_per_device,
        verify_mode=verify_mode,
        level_table=bool(level_sigma),
        std_or_coef=_f32(std_or_coef),
        lsb=_f32(scale / levels),
        q_scale=q_scale,
        q_levels=q_levels,
        sigma=_f32(sigma),
        verified_sigma=_f32(verified_sigma),
        th=_f32(th),
        dev_std=table,
    )


def seed_list(seeds: torch.Tensor) -> list[int]:
    """The int64 seed bit patterns of the schema's (checked) ``seeds`` tensor."""
    return seeds.tolist()


def stream_seeds(seeds: Sequence[int], layer_id: int) -> list[int]:
    """Philox stream seeds splitmix64(s ^ splitmix64(layer_id)) of int64 seed bit patterns."""
    from cimext.reference import stream_seed

    return [stream_seed(int(s) & _M64, int(layer_id)) for s in seeds]


def prepare_verify_mask(verify_mask, weight: torch.Tensor):
    """The (checked: weight's shape and device) verify mask as a contiguous uint8 tensor
    (1 = write-verified), or None."""
    if verify_mask is None:
        return None
    # Any nonzero entry counts as verified, like reference's .to(torch.bool).
    return verify_mask.ne(0).to(torch.uint8).contiguous()


@triton.jit
def _quantized_level(w, q_scale, q_levels):
    # q = round_half_even(|w| / s * levels) clamped to [0, levels], bit-exact with torch.round /
    # rintf: IEEE division (div_rn, not the approximate default), then floor + tie-to-even, which
    # the interpreter supports (libdevice rint is not available there).
    a = tl.math.div_rn(tl.abs(w), q_scale) * q_levels
    a = tl.minimum(a, q_levels)  # round(min(a, L)) == min(round(a), L) since L is an integer
    fl = tl.floor(a)
    frac = a - fl  # exact
    q = fl.to(tl.int32)
    up = (frac > 0.5) | ((frac == 0.5) & ((q & 1) == 1))
    return q + up.to(tl.int32)


@triton.jit
def _device_term(
    acc,
    e,
    q,
    verified,
    dev_std_ptr,
    sigma,
    verified_sigma,
    th,
    D: tl.constexpr,
    BITS: tl.constexpr,
    VERIFY: tl.constexpr,
    LEVEL_TABLE: tl.constexpr,
):
    # acc + 2^{dK} * n_d for device d, with n_d the verified or unverified device error.
    if VERIFY != 1:
        if LEVEL_TABLE:
            digit = (q >> (D * BITS)) & ((1 << BITS) - 1)
            std = tl.load(dev_std_ptr + digit)
        else:
            std = sigma
        unver = std * e
    if VERIFY != 0:
        ver = tl.minimum(tl.maximum(verified_sigma * e, -th), th)
    if VERIFY == 0:
        n = unver
    elif VERIFY == 1:
        n = ver
    else:
        n = tl.where(verified != 0, ver, unver)
    return acc + n * (1 << (D * BITS))


@triton.jit
def noise_tile(
    stream,
    i,
    w,
    verified,
    dev_std_ptr,
    std_or_coef,
    lsb,
    q_scale,
    q_levels,
    sigma,
    verified_sigma,
    th,
    KIND: tl.constexpr,
    DEVICES: tl.constexpr,
    BITS: tl.constexpr,
    VERIFY: tl.constexpr,
    LEVEL_TABLE: tl.constexpr,
):
    """ΔW (float32) of the weights w at flat indices i (int64 block) for one stream."""
    if KIND == 1:
        out = std_or_coef * normal_at(stream, i)
    elif KIND == 3:
        out = std_or_coef * tl.minimum(normal_at(stream, i), th)
    elif KIND == 2:
        q = _quantized_level(w.to(tl.float32), q_scale, q_levels)
        acc = tl.zeros(i.shape, tl.float32)
        if DEVICES % 4 == 0:
            # j = i*D + d: devices 4g..4g+3 are exactly the four normals of Philox block i*D/4 + g.
            for g in tl.static_range(DEVICES // 4):
                e0, e1, e2, e3 = tl.randn4x(as_key(stream), i * (DEVICES // 4) + g)
                acc = _device_term(
                    acc,
                    e0,
                    q,
                    verified,
                    dev_std_ptr,
                    sigma,
                    verified_sigma,
                    th,
                    4 * g,
                    BITS,
                    VERIFY,
                    LEVEL_TABLE,
                )
                acc = _device_term(
                    acc,
                    e1,
                    q,
                    verified,
                    dev_std_ptr,
                    sigma,
                    verified_sigma,
                    th,
                    4 * g + 1,
                    BITS,
                    VERIFY,
                    LEVEL_TABLE,
                )
                acc = _device_term(
                    acc,
                    e2,
                    q,
                    verified,
                    dev_std_ptr,
                    sigma,
                    verified_sigma,
                    th,
                    4 * g + 2,
                    BITS,
                    VERIFY,
                    LEVEL_TABLE,
                )
                acc = _device_term(
                    acc,
                    e3,
                    q,
                    verified,
                    dev_std_ptr,
                    sigma,
                    verified_sigma,
                    th,
                    4 * g + 3,
                    BITS,
                    VERIFY,
                    LEVEL_TABLE,
                )
        else:
            for d in tl.static_range(DEVICES):
                e = normal_at(stream, i * DEVICES + d)
                acc = _device_term(
                    acc,
                    e,
                    q,
                    verified,
                    dev_std_ptr,
                    sigma,
                    verified_sigma,
                    th,
                    d,
                    BITS,
                    VERIFY,
                    LEVEL_TABLE,
                )
        out = lsb * acc
    else:
        out = tl.zeros(i.shape, tl.float32)
    return out


@triton.jit
def noise_tile_rows(
    stream,
    first,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    std_or_coef,
    th,
    KIND: tl.constexpr,
):
    """ΔW of a (ROWS, COLS) tile with j = first[r] + c, first[r] % 4 == 0 (gaussian / rcg only)."""
    eps = normals_row4(stream, first, ROWS, COLS)
    if KIND == 3:
        eps = tl.minimum(eps, th)
    return std_or_coef * eps


@triton.jit
def _noise_kernel(
    w_ptr,
    mask_ptr,
    streams_ptr,
    dev_std_ptr,
    out_ptr,
    n,
    std_or_coef,
    lsb,
    q_scale,
    q_levels,
    sigma,
    verified_sigma,
    th,
    KIND: tl.constexpr,
    DEVICES: tl.constexpr,
    BITS: tl.constexpr,
    VERIFY: tl.constexpr,
    LEVEL_TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    s = tl.program_id(1)
    stream = tl.load(streams_ptr + s)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    # Weights and masks are only read where the noise depends on them.
    if KIND == 2:
        w = tl.load(w_ptr + i, mask=inside, other=0).to(tl.float32)
    else:
        w = tl.zeros((BLOCK,), tl.float32)
    if VERIFY == 2:
        verified = tl.load(mask_ptr + i, mask=inside, other=0)
    else:
        verified = tl.zeros((BLOCK,), tl.uint8)
    if KIND == 1 or KIND == 3:
        # One randn4x per four consecutive weights (block starts are multiples of 4).
        first = tl.program_id(0).to(tl.int64) * BLOCK + 4 * tl.arange(0, BLOCK // 4)
        out = tl.reshape(
            noise_tile_rows(stream, first, BLOCK // 4, 4, std_or_coef, th, KIND), (BLOCK,)
        )
    else:
        out = noise_tile(
            stream,
            i,
            w,
            verified,
            dev_std_ptr,
            std_or_coef,
            lsb,
            q_scale,
            q_levels,
            sigma,
            verified_sigma,
            th,
            KIND,
            DEVICES,
            BITS,
            VERIFY,
            LEVEL_TABLE,
        )
    tl.store(out_ptr + s.to(tl.int64) * n + i, out.to(out_ptr.dtype.element_ty), mask=inside)


def _noise_into(
    weight: torch.Tensor, noise: NoiseArgs, scale: float, out: torch.Tensor | None
) -> torch.Tensor:
    """ΔW of the (checked) arguments into ``out`` (a new tensor when None)."""
    seeds = seed_list(noise.seeds)
    params = make_noise_params(noise, scale)
    mask = prepare_verify_mask(noise.verify_mask, weight)
    if out is None:
        out = torch.empty((len(seeds), *weight.shape), dtype=weight.dtype, device=weight.device)
    # A strided out (a slice of a larger buffer) is written through one contiguous copy.
    dst = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    n = weight.numel()
    if params.kind == KIND_NONE or n == 0:
        dst.zero_()
    else:
        w = weight.detach().contiguous()
        streams = stream_tensor(stream_seeds(seeds, noise.layer_id), weight.device)
        dev_std = params.dev_std_tensor(weight.device)
        # Grid axis 1 (the seed) is limited to 65535 on CUDA: launch seeds in chunks.
        for c0 in range(0, len(seeds), MAX_GRID_YZ):
            c1 = min(len(seeds), c0 + MAX_GRID_YZ)
            _noise_kernel[(triton.cdiv(n, NOISE_BLOCK), c1 - c0)](
                w,
                w if mask is None else mask,  # unread unless VERIFY == 2
                streams[c0:c1],
                dev_std,
                dst[c0:c1],
                n,
                **params.scalars(),
                **params.constexprs(),
                BLOCK=NOISE_BLOCK,
            )
    if dst is not out:
        out.copy_(dst)
    return out


def noise(*args, **kwargs) -> torch.Tensor:
    """cimext::noise (schema in csrc/cimext.cpp): ΔW for every seed, shape (S, *weight.shape),
    dtype of weight. Checked first by cimext::_check_noise, the checks of the C++ kernels."""
    scale = float(torch.ops.cimext._check_noise(*args, **kwargs))
    a = named("noise", args, kwargs)
    return _noise_into(a["weight"], NoiseArgs.of(a), scale, None)


def noise_out(*args, **kwargs) -> None:
    """cimext::noise_out: ΔW for every seed written into ``out``, which cimext::_check_noise_out
    checks (with everything else) before anything is written."""
    scale = float(torch.ops.cimext._check_noise_out(*args, **kwargs))
    a = named("noise_out", args, kwargs)
    _noise_into(a["weight"], NoiseArgs.of(a), scale, a["out"])
