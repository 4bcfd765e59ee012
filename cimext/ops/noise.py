"""cimext.ops.noise / rcg_noise: materialize ΔW of a weight for a device instance."""

from __future__ import annotations

import dataclasses

import torch

from .. import reference as ref
from ..backend import resolve
from . import _spec
from ._registry import bind, check, check_in_fake, named, on_namespace, register_ref, schema_op
from ._spec import NoiseArgs


def noise(
    weight: torch.Tensor,
    device,
    seed: int = 0,
    layer_id: int = 0,
    *,
    verify_mask: torch.Tensor | None = None,
    scale: float | None = None,
    seeds=None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """ΔW of ``weight`` under DeviceModel ``device`` for ``seed`` (or (S, ...) for ``seeds``).

    ``scale`` is the full scale s_l (None: max|W|). ``out``: a tensor of the result's shape and
    weight's dtype and device to write into (reused buffers avoid fresh allocations of large
    ΔW); it is checked before anything is written and returned."""
    spec = _spec.make_spec(device=device)
    return _noise(weight, spec, seed, seeds, layer_id, verify_mask, scale, out)


def rcg_noise(
    weight: torch.Tensor,
    sigma: float,
    th: float,
    seed: int = 0,
    layer_id: int = 0,
    *,
    scale: float | None = None,
    seeds=None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Right-censored Gaussian ΔW = s·sigma·min(ε, th) (TRICE, eq. 11); ``out`` as in noise."""
    spec = _spec.make_spec(rcg=(sigma, th))
    return _noise(weight, spec, seed, seeds, layer_id, None, scale, out)


def gaussian_noise(
    weight: torch.Tensor,
    sigma: float,
    seed: int = 0,
    layer_id: int = 0,
    *,
    scale=None,
    seeds=None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain Gaussian ΔW = s·sigma·ε; ``out`` as in noise."""
    spec = _spec.make_spec(gaussian=sigma)
    return _noise(weight, spec, seed, seeds, layer_id, None, scale, out)


def _noise(weight, spec, seed, seeds, layer_id, verify_mask, scale, out) -> torch.Tensor:
    _spec.check_tensor("weight", weight)
    if verify_mask is not None:
        _spec.check_tensor("verify_mask", verify_mask)
    seed_t, stacked = _spec.seeds_arg(seed, seeds)
    noise = dataclasses.replace(
        spec,
        seeds=seed_t,
        layer_id=_spec.check_layer_id(layer_id),
        scale=_spec.check_scale(scale),
        verify_mask=verify_mask,
    )
    w = weight.detach()
    if out is None:
        res = schema_op("noise", resolve(w.device))(*bind("noise", weight=w, **noise.fields()))
        return res if stacked else res[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("out requires grad: noise(out=...) does not support autograd")
    if not stacked:
        if tuple(out.shape) != tuple(w.shape):
            raise ValueError(f"out must have shape {tuple(w.shape)}, got {tuple(out.shape)}")
        out_arg = out.unsqueeze(0)
    else:
        out_arg = out
    args = bind("noise_out", weight=w, out=out_arg, **noise.fields())
    schema_op("noise_out", resolve(w.device))(*args)
    return out


def noise_ref(*args, **kwargs) -> torch.Tensor:
    """The reference backend: the op's checks (cimext::_check_noise), then reference.noise."""
    scale = check("noise", args, kwargs)
    return _noise_ref(named("noise", args, kwargs), scale)


def _noise_ref(a: dict, scale) -> torch.Tensor:
    noise = NoiseArgs.of(a)
    if scale is not None:
        noise = dataclasses.replace(noise, scale=scale)
    kw = noise.ref_kwargs()
    seeds, layer_id = kw.pop("seeds"), kw.pop("layer_id")
    return torch.stack([ref.noise(a["weight"], s, layer_id, **kw) for s in seeds])


def noise_out_ref(*args, **kwargs) -> None:
    """The reference noise_out: the op's checks (cimext::_check_noise_out), then one copy."""
    scale = check("noise_out", args, kwargs)
    a = named("noise_out", args, kwargs)
    out = a["out"]
    out.copy_(_noise_ref(a, scale))


def _noise_fake(*args, **kwargs):
    check_in_fake("noise", args, kwargs)
    a = named("noise", args, kwargs)
    return a["weight"].new_empty((a["seeds"].shape[0], *a["weight"].shape))


def _noise_out_fake(*args, **kwargs) -> None:
    check_in_fake("noise_out", args, kwargs)


def _register(namespace: str) -> None:
    torch.library.register_fake(f"{namespace}::noise", _noise_fake)
    torch.library.register_fake(f"{namespace}::noise_out", _noise_out_fake)


register_ref("noise", noise_ref)
register_ref("noise_out", noise_out_ref)
on_namespace(_register)
