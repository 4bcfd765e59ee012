"""Triton kernels of ``cimext::perturbed_linear``: y[s] = x_s @ (W + δ + ΔW_s)^T + b.

ΔW_s is regenerated from the seed and never stored whole. Two paths:

- fused: the matmul builds each (BLOCK_N, BLOCK_K) tile of W + δ + ΔW_s in registers right before
  its ``tl.dot``. Each M tile regenerates the noise of the W tiles it reads, so this path serves
  problems with one M tile (M <= FUSED_MAX_M: small batches, folded instances), grouped
  convolutions, and δ-only calls (no noise to regenerate).
- row tiles: for larger M, one kernel writes W + δ + ΔW_s of a tile of rows (for a chunk of
  seeds) into a scratch buffer of at most SCRATCH_ELEMENTS elements, reused across tiles and
  seeds, and the same matmul (noise off) reads it: every noise value is generated once per call
  however many M tiles read it.

On a GPU both kernels are autotuned (a few block configurations, keyed by the problem size);
CIMEXT_TRITON_AUTOTUNE=0 turns that off. Under TRITON_INTERPRET=1 one small fixed configuration
keeps CPU runs short and deterministic. The matmul also serves ``perturbed_conv2d`` (im2col)
through its group axis: group g multiplies columns g*K .. g*K+K-1 of x with weight rows
g*N .. g*N+N-1, whose flat indices (and so whose noise) are those of the full weight.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from cimext.ops._registry import named
from cimext.ops._spec import NoiseArgs

from .noise import (
    KIND_GAUSSIAN,
    KIND_NONE,
    KIND_RCG,
    _noise_into,
    make_noise_params,
    noise_tile,
    noise_tile_rows,
    prepare_verify_mask,
    seed_list,
    stream_seeds,
)
from .philox import stream_tensor

MAX_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2
# Largest M served by the fused path on a GPU; above it the row-tile path generates each noise
# value once instead of once per M tile.
FUSED_MAX_M = 128
# Bound of the row-tile scratch buffer (elements): 16 MiB of float32.
SCRATCH_ELEMENTS = 1 << 22
# "fused" or "rows" forces a path (tests, benchmarks); None chooses per call.
FORCE_PATH: str | None = None


@triton.jit
def _perturbed_tile(
    w,
    idx,
    first,
    w_in,
    stream,
    delta_ptr,
    mask_ptr,
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
    ROW4: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    """W + δ + ΔW of a (ROWS, COLS) weight tile w at flat indices idx (rows start at first),
    rounded like the reference: (W + δ) + ΔW.to(W.dtype), in W's dtype; zero outside w_in."""
    wp = w
    if HAS_DELTA:
        wp = wp + tl.load(delta_ptr + idx, mask=w_in, other=0)
    if KIND != 0:
        if ROW4:
            # Rows that start on a multiple of 4 draw one randn4x per 4 weights.
            nz = noise_tile_rows(stream, first, ROWS, COLS, std_or_coef, th, KIND)
        else:
            if VERIFY == 2:
                verified = tl.load(mask_ptr + idx, mask=w_in, other=0)
            else:
                verified = tl.zeros((ROWS, COLS), tl.uint8)
            nz = noise_tile(
                stream,
                idx,
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
        wp = wp + nz.to(wp.dtype)
        # Padding lanes carry noise; zero them so they add nothing to a dot.
        wp = tl.where(w_in, wp, tl.zeros_like(wp))
    return wp


@triton.jit
def _perturbed_mm_kernel(
    x_ptr,
    w_ptr,
    delta_ptr,
    bias_ptr,
    mask_ptr,
    streams_ptr,
    dev_std_ptr,
    out_ptr,
    M,
    N,
    K,
    G,
    m_bucket,  # autotuning key only: next power of two of M
    stride_xs,
    stride_xm,
    stride_xk,
    stride_ws,
    stride_os,
    stride_om,
    stride_on,
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
    ROW4: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_sg = tl.program_id(2)
    s = pid_sg // G
    g = pid_sg % G
    stream = tl.load(streams_ptr + s)

    # int64 index math throughout: flat weight indices times D exceed 2**31 for large layers.
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = rn + g.to(tl.int64) * N  # rows of the full (G*N, K) weight
    x_base = x_ptr + s.to(tl.int64) * stride_xs + g.to(tl.int64) * K * stride_xk
    # stride_ws: 0 for the one weight of every seed, else the per-seed stride of a scratch.
    w_base = w_ptr + s.to(tl.int64) * stride_ws
    m_in = rm < M
    n_in = rn < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_in = rk < K
        x = tl.load(
            x_base + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
            mask=m_in[:, None] & k_in[None, :],
            other=0,
        )
        # Weight tile in the (N, K) layout of memory: flat index = row * K + k.
        first = rows * K + k0
        idx = first[:, None] + tl.arange(0, BLOCK_K)[None, :]
        w_in = n_in[:, None] & k_in[None, :]
        w = tl.load(w_base + idx, mask=w_in, other=0)
        wp = _perturbed_tile(
            w,
            idx,
            first,
            w_in,
            stream,
            delta_ptr,
            mask_ptr,
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
            ROW4,
            HAS_DELTA,
            BLOCK_N,
            BLOCK_K,
        )
        if IEEE:
            # IEEE fp32 products (no TF32) so that results match torch's fp32 matmul to ~1e-6.
            acc = tl.dot(x, tl.trans(wp), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(wp), acc)

    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rows, mask=n_in, other=0).to(tl.float32)[None, :]
    out_ptrs = (
        out_ptr + s.to(tl.int64) * stride_os + rm[:, None] * stride_om + rows[None, :] * stride_on
    )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


@triton.jit
def _perturbed_rows_kernel(
    w_ptr,
    delta_ptr,
    mask_ptr,
    streams_ptr,
    dev_std_ptr,
    out_ptr,
    R,
    K,
    row0,
    stride_oc,
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
    ROW4: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[c, r, k] = W + δ + ΔW_c of weight row row0 + r, column k (r < R): a row tile of the
    perturbed weight for seed c of the chunk (grid axis 2), the row-tile path's scratch."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    c = tl.program_id(2)
    stream = tl.load(streams_ptr + c)
    rr = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    k0 = pid_k.to(tl.int64) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    first = (row0 + rr) * K + k0
    idx = first[:, None] + tl.arange(0, BLOCK_K)[None, :]
    w_in = (rr < R)[:, None] & (rk < K)[None, :]
    w = tl.load(w_ptr + idx, mask=w_in, other=0)
    wp = _perturbed_tile(
        w,
        idx,
        first,
        w_in,
        stream,
        delta_ptr,
        mask_ptr,
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
        ROW4,
        HAS_DELTA,
        BLOCK_R,
        BLOCK_K,
    )
    o = out_ptr + c.to(tl.int64) * stride_oc + rr[:, None] * K + rk[None, :]
    tl.store(o, wp, mask=w_in)


# ------------------------------------------------------------------------------ autotuning
def _mm_configs() -> list[triton.Config]:
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): large tiles for big GEMMs, narrow M tiles for
    # small batches; the noise tile lives in registers next to the accumulator, so the largest
    # tiles stay at 128 x 128.
    shapes = [
        (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 64, 4, 3),
        (32, 64, 64, 4, 3),
        (16, 64, 64, 4, 3),
    ]
    return [
        triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=st)
        for m, n, k, w, st in shapes
    ]


