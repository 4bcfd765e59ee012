"""Context managers that set the noise mode and δ of every CiM layer of a model.

Each saves the layers' previous mode and δ on entry and restores them on exit (also when the body
raises), so contexts nest: ``with perturbation(m, d): with instance(m, 7): ...`` runs device
instance 7 on W + δ. The modes (DESIGN section 6):

- clean: plain F.linear / F.conv2d on the (quantized) weight (+ δ).
- instance(seed): one fixed device instance, deterministic in the seed.
- instances(seeds=[...]): S instances at once on a folded batch: the first CiM layer of a
  forward takes (B, ...) and returns (S*B, ...); later ones take and return (S*B, ...). Non-CiM
  layers work unchanged on the folded batch; :func:`cimext.nn.unfold` gives (S, B, ...).
- sampling(noise=...): fresh noise every forward (training); one seed per forward of the model,
  shared by its layers (layer_id separates their streams), gradients with the noise held fixed.

Both instance modes, on the CPU with no gradient to compute, build each layer's W + δ + ΔW once
per context and reuse it for every batch (see :func:`instance`). Every mode works under
``torch.compile(model, fullgraph=True)``: seeds reach the ops as tensors (a new seed does not
recompile), and a compiled sampling forward takes its seed from tensor state rather than a
generator call (see :class:`cimext.nn.ForwardState`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..device import DeviceModel
from ..ops import _spec
from ._state import ForwardState, Mode
from .convert import require_cim_layers

_KEEP = object()  # "leave the mode as it is" (perturbation only changes δ)


def _layers(model: nn.Module, what: str) -> list[tuple[str, nn.Module]]:
    return require_cim_layers(model, f"cimext.{what}")


@contextlib.contextmanager
def _override(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    *,
    mode=_KEEP,
    deltas: Mapping[str, torch.Tensor | None] | None = None,
    state: ForwardState | None = None,
    result=None,
) -> Iterator:
    saved = [(layer, layer._cim_mode, layer.delta) for _, layer in layers]
    handle = None
    try:
        if state is not None:
            # A new forward of the model starts a new folded batch / sampling seed.
            handle = model.register_forward_pre_hook(lambda _m, _args: state.begin())
        for name, layer in layers:
            if mode is not _KEEP:
                object.__setattr__(layer, "_cim_mode", mode)
            if deltas is not None and name in deltas:
                layer.delta = deltas[name]
        yield model if result is None else result
    finally:
        if handle is not None:
            handle.remove()
        if state is not None:
            state.finish()
        for layer, old_mode, old_delta in saved:
            object.__setattr__(layer, "_cim_mode", old_mode)
            layer.__dict__["_delta"] = old_delta


def clean(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """No device noise in any CiM layer of ``model`` (δ and quantization still apply)."""
    return _override(model, _layers(model, "clean"), mode=None)


def instance(
    model: nn.Module,
    seed: int | None = None,
    *,
    seeds=None,
    reuse_weights: bool = True,
    _buffers: dict | None = None,
) -> contextlib.AbstractContextManager[nn.Module]:
    """One fixed device instance ``seed``, or S instances ``seeds=[...]`` on a folded batch.

    Every layer draws ΔW from its own DeviceModel (``layer.device``), the seed and its layer_id.
    With ``seeds`` the model maps (B, ...) to (S*B, ...); see :func:`cimext.nn.unfold`.

    When no gradient is needed (torch.no_grad, or nothing requires grad) on the CPU, each layer
    builds its W + δ + ΔW once in the context and reuses it for every batch (the noise is not
    regenerated per batch; memory: one copy of the weights per seed, freed on exit).
    ``reuse_weights=False`` always calls the fused ops instead; the results are the same.
    """
    layers = _layers(model, "instance")
    if (seed is None) == (seeds is None):
        raise TypeError("cimext.instance: give exactly one of seed= or seeds=[...]")
    if not isinstance(reuse_weights, bool):
        raise TypeError(f"reuse_weights must be a bool, got {reuse_weights!r}")
    cache = reuse_weights
    state = ForwardState(buffers=_buffers)
    if seeds is None:
        seed_t = torch.tensor([_spec.check_seed(seed)], dtype=torch.int64)
        mode = Mode("instance", state, seeds=seed_t, cache=cache)
        return _override(model, layers, mode=mode)
    seed_t, _ = _spec.seeds_arg(0, seeds)
    mode = Mode("instances", state, seeds=seed_t, cache=cache)
    return _override(model, layers, mode=mode, state=state)


_SAMPLING_PARAMS = {
    "device": ("device",),
    "rcg": ("sigma", "th"),
    "gaussian": ("sigma",),
}


def sampling(
    model: nn.Module,
    noise: str = "device",
    *,
    generator: torch.Generator | None = None,
    **params,
) -> contextlib.AbstractContextManager[ForwardState]:
    """Fresh noise on every forward of ``model`` (noise-injection training).

    noise="device" uses each layer's DeviceModel (or ``device=DeviceModel(...)`` for all);
    "rcg" needs ``sigma`` and ``th`` (TRICE right-censored Gaussian s·sigma·min(ε, th));
    "gaussian" needs ``sigma`` (s·sigma·ε); s is the layer's full scale. Each forward draws one
    64-bit seed from ``generator`` (torch's default generator if None, so torch.manual_seed
    reproduces a run), shared by all layers. Yields the state whose ``.seed`` is the seed of the
    latest forward.
    """
    layers = _layers(model, "sampling")
    if noise not in _SAMPLING_PARAMS:
        raise ValueError(f"noise must be one of {sorted(_SAMPLING_PARAMS)}, got {noise!r}")
    allowed = _SAMPLING_PARAMS[noise]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise TypeError(
            f"sampling(noise={noise!r}) got unexpected parameter(s) {unknown}; "
            f"it takes {list(allowed)}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    state = ForwardState(generator, sampling=True)
    if noise == "device":
        device = params.get("device")
        if device is not None and not isinstance(device, DeviceModel):
            raise TypeError(f"device must be a cimext.DeviceModel, got {type(device).__name__}")
        mode = Mode("sampling", state, device=device)
    else:
        missing = [p for p in allowed if p not in params]
        if missing:
            raise TypeError(f"sampling(noise={noise!r}) needs {missing}")
        if noise == "rcg":
            spec = _spec.make_spec(rcg=(params["sigma"], params["th"]))  # validates both
            mode = Mode("sampling", state, rcg=(spec.sigma, spec.th))
        else:
            spec = _spec.make_spec(gaussian=params["sigma"])
            mode = Mode("sampling", state, gaussian=spec.sigma)
    return _override(model, layers, mode=mode, state=state, result=state)


def perturbation(
    model: nn.Module, deltas: Mapping[str, torch.Tensor | None]
) -> contextlib.AbstractContextManager[nn.Module]:
    """Add δ (weight units) to the named layers' (quantized) weights; works in every mode.

    ``deltas`` maps names from model.named_modules() to tensors of the weight's shape (None: no
    δ); layers not named keep their current δ. Gradients reach a δ that requires grad.
    """
    layers = _layers(model, "perturbation")
    if not isinstance(deltas, Mapping):
        raise TypeError(f"deltas must map layer names to tensors, got {type(deltas).__name__}")
    by_name = dict(layers)
    unknown = [n for n in deltas if n not in by_name]
    if unknown:
        raise KeyError(
            f"perturbation: no CiM layer named {', '.join(map(repr, unknown))}; "
            f"valid names: {', '.join(map(repr, by_name))}"
        )
    # Check every δ before touching any layer so a bad entry leaves the model as it was.
    for name, d in deltas.items():
        w = by_name[name].weight
        if d is None:
            continue
        if not isinstance(d, torch.Tensor):
            raise TypeError(f"deltas[{name!r}] must be a tensor, got {type(d).__name__}")
        if d.shape != w.shape:
            raise ValueError(
                f"deltas[{name!r}] has shape {tuple(d.shape)}, weight has {tuple(w.shape)}"
            )
    return _override(model, layers, deltas=deltas)
