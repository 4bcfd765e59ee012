"""cimext.ops.noise / rcg_noise: materialize ΔW of a weight for a device instance."""

from __future__ import annotations

import torch

from .. import reference as ref
from ..backend import resolve
from . import _spec
from ._registry import on_namespace, register_ref, schema_op


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


def check_out(out, weight: torch.Tensor, shape: tuple[int, ...]) -> None:
    """A clear error unless ``out`` can receive ΔW of ``weight`` with result shape ``shape``."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.device != weight.device:
        raise ValueError(f"out is on {out.device} but weight is on {weight.device}")
    if out.dtype != weight.dtype:
        raise TypeError(f"out dtype {out.dtype} must match weight dtype {weight.dtype}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("out requires grad: noise(out=...) does not support autograd")
    if torch._C._overlaps(out, weight):
        raise ValueError("out must not overlap weight")


def _noise(weight, spec, seed, seeds, layer_id, verify_mask, scale, out) -> torch.Tensor:
    _spec.check_tensor("weight", weight)
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    seed_t, stacked = _spec.seeds_arg(seed, seeds)
    layer_id = _spec.check_layer_id(layer_id)
    verify_mask = _spec.check_verify_mask(verify_mask, weight)
    s = _spec.check_scale(scale)
    w = weight.detach()
    args = (w, seed_t, layer_id, *spec.args(s, verify_mask))
    if out is None:
        res = schema_op("noise", resolve(w.device))(*args)
        return res if stacked else res[0]
    shape = (seed_t.shape[0], *w.shape) if stacked else tuple(w.shape)
    check_out(out, w, shape)
    schema_op("noise_out", resolve(w.device))(*args, out if stacked else out.unsqueeze(0))
    return out


def noise_ref(
    weight,
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
) -> torch.Tensor:
    """The reference implementation with the schema's positional arguments."""
    return torch.stack(
        [
            ref.noise(
                weight,
                s,
                layer_id,
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
            for s in _spec.seeds_as_uint(seeds)
        ]
    )


def noise_out_ref(weight, seeds, layer_id, *args) -> None:
    """The reference noise_out: the same checks as the kernels, then one copy into ``out``."""
    *noise_args, out = args
    check_out(out, weight, (len(seeds), *weight.shape))
    out.copy_(noise_ref(weight, seeds, layer_id, *noise_args))


def _noise_fake(weight, seeds, *args):
    return weight.new_empty((seeds.shape[0], *weight.shape))


def _noise_out_fake(weight, seeds, *args) -> None:
    return None


def _register(namespace: str) -> None:
    torch.library.register_fake(f"{namespace}::noise", _noise_fake)
    torch.library.register_fake(f"{namespace}::noise_out", _noise_out_fake)


register_ref("noise", noise_ref)
register_ref("noise_out", noise_out_ref)
on_namespace(_register)
