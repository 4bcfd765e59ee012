"""cimext.ops.perturbed_linear: y = linear(x, W + δ + ΔW(seed)) + b with ΔW built in the kernel."""

from __future__ import annotations

import dataclasses

import torch

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


def perturbed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
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
    """linear(x, W + δ + ΔW) + b for one device instance, or (S, ..., out) for ``seeds``.

    ``device`` (DeviceModel), ``rcg`` ((sigma_t, th)) or ``gaussian`` (sigma) picks the noise;
    none of them means δ only. ``seed`` is an int in [0, 2**64) or a one-element integer tensor,
    ``seeds`` a sequence of such ints or an int64 tensor of seed bit patterns (tensors pass
    into a compiled graph as data: no recompilation per seed). ``scale`` is the full scale s_l
    (None: max|W|, computed inside the op). ``x_stacked``: x is (S, ..., in), one slice per seed.
    """
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
        "perturbed_linear",
        x=x,
        weight=weight,
        bias=bias,
        delta=delta,
        x_stacked=x_stacked,
        **noise.fields(),
    )
    out = call_differentiable(
        "perturbed_linear",
        resolve(x.device),
        args,
        (x, weight, bias, delta),
        _setup_context,
        _make_backward,
    )
    return out if stacked else out[0]


def _ref_impl(*args, **kwargs):
    """The reference backend: the op's checks (cimext::_check_perturbed_linear), then
    cimext.reference.perturbed_linear."""
    scale = check("perturbed_linear", args, kwargs)
    a = named("perturbed_linear", args, kwargs)
    noise = NoiseArgs.of(a)
    if scale is not None:
        noise = dataclasses.replace(noise, scale=scale)
    return ref.perturbed_linear(
        a["x"],
        a["weight"],
        a["bias"],
        delta=a["delta"],
        x_stacked=a["x_stacked"],
        **noise.ref_kwargs(),
    )


register_ref("perturbed_linear", _ref_impl)


def _fake(*args, **kwargs):
    check_in_fake("perturbed_linear", args, kwargs)
    a = named("perturbed_linear", args, kwargs)
    x, weight = a["x"], a["weight"]
    batch = x.shape[1:-1] if a["x_stacked"] else x.shape[:-1]
    return x.new_empty((a["seeds"].shape[0], *batch, weight.shape[0]))


def _setup_context(ctx, inputs, output):
    a = named("perturbed_linear", inputs)
    noise = NoiseArgs.of(a)
    # Tensors go through save_for_backward; the rest of the noise arguments ride on ctx.
    ctx.save_for_backward(a["x"], a["weight"], a["delta"], noise.verify_mask, noise.seeds)
    ctx.has_bias = a["bias"] is not None
    ctx.x_stacked = a["x_stacked"]
    ctx.noise = dataclasses.replace(noise, seeds=None, verify_mask=None)


def _make_backward(namespace: str):
    def backward(ctx, gy):
        x, weight, delta, mask, seeds = ctx.saved_tensors
        x_stacked = ctx.x_stacked
        noise = dataclasses.replace(ctx.noise, seeds=seeds, verify_mask=mask)
        S, (out_f, in_f) = seeds.shape[0], weight.shape
        gy2 = gy.reshape(S, -1, out_f)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            # Regenerate ΔW from the seeds: nothing was stored in the forward.
            dw = getattr(torch.ops, namespace).noise(
                *bind("noise", weight=weight, **noise.fields())
            )
            base = weight if delta is None else weight + delta
            if S == 1:
                gx = (gy2[0] @ (base + dw[0])).reshape(x.shape)
            else:
                gx = torch.bmm(gy2, base.unsqueeze(0) + dw)
                gx = gx.reshape(x.shape) if x_stacked else gx.sum(0).reshape(x.shape)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            if x_stacked and S > 1:
                gw = torch.bmm(gy2.transpose(1, 2), x.reshape(S, -1, in_f)).sum(0)
            else:
                # A shared input: the weight gradient is linear in the output gradients.
                g = gy2[0] if S == 1 else gy2.sum(0)
                gw = g.t() @ x.reshape(-1, in_f)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum((0, 1))
        gd = gw if (delta is not None and ctx.needs_input_grad[3]) else None
        return input_grads(
            "perturbed_linear",
            x=gx,
            weight=gw if ctx.needs_input_grad[1] else None,
            bias=gb,
            delta=gd,
        )

    return backward


def _register(namespace: str) -> None:
    name = f"{namespace}::perturbed_linear"
    torch.library.register_fake(name, _fake)
    torch.library.register_autograd(name, _make_backward(namespace), setup_context=_setup_context)


on_namespace(_register)
