"""cimext.ops.perturbed_conv2d: conv2d(x, W + δ + ΔW(seed)) + b, ΔW regenerated from the seed."""

from __future__ import annotations

import dataclasses

import torch
from torch.nn.modules.utils import _pair

from .. import reference as ref
from ..backend import resolve
from . import _spec
from ._registry import (
    bind,
    call_differentiable,
    check,
    check_in_fake,
    input_grads,
    named,
    on_namespace,
    register_ref,
)
from ._spec import NoiseArgs


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
    stacked, noise = _spec.prepare_call(
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
    args = bind(
        "perturbed_conv2d",
        x=x,
        weight=weight,
        bias=bias,
        delta=delta,
        stride=list(_pair(stride)),
        padding=list(_pair(padding)),
        dilation=list(_pair(dilation)),
        groups=groups,
        x_stacked=x_stacked,
        **noise.fields(),
    )
    out = call_differentiable(
        "perturbed_conv2d",
        resolve(x.device),
        args,
        (x, weight, bias, delta),
        _setup_context,
        _make_backward,
    )
    return out if stacked else out[0]


def _ref_impl(*args, **kwargs):
    """The reference backend: the op's checks (cimext::_check_perturbed_conv2d), then
    cimext.reference.perturbed_conv2d."""
    scale = check("perturbed_conv2d", args, kwargs)
    a = named("perturbed_conv2d", args, kwargs)
    noise = NoiseArgs.of(a)
    if scale is not None:
        noise = dataclasses.replace(noise, scale=scale)
    return ref.perturbed_conv2d(
        a["x"],
        a["weight"],
        a["bias"],
        a["stride"],
        a["padding"],
        a["dilation"],
        a["groups"],
        delta=a["delta"],
        x_stacked=a["x_stacked"],
        **noise.ref_kwargs(),
    )


register_ref("perturbed_conv2d", _ref_impl)


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _fake(*args, **kwargs):
    check_in_fake("perturbed_conv2d", args, kwargs)
    a = named("perturbed_conv2d", args, kwargs)
    x, weight, stride, padding, dilation = (
        a[k] for k in ("x", "weight", "stride", "padding", "dilation")
    )
    xs = x.shape[1:] if a["x_stacked"] else x.shape
    h = _out_size(xs[2], weight.shape[2], stride[0], padding[0], dilation[0])
    w = _out_size(xs[3], weight.shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty((a["seeds"].shape[0], xs[0], weight.shape[0], h, w))


def _setup_context(ctx, inputs, output):
    a = named("perturbed_conv2d", inputs)
    noise = NoiseArgs.of(a)
    # Tensors go through save_for_backward; the rest of the noise arguments ride on ctx.
    ctx.save_for_backward(a["x"], a["weight"], a["delta"], noise.verify_mask, noise.seeds)
    ctx.has_bias = a["bias"] is not None
    ctx.conv = (a["stride"], a["padding"], a["dilation"], a["groups"])
    ctx.x_stacked = a["x_stacked"]
    ctx.noise = dataclasses.replace(noise, seeds=None, verify_mask=None)


def _make_backward(namespace: str):
    def backward(ctx, gy):
        x, weight, delta, mask, seeds = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        x_stacked = ctx.x_stacked
        noise = dataclasses.replace(ctx.noise, seeds=seeds, verify_mask=mask)
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
                dw = getattr(torch.ops, namespace).noise(
                    *bind("noise", weight=weight, **noise.fields())
                )
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
        return input_grads(
            "perturbed_conv2d",
            x=gx,
            weight=gw if ctx.needs_input_grad[1] else None,
            bias=gb,
            delta=gd,
        )

    return backward


def _register(namespace: str) -> None:
    name = f"{namespace}::perturbed_conv2d"
    torch.library.register_fake(name, _fake)
    torch.library.register_autograd(name, _make_backward(namespace), setup_context=_setup_context)


on_namespace(_register)
