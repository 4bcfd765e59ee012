"""cimext.ops.hdiag_*/curv_backward_*: the Becker–LeCun curvature recursion (DESIGN section 5).

For a layer y = W x with second-derivative seed S_out = ∂²L/∂y² (diagonal), the recursion is
H_W = Σ_batch S_out ⊗ x² and S_in = (W²)ᵀ S_out. These ops are analysis kernels (one pass per
model, like a backward) and are not differentiable.

No Triton kernel: hdiag_linear is a GEMM on squared rows and hdiag_conv2d a weight-gradient
convolution on squared columns, which the vendor GEMM / convolution behind the C++ and CUDA kernels
already run at full speed; the only saving a fused kernel could add is one transient tensor of x's
size. The "triton" backend therefore runs the "cpp" kernels for these ops.
"""

from __future__ import annotations

import numbers

import torch

from .. import reference as ref
from ..backend import resolve
from ._registry import on_namespace, register_ref, schema_op

__all__ = ["curv_backward_conv2d", "curv_backward_linear", "hdiag_conv2d", "hdiag_linear"]


def _backend(t: torch.Tensor) -> str:
    name = resolve(t.device)
    return "cpp" if name == "triton" else name


def _pair(name: str, v) -> list[int]:
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, numbers.Integral):
        return [int(v), int(v)]
    if isinstance(v, (tuple, list)) and len(v) == 2:
        if all(isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in v):
            return [int(v[0]), int(v[1])]
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def _groups(groups) -> int:
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups must be an int, got {groups!r}")
    return int(groups)


def _tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def hdiag_linear(x: torch.Tensor, s_out: torch.Tensor) -> torch.Tensor:
    """Σ over leading dims of s_out[..., o] · x[..., i]²: the Hessian diagonal of a linear
    layer's weight, shape (out, in), from its input x (..., in) and output seed s_out (..., out)."""
    _tensor("x", x)
    _tensor("s_out", s_out)
    return schema_op("hdiag_linear", _backend(x))(x, s_out)


def hdiag_conv2d(
    x: torch.Tensor,
    s_out: torch.Tensor,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """Σ over batch and output positions of s_out ⊗ unfold(x)²: the Hessian diagonal of a conv
    weight, shape (O, C/groups, kh, kw); x (N, C, H, W), s_out (N, O, OH, OW)."""
    _tensor("x", x)
    _tensor("s_out", s_out)
    args = (
        _pair("kernel_size", kernel_size),
        _pair("stride", stride),
        _pair("padding", padding),
        _pair("dilation", dilation),
        _groups(groups),
    )
    return schema_op("hdiag_conv2d", _backend(x))(x, s_out, *args)


def curv_backward_linear(s_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """S_in = (W²)ᵀ S_out per sample: s_out (..., out), weight (out, in) -> (..., in)."""
    _tensor("s_out", s_out)
    _tensor("weight", weight)
    return schema_op("curv_backward_linear", _backend(s_out))(s_out, weight)


def curv_backward_conv2d(
    s_out: torch.Tensor,
    weight: torch.Tensor,
    input_size,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """S_in = (W²)ᵀ S_out for a convolution: the transposed convolution of s_out (N, O, OH, OW)
    with W², shape (N, C, H, W) for ``input_size`` (H, W)."""
    _tensor("s_out", s_out)
    _tensor("weight", weight)
    args = (
        _pair("input_size", input_size),
        _pair("stride", stride),
        _pair("padding", padding),
        _pair("dilation", dilation),
        _groups(groups),
    )
    return schema_op("curv_backward_conv2d", _backend(s_out))(s_out, weight, *args)


def _fake_hdiag_linear(x, s_out):
    ref.check_hdiag_linear(x, s_out)
    return x.new_empty((s_out.shape[-1], x.shape[-1]))


def _fake_hdiag_conv2d(x, s_out, kernel_size, stride, padding, dilation, groups):
    ref.check_hdiag_conv2d(x, s_out, kernel_size, stride, padding, dilation, groups)
    return x.new_empty((s_out.shape[1], x.shape[1] // groups, *kernel_size))


def _fake_curv_backward_linear(s_out, weight):
    ref.check_curv_backward_linear(s_out, weight)
    return s_out.new_empty((*s_out.shape[:-1], weight.shape[1]))


def _fake_curv_backward_conv2d(s_out, weight, input_size, stride, padding, dilation, groups):
    ref.check_curv_backward_conv2d(s_out, weight, input_size, stride, padding, dilation, groups)
    return s_out.new_empty((s_out.shape[0], weight.shape[1] * groups, *input_size))


_IMPLS = {
    "hdiag_linear": (ref.hdiag_linear, _fake_hdiag_linear),
    "hdiag_conv2d": (ref.hdiag_conv2d, _fake_hdiag_conv2d),
    "curv_backward_linear": (ref.curv_backward_linear, _fake_curv_backward_linear),
    "curv_backward_conv2d": (ref.curv_backward_conv2d, _fake_curv_backward_conv2d),
}


def _register_fakes(ns: str) -> None:
    if ns != "cimext":  # no Triton kernels: nothing is defined in cimext_triton for these ops
        return
    for name, (_, fake) in _IMPLS.items():
        try:
            getattr(torch.ops.cimext, name)
        except AttributeError:  # a _C built before these ops existed: only "ref" works for them
            continue
        torch.library.register_fake(f"{ns}::{name}", fake)


for _name, (_ref_fn, _) in _IMPLS.items():
    register_ref(_name, _ref_fn)
on_namespace(_register_fakes)
