"""Triton path of ``cimext::perturbed_conv2d``: im2col (F.unfold) + the perturbed matmul kernel.

W[o, c, a, b] (shape (C_out, C_g, kh, kw)) has flat row-major index o*(C_g*kh*kw) + (c*kh + a)*kw
+ b, its index in the flattened (C_out, C_g*kh*kw) matrix; unfold orders a group's columns the
same way, so the matmul kernel's noise indices are those of the full weight. All groups and seeds
run in one launch (grid axis 2 = seed * groups + group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cimext.ops._registry import named
from cimext.ops._spec import NoiseArgs

from .noise import make_noise_params, prepare_verify_mask, seed_list, stream_seeds
from .perturbed_linear import kernel_dtype, launch_perturbed_mm, perturbed_weight_fallback
from .philox import stream_tensor


def perturbed_conv2d(*args, **kwargs) -> torch.Tensor:
    """cimext::perturbed_conv2d (schema in csrc/cimext.cpp): the stack over seeds of
    conv2d(x_s, W + δ + ΔW(s), b, ...), shape (S, N, C_out, H, W). Checked first by
    cimext::_check_perturbed_conv2d, the checks of the C++ kernels."""
    scale = float(torch.ops.cimext._check_perturbed_conv2d(*args, **kwargs))
    a = named("perturbed_conv2d", args, kwargs)
    x, weight, bias, delta, x_stacked = (
        a[k] for k in ("x", "weight", "bias", "delta", "x_stacked")
    )
    stride, padding, dilation = (tuple(a[k]) for k in ("stride", "padding", "dilation"))
    groups = a["groups"]
    noise = NoiseArgs.of(a)
    seeds = seed_list(noise.seeds)
    n_seeds = len(seeds)
    c_out, c_in_g, kh, kw = weight.shape
    params = make_noise_params(noise, scale)

    if not kernel_dtype(weight):
        # float64 (gradcheck), interpreted bfloat16: materialize each weight and call torch.
        ws = perturbed_weight_fallback(weight, delta, noise, scale)
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
    nb = batch // n_seeds if x_stacked else batch
    # (B, C*kh*kw, L) -> rows (b, l), columns (c, kh, kw): group g owns columns g*K .. g*K+K-1.
    cols = F.unfold(xs, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    k = c_in_g * kh * kw
    x3 = cols.transpose(1, 2).reshape(n_seeds if x_stacked else 1, -1, groups * k).contiguous()
    w2 = weight.reshape(c_out, k).contiguous()
    d2 = None if delta is None else delta.reshape(c_out, k).contiguous()
    b = None if bias is None else bias.contiguous()
    mask = prepare_verify_mask(noise.verify_mask, weight)  # read only by device noise
    streams = stream_tensor(stream_seeds(seeds, noise.layer_id), weight.device)
    out = launch_perturbed_mm(x3, w2, b, d2, mask, x_stacked, streams, params, groups=groups)
    # (S, N*L, C_out) -> (S, N, C_out, H_out, W_out)
    out = out.reshape(n_seeds, nb, h_out * w_out, c_out).permute(0, 1, 3, 2)
    return out.reshape(n_seeds, nb, c_out, h_out, w_out).contiguous()
