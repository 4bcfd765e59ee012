"""Triton path of ``cimext::perturbed_conv2d``: im2col (F.unfold) + the perturbed matmul kernel.

W[o, c, a, b] (shape (C_out, C_g, kh, kw)) has flat row-major index o*(C_g*kh*kw) + (c*kh + a)*kw
+ b, its index in the flattened (C_out, C_g*kh*kw) matrix; unfold orders a group's columns the
same way, so the matmul kernel's noise indices are those of the full weight. All groups and seeds
run in one launch (grid axis 2 = seed * groups + group).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .noise import (
    make_noise_params,
    prepare_verify_mask,
    resolve_scale,
    seed_list,
    stream_seeds,
)
from .perturbed_linear import (
    check_operands,
    kernel_dtype,
    launch_perturbed_mm,
    perturbed_weight_fallback,
)
from .philox import stream_tensor


def _pair(v, name: str) -> tuple[int, int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v, v]
    if len(v) != 2:
        raise ValueError(f"{name} must have 2 entries, got {v}")
    return int(v[0]), int(v[1])


def perturbed_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
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
    """Stack over seeds of conv2d(x_s, W + δ + ΔW(s), b, ...): shape (S, N, C_out, H, W)."""
    seed_tensor, seeds = seeds, seed_list(seeds)
    n_seeds = len(seeds)
    check_operands(x, weight, bias, delta, x_stacked, n_seeds, verify_mask)
    stride, padding, dilation = (
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
    )
    if weight.dim() != 4:
        raise ValueError(
            f"weight must be 4-D (C_out, C_in/groups, kh, kw), got {tuple(weight.shape)}"
        )
    c_out, c_in_g, kh, kw = weight.shape
    if groups < 1 or c_out % groups:
        raise ValueError(f"groups ({groups}) must be >= 1 and divide C_out ({c_out})")
    x4_dim = 5 if x_stacked else 4
    if x.dim() != x4_dim or x.shape[-3] != c_in_g * groups:
        raise ValueError(
            f"x must be {'(S, N, C, H, W)' if x_stacked else '(N, C, H, W)'} with "
            f"C = {c_in_g * groups}, got shape {tuple(x.shape)}"
        )
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"bias must have shape ({c_out},), got {tuple(bias.shape)}")
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

    if not kernel_dtype(weight):
        # float64 (gradcheck), interpreted bfloat16: materialize each weight and call torch.
        ws = perturbed_weight_fallback(
            weight, delta, seed_tensor, layer_id, noise_args, verify_mask
        )
        return torch.stack(
            [
                F.conv2d(x[i] if x_stacked else x, w, bias, stride, padding, dilation, groups)
                for i, w in enumerate(ws)
            ]
        )

    xs = x.reshape(-1, *x.shape[-3:])  # (S*N or N, C, H, W)
    batch, _, height, width = xs.shape
    h_out = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if h_out <= 0 or w_out <= 0:
        raise ValueError(
            f"conv2d output would be empty ({h_out}x{w_out}) for input "
            f"{height}x{width}, kernel {kh}x{kw}"
        )
    nb = batch // n_seeds if x_stacked else batch
    # (B, C*kh*kw, L) -> rows (b, l), columns (c, kh, kw): group g owns columns g*K .. g*K+K-1.
    cols = F.unfold(xs, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    k = c_in_g * kh * kw
    x3 = cols.transpose(1, 2).reshape(n_seeds if x_stacked else 1, -1, groups * k).contiguous()
    w2 = weight.reshape(c_out, k).contiguous()
    d2 = None if delta is None else delta.reshape(c_out, k).contiguous()
    b = None if bias is None else bias.contiguous()
    mask = prepare_verify_mask(verify_mask, weight)  # read only by device noise
    streams = stream_tensor(stream_seeds(seeds, layer_id), weight.device)
    out = launch_perturbed_mm(x3, w2, b, d2, mask, x_stacked, streams, params, groups=groups)
    # (S, N*L, C_out) -> (S, N, C_out, H_out, W_out)
    out = out.reshape(n_seeds, nb, h_out * w_out, c_out).permute(0, 1, 3, 2)
    return out.reshape(n_seeds, nb, c_out, h_out, w_out).contiguous()
