"""Triton kernel of ``cimext::perturbed_linear``: y[s] = x_s @ (W + δ + ΔW_s)^T + b.

ΔW_s is regenerated tile by tile from the seed inside the matmul and never stored. The same kernel
serves ``perturbed_conv2d`` (im2col) through its group axis: for group g it multiplies columns
g*K .. g*K+K-1 of x with weight rows g*N .. g*N+N-1, whose flat indices (and so whose noise) are
those of the full weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .noise import (
    KIND_GAUSSIAN,
    KIND_RCG,
    check_weight,
    make_noise_params,
    noise,
    noise_tile,
    noise_tile_rows,
    prepare_verify_mask,
    resolve_scale,
    seed_list,
    stream_seeds,
)
from .philox import stream_tensor

MAX_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2


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
    stride_xs,
    stride_xm,
    stride_xk,
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
        w = tl.load(w_ptr + idx, mask=w_in, other=0)
        wp = w
        if HAS_DELTA:
            wp = wp + tl.load(delta_ptr + idx, mask=w_in, other=0)
        if KIND != 0:
            if ROW4:
                nz = noise_tile_rows(stream, first, BLOCK_N, BLOCK_K, std_or_coef, th, KIND)
            else:
                if VERIFY == 2:
                    verified = tl.load(mask_ptr + idx, mask=w_in, other=0)
                else:
                    verified = tl.zeros((BLOCK_N, BLOCK_K), tl.uint8)
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
            # Same rounding as the reference: (W + δ) + ΔW.to(W.dtype), in W's dtype.
            wp = wp + nz.to(wp.dtype)
            # Padding lanes carry noise; zero them so they add nothing to the dot.
            wp = tl.where(w_in, wp, tl.zeros_like(wp))
        # IEEE fp32 products (no TF32) so that results match torch's fp32 matmul to ~1e-6.
        acc = tl.dot(x, tl.trans(wp), acc, input_precision="ieee")

    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rows, mask=n_in, other=0).to(tl.float32)[None, :]
    out_ptrs = (
        out_ptr + s.to(tl.int64) * stride_os + rm[:, None] * stride_om + rows[None, :] * stride_on
    )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


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
) -> torch.Tensor:
    """Run the kernel: x3 (S or 1, M, G*K), weight2 (G*N, K) -> (S, M, G*N), all contiguous."""
    n_seeds = streams.numel()
    m = x3.shape[1]
    n_total, k = weight2.shape
    n = n_total // groups
    out = torch.empty((n_seeds, m, n_total), dtype=weight2.dtype, device=weight2.device)
    if out.numel() == 0:
        return out
    # tl.dot needs tiles of at least 16; larger M tiles amortize the noise regenerated per tile.
    block_m = _block(m, 16, 128)
    block_n = _block(n, 16, 64)
    block_k = _block(k, 16, 32)
    # Gaussian / rcg tiles whose rows start on a multiple of 4 draw one randn4x per 4 weights.
    row4 = params.kind in (KIND_GAUSSIAN, KIND_RCG) and k % 4 == 0
    dev_std = params.dev_std_tensor(weight2.device)
    # Grid axis 2 (seed * groups + group) is limited to 65535 on CUDA: launch seeds in chunks.
    chunk = max(1, MAX_GRID_YZ // groups)
    for c0 in range(0, n_seeds, chunk):
        c1 = min(n_seeds, c0 + chunk)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), (c1 - c0) * groups)
        _launch_chunk(
            grid,
            x3[c0:c1] if x_stacked else x3,
            weight2,
            bias,
            delta2,
            mask2,
            streams[c0:c1],
            dev_std,
            out[c0:c1],
            x_stacked,
            params,
            groups,
            row4,
            (block_m, block_n, block_k),
        )
    return out


def _launch_chunk(
    grid,
    x3,
    weight2,
    bias,
    delta2,
    mask2,
    streams,
    dev_std,
    out,
    x_stacked,
    params,
    groups,
    row4,
    blocks,
):
    m = x3.shape[1]
    n_total, k = weight2.shape
    block_m, block_n, block_k = blocks
    _perturbed_mm_kernel[grid](
        x3,
        weight2,
        weight2 if delta2 is None else delta2,  # dummies are never read (constexpr flags)
        weight2 if bias is None else bias,
        weight2 if mask2 is None else mask2,
        streams,
        dev_std,
        out,
        m,
        n_total // groups,
        k,
        groups,
        x3.stride(0) if x_stacked else 0,
        x3.stride(1),
        x3.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        **params.scalars(),
        **params.constexprs(),
        ROW4=row4,
        HAS_DELTA=delta2 is not None,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )


def check_operands(x, weight, bias, delta, x_stacked, n_seeds, verify_mask) -> None:
    """Clear errors for dtype / device / shape mismatches, naming the argument."""
    check_weight(weight)
    for name, t in (("x", x), ("bias", bias), ("delta", delta), ("verify_mask", verify_mask)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if name != "verify_mask" and t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}")
        if name != "verify_mask" and t.dtype != weight.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but weight has {weight.dtype}")
    if delta is not None and delta.shape != weight.shape:
        raise ValueError(
            f"delta must have the weight's shape {tuple(weight.shape)}, got {tuple(delta.shape)}"
        )
    if x_stacked and (x.dim() < 1 or x.shape[0] != n_seeds):
        raise ValueError(
            f"x_stacked: x must have a leading dimension of S = {n_seeds}, "
            f"got shape {tuple(x.shape)}"
        )


def perturbed_weight_fallback(weight, delta, seeds, layer_id, noise_args, verify_mask):
    """W + δ + ΔW_s materialized for every seed (float64 / bfloat16 path), shape (S, *W.shape)."""
    dw = noise(weight, seeds, layer_id, *noise_args, verify_mask)
    base = weight if delta is None else weight + delta
    return base.unsqueeze(0) + dw


def perturbed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor | None,
    x_stacked: bool,
    seeds: torch.Tensor,
    layer_id: int,
    mode: int,
    scale: float | None,
    weight_bits: int,
    bits_per_device: int,
    sigma: float,
    level_sigma: Sequence[float],
    verified_sigma: float,
    th: float,
    verify: bool,
    verify_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Stack over seeds of linear(x_s, W + δ + ΔW(s), b): shape (S, ..., out) (cimext schema)."""
    seed_tensor, seeds = seeds, seed_list(seeds)
    check_operands(x, weight, bias, delta, x_stacked, len(seeds), verify_mask)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    n_out, k = weight.shape
    if x.dim() < (2 if x_stacked else 1) or x.shape[-1] != k:
        raise ValueError(f"x must end in in_features = {k}, got shape {tuple(x.shape)}")
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"bias must have shape ({n_out},), got {tuple(bias.shape)}")
    noise_args = (
        mode,
        resolve_scale(weight, scale),
        weight_bits,
        bits_per_device,
        sigma,
        level_sigma,
        verified_sigma,
        th,
        verify,
    )
    params = make_noise_params(*noise_args, verify_mask is not None)
    lead = x.shape[1:-1] if x_stacked else x.shape[:-1]

    if weight.dtype not in (torch.float32, torch.float16):
        # float64 (gradcheck) and bfloat16: materialize each perturbed weight and call torch.
        ws = perturbed_weight_fallback(
            weight, delta, seed_tensor, layer_id, noise_args, verify_mask
        )
        return torch.stack(
            [F.linear(x[i] if x_stacked else x, w, bias) for i, w in enumerate(ws)]
        ).reshape(len(seeds), *lead, n_out)

    x3 = x.reshape(len(seeds) if x_stacked else 1, math.prod(lead), k).contiguous()
    w2 = weight.contiguous()
    d2 = None if delta is None else delta.contiguous()
    b = None if bias is None else bias.contiguous()
    mask = prepare_verify_mask(verify_mask, weight)  # read only by device noise
    streams = stream_tensor(stream_seeds(seeds, layer_id), weight.device)
    out = launch_perturbed_mm(x3, w2, b, d2, mask, x_stacked, streams, params, groups=1)
    return out.reshape(len(seeds), *lead, n_out)