def _prune_mm(configs, named_args, **kwargs):
    """Keep the configurations whose tiles fit the problem: BLOCK_M within [min(M, 64), M] (the
    narrow M tiles only for small batches), BLOCK_N and BLOCK_K no larger than needed. Fewer
    candidates also means fewer compiles on the first call (at least one is kept)."""
    m = max(16, triton.next_power_of_2(int(named_args["m_bucket"])))
    n = max(16, triton.next_power_of_2(int(named_args["N"])))
    k = max(16, triton.next_power_of_2(int(named_args["K"])))
    kept = [
        c
        for c in configs
        if min(m, 64) <= c.kwargs["BLOCK_M"] <= m
        and c.kwargs["BLOCK_N"] <= max(64, n)
        and c.kwargs["BLOCK_K"] <= k
    ]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]


def _rows_configs() -> list[triton.Config]:
    return [
        triton.Config(dict(BLOCK_R=r, BLOCK_K=k), num_warps=w)
        for r, k, w in [(32, 128, 4), (64, 64, 4)]
    ]


_perturbed_mm_tuned = triton.autotune(
    configs=_mm_configs(),
    key=["m_bucket", "N", "K", "G"],
    prune_configs_by={"early_config_prune": _prune_mm},
)(_perturbed_mm_kernel)
_perturbed_rows_tuned = triton.autotune(configs=_rows_configs(), key=["R", "K"])(
    _perturbed_rows_kernel
)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuned(device: torch.device) -> bool:
    """Whether the kernels run autotuned here: on a GPU, unless CIMEXT_TRITON_AUTOTUNE=0."""
    return (
        device.type == "cuda"
        and not _interpreted()
        and os.environ.get("CIMEXT_TRITON_AUTOTUNE", "1") != "0"
    )


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


