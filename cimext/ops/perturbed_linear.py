"""cimext.ops.perturbed_linear: y = linear(x, W + δ + ΔW(seed)) + b with ΔW built in the kernel."""

from __future__ import annotations

import torch

from .. import reference as ref
from ..backend import resolve
from . import _spec
from ._registry import call_differentiable, on_namespace, register_ref


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
    none of them means δ only. ``x_stacked``: x is (S, ..., in), one slice per seed.
    """
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
    args = (x, weight, bias, delta, *tail)
    out = call_differentiable(
        "perturbed_linear",
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
    return ref.perturbed_linear(
        x,
        weight,
        bias,
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


register_ref("perturbed_linear", _ref_impl)


def _fake(x, weight, bias, delta, x_stacked, seeds, *args):
    batch = x.shape[1:-1] if x_stacked else x.shape[:-1]
    return x.new_empty((seeds.shape[0], *batch, weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, delta, x_stacked, seeds, layer_id, *noise_args = inputs
    ctx.save_for_backward(x, weight, delta, noise_args[-1], seeds)
    ctx.has_bias = bias is not None
    ctx.meta = (x_stacked, layer_id, tuple(noise_args[:-1]))


def _make_backward(namespace: str):
    def backward(ctx, gy):
        x, weight, delta, mask, seeds = ctx.saved_tensors
        x_stacked, layer_id, noise_args = ctx.meta
        S, (out_f, in_f) = seeds.shape[0], weight.shape
        gy2 = gy.reshape(S, -1, out_f)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            # Regenerate ΔW from the seeds: nothing was stored in the forward.
            dw = getattr(torch.ops, namespace).noise(weight, seeds, layer_id, *noise_args, mask)
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
        return (gx, gw if ctx.needs_input_grad[1] else None, gb, gd) + (None,) * 13

    return backward


def _register(namespace: str) -> None:
    name = f"{namespace}::perturbed_linear"
    torch.library.register_fake(name, _fake)
    torch.library.register_autograd(name, _make_backward(namespace), setup_context=_setup_context)


on_namespace(_register)
