"""convert / unconvert: swap nn.Linear and nn.Conv2d for their CiM versions and back."""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from ..device import DeviceModel
from ..ops._spec import check_bool
from .layers import CiMConv2d, CiMLinear, _CiMMixin
from .quant import QuantConfig

# Exact types only: a subclass may override forward (e.g. MultiheadAttention's out_proj is never
# called through forward), and a CiM layer would silently drop that behaviour.
_TARGETS: dict[type, type] = {nn.Linear: CiMLinear, nn.Conv2d: CiMConv2d}


def cim_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every CiMLinear / CiMConv2d in ``model``, in named_modules() order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _CiMMixin)]


def _replace(model: nn.Module, targets: set[int], make: Callable[[nn.Module], nn.Module]):
    """Replace every module whose id is in ``targets`` by make(module), wherever it is attached
    (a module shared by two parents stays shared); returns the (possibly new) root."""
    memo: dict[int, nn.Module] = {}

    def get(m: nn.Module) -> nn.Module:
        if id(m) not in memo:
            memo[id(m)] = make(m)
        return memo[id(m)]

    if id(model) in targets:
        return get(model)
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in targets:
                # Assigning through _modules works for Sequential, ModuleList, ModuleDict alike.
                parent._modules[name] = get(child)
    return model


def convert(
    model: nn.Module,
    device: DeviceModel | None = None,
    quant: QuantConfig | tuple | None = None,
    *,
    inplace: bool = True,
) -> nn.Module:
    """Replace every nn.Linear / nn.Conv2d of ``model`` by CiMLinear / CiMConv2d.

    Layers get layer_id 0, 1, 2, ... in named_modules() order and share ``device`` (default
    DeviceModel()) and ``quant`` (a QuantConfig or a (weight_bits, input_bits) pair). Weights are
    shared, not copied; CiM layers already present are reconfigured. Returns the model (a new
    module when ``model`` itself is a Linear / Conv2d, or a deep copy when inplace=False).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert needs an nn.Module, got {type(model).__name__}")
    if device is None:
        device = DeviceModel()
    elif not isinstance(device, DeviceModel):
        raise TypeError(f"device must be a cimext.DeviceModel, got {type(device).__name__}")
    quant = QuantConfig.coerce(quant)
    if not check_bool("inplace", inplace):
        model = copy.deepcopy(model)
    ids: dict[int, int] = {}
    for _, m in model.named_modules():
        if type(m) in _TARGETS or isinstance(m, _CiMMixin):
            ids[id(m)] = len(ids)
    if not ids:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d layers to convert")

    def make(m: nn.Module) -> nn.Module:
        if isinstance(m, _CiMMixin):
            m._init_cim_config(device, quant, ids[id(m)])
            return m
        return _TARGETS[type(m)].from_module(m, device, quant, ids[id(m)])

    return _replace(model, set(ids), make)


def unconvert(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """Replace every CiM layer by its plain nn.Linear / nn.Conv2d (same weights); returns the
    model. δ, noise modes and quantization settings are dropped."""
    if not check_bool("inplace", inplace):
        model = copy.deepcopy(model)
    targets = {id(m) for _, m in cim_layers(model)}
    return _replace(model, targets, lambda m: m.to_plain())


def require_cim_layers(model, what: str) -> list[tuple[str, nn.Module]]:
    """cim_layers(model), or a TypeError naming ``what`` when ``model`` is not a module or has
    no CiM layers (the check every analysis and context starts with)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: model must be an nn.Module, got {type(model).__name__}")
    layers = cim_layers(model)
    if not layers:
        raise TypeError(
            f"{what}: {type(model).__name__} has no CiM layers; call cimext.convert(model) first"
        )
    return layers