# ------------------------------------------------------------------------------ launchers
def launch_perturbed_mm(
    x3: torch.Tensor,
    weight2: torch.Tensor,
    bias: torch.Tensor | None,
    delta2: torch.Tensor | None,
    mask2: torch.Tensor | None,
    x_stacked: bool,
    streams: torch.Tensor,
    params,
    groups: int,
    fused: bool | None = None,
) -> torch.Tensor:
    """Run the kernels: x3 (S or 1, M, G*K), weight2 (G*N, K) -> (S, M, G*N), all contiguous.
    ``fused`` forces a path (tests); None chooses (see the module docstring)."""
    n_seeds = streams.numel()
    m = x3.shape[1]
    n_total, k = weight2.shape
    out = torch.empty((n_seeds, m, n_total), dtype=weight2.dtype, device=weight2.device)
    if out.numel() == 0:
        return out
    if fused is None:
        fused = _choose_fused(params, groups, m, weight2)
    dev_std = params.dev_std_tensor(weight2.device)
    if fused:
        # Grid axis 2 (seed * groups + group) is limited to 65535 on CUDA: seeds in chunks.
        chunk = max(1, MAX_GRID_YZ // groups)
        for c0 in range(0, n_seeds, chunk):
            c1 = min(n_seeds, c0 + chunk)
            _mm(
                x3[c0:c1] if x_stacked else x3,
                weight2,
                0,
                bias,
                delta2,
                mask2,
                streams[c0:c1],
                dev_std,
                out[c0:c1],
                x_stacked,
                params,
                groups,
            )
        return out
    _row_tiles(x3, weight2, bias, delta2, mask2, x_stacked, streams, params, dev_std, out)
    return out


def _choose_fused(params, groups: int, m: int, weight2: torch.Tensor) -> bool:
    if FORCE_PATH is not None:
        if FORCE_PATH not in ("fused", "rows"):
            raise ValueError(f"FORCE_PATH must be None, 'fused' or 'rows', got {FORCE_PATH!r}")
        return FORCE_PATH == "fused" or groups > 1
    # The interpreter keeps the one small fused configuration (short, deterministic CPU runs).
    return (
        params.kind == KIND_NONE
        or groups > 1
        or m <= FUSED_MAX_M
        or not weight2.is_cuda
        or _interpreted()
    )


def _row_tiles(x3, weight2, bias, delta2, mask2, x_stacked, streams, params, dev_std, out):
    """The row-tile path (groups == 1): scratch tiles of W + δ + ΔW, then the plain matmul."""
    n_seeds = streams.numel()
    n_out, k = weight2.shape
    if n_out * k <= SCRATCH_ELEMENTS:
        rows = n_out  # whole weights, several seeds per scratch
        per = max(1, min(n_seeds, SCRATCH_ELEMENTS // max(1, n_out * k), MAX_GRID_YZ))
    else:
        rows = max(1, min(n_out, SCRATCH_ELEMENTS // max(1, k)))
        per = 1
    scratch = torch.empty((per, rows, k), dtype=weight2.dtype, device=weight2.device)
    plain = dataclasses.replace(params, kind=KIND_NONE)  # the matmul reads finished weights
    row4 = params.kind in (KIND_GAUSSIAN, KIND_RCG) and k % 4 == 0
    for c0 in range(0, n_seeds, per):
        c1 = min(n_seeds, c0 + per)
        for r0 in range(0, n_out, rows):
            nr = min(rows, n_out - r0)
            tile = scratch[: c1 - c0, :nr]
            args = (
                weight2,
                weight2 if delta2 is None else delta2,
                weight2 if mask2 is None else mask2,
                streams[c0:c1],
                dev_std,
                tile,
                nr,
                k,
                r0,
                tile.stride(0),
            )
            consts = dict(
                **params.scalars(),
                **params.constexprs(),
                ROW4=row4,
                HAS_DELTA=delta2 is not None,
            )
            if autotuned(weight2.device):

                def grid(meta, nr=nr, cc=c1 - c0):
                    return (triton.cdiv(nr, meta["BLOCK_R"]), triton.cdiv(k, meta["BLOCK_K"]), cc)

                _perturbed_rows_tuned[grid](*args, **consts)
            else:
                br, bk = _block(nr, 16, 32), _block(k, 16, 64)
                grid = (triton.cdiv(nr, br), triton.cdiv(k, bk), c1 - c0)
                _perturbed_rows_kernel[grid](*args, **consts, BLOCK_R=br, BLOCK_K=bk)
            _mm(
                x3[c0:c1] if x_stacked else x3,
                tile,
                tile.stride(0),
                None if bias is None else bias[r0 : r0 + nr],
                None,
                None,
                streams[c0:c1],
                dev_std,
                out[c0:c1, :, r0 : r0 + nr],
                x_stacked,
                plain,
                1,
            )


def _mm(x3, w, stride_ws, bias, delta2, mask2, streams, dev_std, out, x_stacked, params, groups):
    """One launch of the matmul over the seeds of ``streams`` (out: (S, M, G*N), any strides)."""
    m = x3.shape[1]
    n_total, k = w.shape[-2], w.shape[-1]
    n = n_total // groups
    n_seeds = streams.numel()
    row4 = params.kind in (KIND_GAUSSIAN, KIND_RCG) and k % 4 == 0
    args = (
        x3,
        w,
        w if delta2 is None else delta2,  # dummies are never read (constexpr flags)
        w if bias is None else bias,
        w if mask2 is None else mask2,
        streams,
        dev_std,
        out,
        m,
        n,
        k,
        groups,
        triton.next_power_of_2(max(m, 1)),
        x3.stride(0) if x_stacked else 0,
        x3.stride(1),
        x3.stride(2),
        stride_ws,
        out.stride(0),
        out.stride(1),
        out.stride(2),
    )
    consts = dict(
        **params.scalars(),
        **params.constexprs(),
        ROW4=row4,
        HAS_DELTA=delta2 is not None,
        HAS_BIAS=bias is not None,
        IEEE=w.dtype == torch.float32,
    )
    if autotuned(w.device):

        def grid(meta):
            return (
                triton.cdiv(m, meta["BLOCK_M"]),
                triton.cdiv(n, meta["BLOCK_N"]),
                n_seeds * groups,
            )

        _perturbed_mm_tuned[grid](*args, **consts)
    else:
        # tl.dot needs tiles of at least 16; larger M tiles amortize the noise per tile.
        bm, bn, bk = _block(m, 16, 128), _block(n, 16, 64), _block(k, 16, 32)
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), n_seeds * groups)
        _perturbed_mm_kernel[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)


def kernel_dtype(weight: torch.Tensor) -> bool:
    """Whether the kernels take this weight dtype: float32 and float16 everywhere, bfloat16 on a
    GPU (the interpreter computes through numpy, which has no bfloat16)."""
    if weight.dtype in (torch.float32, torch.float16):
        return True
    return weight.dtype == torch.bfloat16 and weight.is_cuda and not _interpreted()


def perturbed_weight_fallback(weight, delta, noise: NoiseArgs, scale: float) -> torch.Tensor:
    """W + δ + ΔW_s materialized for every seed (float64 / bfloat16 path), shape (S, *W.shape)."""
    dw = _noise_into(weight, noise, scale, None)
    base = weight if delta is None else weight + delta
    return base.unsqueeze(0) + dw


def perturbed_linear(*args, **kwargs) -> torch.Tensor:
    """cimext::perturbed_linear (schema in csrc/cimext.cpp): the stack over seeds of
    linear(x_s, W + δ + ΔW(s), b), shape (S, ..., out). Checked first by
    cimext::_check_perturbed_linear, the checks of the C++ kernels."""
    scale = float(torch.ops.cimext._check_perturbed_linear(*args, **kwargs))
    a = named("perturbed_linear", args, kwargs)
    x, weight, bias, delta, x_stacked = (
        a[k] for k in ("x", "weight", "bias", "delta", "x_stacked")
    )
    noise = NoiseArgs.of(a)
    seeds = seed_list(noise.seeds)
    n_out, k = weight.shape
    params = make_noise_params(noise, scale)
    lead = x.shape[1:-1] if x_stacked else x.shape[:-1]

    if not kernel_dtype(weight) or k == 0:
        # float64 (gradcheck), interpreted bfloat16, no input features: materialize each weight
        # and call torch.
        ws = perturbed_weight_fallback(weight, delta, noise, scale)
        return torch.stack(
            [F.linear(x[i] if x_stacked else x, w, bias) for i, w in enumerate(ws)]
        ).reshape(len(seeds), *lead, n_out)

    x3 = x.reshape(len(seeds) if x_stacked else 1, math.prod(lead), k).contiguous()
    w2 = weight.contiguous()
    d2 = None if delta is None else delta.contiguous()
    b = None if bias is None else bias.contiguous()
    mask = prepare_verify_mask(noise.verify_mask, weight)  # read only by device noise
    streams = stream_tensor(stream_seeds(seeds, noise.layer_id), weight.device)
    out = launch_perturbed_mm(x3, w2, b, d2, mask, x_stacked, streams, params, groups=1)
    return out.reshape(len(seeds), *lead, n_out)
