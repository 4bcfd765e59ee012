"""cimext.ops.perturbed_conv2d: conv2d(x, W + δ + ΔW(seed)) + b, ΔW regenerated from the seed."""

from __future__ import annotations

import torch
from torch.nn.modules.utils import _pair

from .. import reference as ref
from ..backend import resolve
from . import _spec
from ._registry import call_differentiable, on_namespace, register_ref


def perturbed_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    device=None,
    seed: int = 0,
    seeds=None,
    layer_id: int = 0,
    delta: torch.Tensor | None = None,
    rcg=None,
    gaussian=None,
    verify_mask: torch.Tensor | None = None,
    scale: float | None = None,
    x_stacked: bool = False,
) -> torch.Tensor:
    """conv2d(x, W + δ + ΔW, b, ...) for one device instance, or (S, N, C, H, W) for ``seeds``.

    Keywords as in perturbed_linear; ``padding`` is an int or a pair (no string modes).
    """
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int or a pair, got {padding!r}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    stacked, tail = _spec.prepare_call(
        x,
        weight,
        bias,
        delta,
        device=device,
        rcg=rcg,
        gaussian=gaussian,
        seed=seed,
        seeds=seeds,
        x_stacked=x_stacked,
        layer_id=layer_id,
        verify_mask=verify_mask,
        scale=scale,
    )
    geometry = (list(_pair(stride)), list(_pair(padding)), list(_pair(dilation)), groups)
    args = (x, weight, bias, delta, *geometry, *tail)
    out = call_differentiable(
        "perturbed_conv2d",
        resolve(x.device),
        args,
        (x, weight, bias, delta),
        _setup_context,
        _make_backward,
    )
    return out if stacked else out[0]


def _ref_impl(
    x,
    weight,
    bias,
    delta,
    stride,
    padding,
    dilation,
    groups,
    x_stacked,
    seeds,
    layer_id,
    mode,
    scale,
    weight_bits,
    bits_per_device,
    sigma,
    level_sigma,
    verified_sigma,
    th,
    verify,
    verify_mask,
):
    return ref.perturbed_conv2d(
        x,
        weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        seeds=_spec.seeds_as_uint(seeds),
        layer_id=layer_id,
        delta=delta,
        x_stacked=x_stacked,
        mode=mode,
        scale=scale,
        weight_bits=weight_bits,
        bits_per_device=bits_per_device,
        sigma=sigma,
        level_sigma=tuple(level_sigma),
        verified_sigma=verified_sigma,
        th=th,
        verify=verify,
        verify_mask=verify_mask,
    )


register_ref("perturbed_conv2d", _ref_impl)


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _fake(x, weight, bias, delta, stride, padding, dilation, groups, x_stacked, seeds, *args):
    xs = x.shape[1:] if x_stacked else x.shape
    h = _out_size(xs[2], weight.shape[2], stride[0], padding[0], dilation[0])
    w = _out_size(xs[3], weight.shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty((seeds.shape[0], xs[0], weight.shape[0], h, w))


def _setup_context(ctx, inputs, output):
    x, weight, bias, delta, stride, padding, dilation, groups, x_stacked, seeds, layer_id = inputs[
        :11
    ]
    noise_args = inputs[11:]
    ctx.save_for_backward(x, weight, delta, noise_args[-1], seeds)
    ctx.has_bias = bias is not None
    ctx.meta = (stride, padding, dilation, groups, x_stacked, layer_id, tuple(noise_args[:-1]))


def _make_backward(namespace: str):
    def backward(ctx, gy):
        x, weight, delta, mask, seeds = ctx.saved_tensors
        stride, padding, dilation, groups, x_stacked, layer_id, noise_args = ctx.meta
        conv_args = (stride, padding, dilation, False, [0, 0], groups)
        S = seeds.shape[0]
        need_x = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        # With one instance or a stacked input, each instance's call computes its input and
        # weight gradients together; a shared input needs the weight gradient only once, for
        # the sum of the output gradients (it is linear in them).
        w_per_instance = need_w and (x_stacked or S == 1)
        gx_parts, gw = [], None
        if need_x or w_per_instance:
            if need_x:
                # Regenerate ΔW from the seeds: nothing was stored in the forward.
                dw = getattr(torch.ops, namespace).noise(weight, seeds, layer_id, *noise_args, mask)
                base = weight if delta is None else weight + delta
            for s in range(S):
                w_eff = base + dw[s] if need_x else weight
                g_in, g_w, _ = torch.ops.aten.convolution_backward(
                    gy[s],
                    x[s] if x_stacked else x,
                    w_eff,
                    None,
                    *conv_args,
                    [need_x, w_per_instance, False],
                )
                if need_x:
                    gx_parts.append(g_in)
                if w_per_instance:
                    gw = g_w if gw is None else gw + g_w
        if need_w and not w_per_instance:
            gw = torch.ops.aten.convolution_backward(
                gy.sum(0), x, weight, None, *conv_args, [False, True, False]
            )[1]
        gx = None
        if need_x:
            if x_stacked:
                gx = torch.stack(gx_parts)
            else:
                gx = gx_parts[0]
                for g in gx_parts[1:]:
                    gx = gx + g
        gb = gy.sum((0, 1, 3, 4)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        gd = gw if (delta is not None and ctx.needs_input_grad[3]) else None
        return (gx, gw if ctx.needs_input_grad[1] else None, gb, gd) + (None,) * 17

    return backward


def _register(namespace: str) -> None:
    name = f"{namespace}::perturbed_conv2d"
    torch.library.register_fake(name, _fake)
    torch.library.register_autograd(name, _make_backward(namespace), setup_context=_setup_context)


on_namespace(_register)
