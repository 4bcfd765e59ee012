"""CiMLinear and CiMConv2d: nn.Linear / nn.Conv2d whose forward can run on noisy CiM weights.

The noise mode is set by the context managers of :mod:`cimext.nn.context`; outside them a layer
computes exactly what its torch base class computes (plus δ and quantization when set).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..device import DeviceModel
from ..ops import _spec
from ._state import Mode
from .quant import QuantConfig, quantize_ste

# Attributes a CiM layer adds to its torch base class; unconvert() drops them.
_CIM_ATTRS = ("device", "quant", "layer_id", "verify_mask", "_delta", "_cim_mode")


def _module_copy(cls: type[nn.Module], m: nn.Module, drop: tuple[str, ...] = ()) -> nn.Module:
    """A new ``cls`` with the state of ``m``: same Parameter objects, own containers.

    Copying __dict__ (rather than calling the constructor) keeps everything a Linear / Conv2d
    carries, including hooks and padding bookkeeping, and costs no weight initialization.
    """
    new = cls.__new__(cls)
    for k, v in m.__dict__.items():
        if k not in drop:
            new.__dict__[k] = v.copy() if isinstance(v, (dict, set, list)) else v
    return new


class _CiMMixin:
    """What CiMLinear and CiMConv2d share: device, quantization, δ slot and noise mode.

    Subclasses provide ``_clean(x, w)`` (the plain torch op) and ``_perturbed(x, w, **kw)`` (the
    fused cimext op), and may override ``_prepare``."""

    _plain_cls: type[nn.Module]

    def _init_cim(self, device_model, quant, layer_id) -> None:
        self._init_cim_config(device_model, quant, layer_id)
        # Optional per-weight write-verify mask for device noise (plain attribute, not state).
        self.verify_mask = None
        # δ and the mode bypass nn.Module.__setattr__ so that neither ever becomes a parameter
        # or buffer: state_dict keys must stay those of the torch base class.
        object.__setattr__(self, "_delta", None)
        object.__setattr__(self, "_cim_mode", None)

    def _init_cim_config(self, device_model, quant, layer_id) -> None:
        if device_model is None:
            device_model = DeviceModel()
        if not isinstance(device_model, DeviceModel):
            raise TypeError(
                f"device_model must be a cimext.DeviceModel, got {type(device_model).__name__}"
            )
        self.device = device_model
        self.quant = QuantConfig.coerce(quant)
        self.layer_id = _spec.check_layer_id(layer_id)

    def __setattr__(self, name, value):
        if name == "delta":
            # nn.Module.__setattr__ would register an nn.Parameter value as a parameter.
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def delta(self) -> torch.Tensor | None:
        """Explicit weight perturbation δ in weight units (None: none); added to the
        (quantized) weight in every mode. Not a parameter or buffer."""
        return self.__dict__.get("_delta")

    @delta.setter
    def delta(self, value: torch.Tensor | None) -> None:
        if value is not None:
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"delta must be a tensor or None, got {type(value).__name__}")
            if value.shape != self.weight.shape:
                raise ValueError(
                    f"delta shape {tuple(value.shape)} must equal weight shape "
                    f"{tuple(self.weight.shape)}"
                )
        self.__dict__["_delta"] = value

    @property
    def noise_mode(self) -> str:
        """The current mode: clean, instance, instances or sampling (set by the contexts)."""
        mode = self.__dict__.get("_cim_mode")
        return "clean" if mode is None else mode.kind

    @classmethod
    def from_module(
        cls,
        m: nn.Module,
        device_model: DeviceModel | None = None,
        quant: QuantConfig | tuple | None = None,
        layer_id: int = 0,
    ):
        """A CiM layer with the configuration of ``m`` that shares its Parameter objects."""
        if not isinstance(m, cls._plain_cls):
            raise TypeError(
                f"{cls.__name__}.from_module needs an {cls._plain_cls.__name__}, "
                f"got {type(m).__name__}"
            )
        new = _module_copy(cls, m)
        new._init_cim(device_model, quant, layer_id)
        return new

    def to_plain(self) -> nn.Module:
        """The torch base class module with the same Parameter objects (no CiM attributes)."""
        return _module_copy(self._plain_cls, self, drop=_CIM_ATTRS)

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The input and the extra op keywords for the fused op (padding for conv)."""
        return x, {}

    _min_batched_dim = 2  # instances mode needs a leading batch dimension to fold

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Clean, one device instance, S folded instances or sampled noise, by mode."""
        mode: Mode | None = self._cim_mode
        S, folded = 1, False
        if mode is not None and mode.kind == "instances":
            if input.dim() < self._min_batched_dim:
                raise ValueError(
                    f"{type(self).__name__} in instances mode needs a batched input, got shape "
                    f"{tuple(input.shape)}"
                )
            S = mode.seeds.shape[0]
            folded = mode.state.fold(input.shape[0], S)
        quant = self.quant
        x = input
        if quant is not None and quant.input_bits is not None:
            # One scale per device instance, as when each instance is run on its own.
            x = quantize_ste(
                x, quant.input_bits, groups=S if folded else 1, unsigned_if_nonneg=True
            )
        delta = self._delta
        if mode is not None and mode.cache and self._reuses_weights(x, delta):
            # Instance modes, nothing to differentiate: the context's perturbed weights (built
            # on first use), so the weight is neither quantized nor perturbed again per batch.
            weights = self._instance_weights(mode, delta)
            x, extra = self._prepare(x)
            if mode.kind == "instance":
                return self._one_instance(x, weights[0], extra)
            y = self._stacked_forward(x, weights, folded, extra)
            return y.reshape(-1, *y.shape[2:])
        w = self._quantized_weight()
        if mode is None:
            return self._clean(x, w if delta is None else w + delta)

        kw = mode.noise_kwargs(self.device)
        if "device" in kw and self.verify_mask is not None:
            kw["verify_mask"] = self.verify_mask
        kw.update(layer_id=self.layer_id, delta=delta)
        x, extra = self._prepare(x)
        if mode.kind == "sampling":
            return self._perturbed(x, w, seed=mode.state.sampling_seed(), **extra, **kw)
        if mode.kind == "instance":
            return self._perturbed(x, w, seed=mode.seeds, **extra, **kw)
        if folded:
            x = x.reshape(S, x.shape[0] // S, *x.shape[1:])
        y = self._perturbed(x, w, seeds=mode.seeds, x_stacked=folded, **extra, **kw)
        return y.reshape(-1, *y.shape[2:])  # (S, B, ...) -> (S*B, ...)

    def _quantized_weight(self) -> torch.Tensor:
        quant = self.quant
        if quant is not None and quant.weight_bits is not None:
            return quantize_ste(self.weight, quant.weight_bits)
        return self.weight

    # --- reused perturbed weights (instance modes, no gradient) ---------------------------------

    def _reuses_weights(self, x: torch.Tensor, delta) -> bool:
        """Whether this forward may take the perturbed weights from the context's cache: an
        instance mode that allows it, eager (a compiled graph keeps the fused op), on the CPU (on
        a GPU the fused kernels win) and with no gradient to compute (the fused op's backward
        regenerates the noise)."""
        mode = self._cim_mode
        if mode.kind == "sampling" or torch.compiler.is_compiling() or x.device.type != "cpu":
            return False
        if not torch.is_grad_enabled():
            return True
        return not any(
            t is not None and t.requires_grad for t in (x, delta, self.weight, self.bias)
        )

    def _instance_weights(self, mode: Mode, delta) -> torch.Tensor:
        """W + δ + ΔW(seed) of every seed of the mode, (S, *W.shape), built once per context
        and rebuilt only when the weight, δ, quantization, device model or verify mask change.

        The values are those the fused op builds inside its kernel ((W + δ) + ΔW in the weight's
        dtype, W quantized first when the layer quantizes weights), so every instance computes
        what the fused op would."""
        state = mode.state
        device = mode.device if mode.device is not None else self.device
        mask = self.verify_mask
        weight = self.weight
        # The cache entry holds the objects it was built from: identity (not id(), which a
        # new object may reuse) plus version counters detect any change.
        refs = (weight, self.quant, device, delta, mask)
        versions = (
            weight._version,
            weight.data_ptr(),
            None if delta is None else delta._version,
            None if mask is None else mask._version,
        )
        cached = state.weights.get(id(self))
        if (
            cached is not None
            and cached[1] == versions
            and all(a is b for a, b in zip(cached[0], refs, strict=True))
        ):
            return cached[2]
        w = self._quantized_weight().detach()
        S = mode.seeds.shape[0]
        buf = state.buffer(id(self), (S, *w.shape), w.dtype, w.device)
        ops.noise(w, device, seeds=mode.seeds, layer_id=self.layer_id, verify_mask=mask, out=buf)
        buf.add_(w if delta is None else w + delta.detach())  # ΔW + (W + δ): addition commutes
        state.weights[id(self)] = (refs, versions, buf)
        return buf

    def _stacked_forward(self, x: torch.Tensor, weights: torch.Tensor, folded: bool, extra):
        """(S, B, ...) outputs of the S instances: x is (S*B, ...) when folded, else shared."""
        S = weights.shape[0]
        xs = x.reshape(S, x.shape[0] // S, *x.shape[1:]) if folded else None
        return self._each_instance(x, xs, weights, extra)


class CiMLinear(_CiMMixin, nn.Linear):
    """nn.Linear on a compute-in-memory crossbar: device noise, quantization and δ by mode.

    Same constructor (plus keyword-only ``device_model``, ``quant``, ``layer_id``), same
    state_dict keys; clean forward with quantization off and no δ is nn.Linear's, bit for bit.
    """

    _plain_cls = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        device_model: DeviceModel | None = None,
        quant: QuantConfig | tuple | None = None,
        layer_id: int = 0,
    ) -> None:
        _spec.check_bool("bias", bias)
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_cim(device_model, quant, layer_id)

    def _clean(self, x, w):
        return F.linear(x, w, self.bias)

    def _perturbed(self, x, w, **kw):
        return ops.perturbed_linear(x, w, self.bias, **kw)

    def _one_instance(self, x, w, extra):
        # As the fused CPU kernel computes each instance: one addmm (mm without bias) on the
        # input flattened to 2-D, whatever its leading dimensions.
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = torch.mm(x2, w.t()) if self.bias is None else torch.addmm(self.bias, x2, w.t())
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], w.shape[0])

    def _each_instance(self, x, xs, weights, extra):
        S, out_f = weights.shape[0], weights.shape[1]
        lead = x.shape[:-1] if xs is None else xs.shape[1:-1]
        y = x.new_empty((S, math.prod(lead), out_f))
        x2 = None if xs is not None else x.reshape(-1, x.shape[-1])
        for s in range(S):
            xi = x2 if xs is None else xs[s].reshape(-1, x.shape[-1])
            if self.bias is None:
                torch.mm(xi, weights[s].t(), out=y[s])
            else:
                torch.addmm(self.bias, xi, weights[s].t(), out=y[s])
        return y.reshape(S, *lead, out_f)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_cim_repr(self)}"


class CiMConv2d(_CiMMixin, nn.Conv2d):
    """nn.Conv2d on a compute-in-memory crossbar: device noise, quantization and δ by mode.

    Same constructor (plus keyword-only ``device_model``, ``quant``, ``layer_id``), same
    state_dict keys; clean forward with quantization off and no δ is nn.Conv2d's, bit for bit.
    All padding modes and string paddings work with noise (padding is applied before the op).
    """

    _plain_cls = nn.Conv2d
    _min_batched_dim = 4

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        device_model: DeviceModel | None = None,
        quant: QuantConfig | tuple | None = None,
        layer_id: int = 0,
    ) -> None:
        _spec.check_bool("bias", bias)
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        self._init_cim(device_model, quant, layer_id)

    def _clean(self, x, w):
        return self._conv_forward(x, w, self.bias)

    def _prepare(self, x):
        # The fused op takes only symmetric integer padding: anything else is padded here, the
        # same way nn.Conv2d does for non-zero padding modes.
        rp = self._reversed_padding_repeated_twice  # F.pad order: (w_left, w_right, h_l, h_r)
        if self.padding_mode != "zeros":
            return F.pad(x, rp, mode=self.padding_mode), {"padding": 0}
        if self.padding == "valid":
            return x, {"padding": 0}
        if self.padding == "same":
            if rp[0] == rp[1] and rp[2] == rp[3]:
                return x, {"padding": (rp[2], rp[0])}
            return F.pad(x, rp), {"padding": 0}
        return x, {"padding": self.padding}

    def _perturbed(self, x, w, **kw):
        padding = kw.pop("padding")
        unbatched = x.dim() == 3
        if unbatched:  # nn.Conv2d accepts (C, H, W); the op wants (N, C, H, W)
            x = x.unsqueeze(0)
        y = ops.perturbed_conv2d(
            x, w, self.bias, self.stride, padding, self.dilation, self.groups, **kw
        )
        return y.squeeze(0) if unbatched else y

    def _conv(self, x, w, padding):
        # The call the fused CPU kernel makes for each instance.
        return F.conv2d(x, w, self.bias, self.stride, padding, self.dilation, self.groups)

    def _one_instance(self, x, w, extra):
        unbatched = x.dim() == 3
        y = self._conv(x.unsqueeze(0) if unbatched else x, w, extra["padding"])
        return y.squeeze(0) if unbatched else y

    def _each_instance(self, x, xs, weights, extra):
        p = extra["padding"]
        if xs is None and self.groups == 1 and x.dim() == 4:
            # A shared input (the first CiM layer of a folded forward): one convolution with the
            # S instances' filters side by side reads and unfolds the input once for all of them.
            S, c_out = weights.shape[0], weights.shape[1]
            bias = None if self.bias is None else self.bias.repeat(S)
            y = F.conv2d(
                x,
                weights.reshape(S * c_out, *weights.shape[2:]),
                bias,
                self.stride,
                p,
                self.dilation,
                1,
            )
            return y.reshape(y.shape[0], S, c_out, *y.shape[2:]).transpose(0, 1)
        outs = [self._conv(x if xs is None else xs[s], w, p) for s, w in enumerate(weights)]
        return torch.stack(outs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_cim_repr(self)}"


def _cim_repr(layer: _CiMMixin) -> str:
    parts = [f"layer_id={layer.layer_id}"]
    if layer.quant is not None and layer.quant.enabled:
        parts.append(f"quant=({layer.quant.weight_bits}, {layer.quant.input_bits})")
    if layer.noise_mode != "clean":
        parts.append(f"mode={layer.noise_mode}")
    return ", ".join(parts)


def unfold(y: torch.Tensor, instances: int) -> torch.Tensor:
    """(S*B, ...) output of a model in instances mode -> (S, B, ...)."""
    if instances < 1 or y.dim() == 0 or y.shape[0] % instances:
        raise ValueError(
            f"cannot unfold a leading size {y.shape[0] if y.dim() else None} into "
            f"{instances} instances"
        )
    return y.reshape(instances, y.shape[0] // instances, *y.shape[1:])
