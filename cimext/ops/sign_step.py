"""cimext.ops.sign_step_: δ_i ← clamp(δ_i − η·sign(g_i), −b_i, b_i) over many tensors, in place."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from .. import reference as ref
from ..backend import resolve
from . import _spec
from ._registry import check, check_in_fake, on_namespace, register_ref, schema_op


def sign_step_(
    deltas: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    eta: float,
    bounds: float | Sequence[float | torch.Tensor],
) -> None:
    """One signed-gradient step on every delta, projected onto |δ_i| <= b_i (F-LWC, weight PGD).

    ``bounds``: one number for all tensors, or one entry per tensor: a number, or a tensor of
    that delta's shape (per-element bounds, e.g. tight on write-verified weights; converted to
    the delta's dtype and device), in weight units. Runs without autograd, like an optimizer
    step; nothing is written if an argument is bad."""
    if isinstance(deltas, torch.Tensor) or isinstance(grads, torch.Tensor):
        raise TypeError("deltas and grads must be lists of tensors (wrap one tensor in a list)")
    deltas, grads = list(deltas), list(grads)
    for name, ts in (("deltas", deltas), ("grads", grads)):
        for i, t in enumerate(ts):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    eta = _spec.check_nonnegative("eta", eta)
    bounds, tensors = _bound_list(bounds, deltas)
    if not deltas:
        check("sign_step_", (deltas, grads, eta, bounds))  # the lengths
        return
    # Every backend checks everything before it writes, in one place: csrc/common/checks.cpp
    # (the C++ kernels directly, triton and ref through cimext::_check_sign_step_).
    # Without tensor bounds the op is called with the four arguments of the plain schema.
    args = (deltas, grads, eta, bounds) + (() if tensors is None else (tensors,))
    with torch.no_grad():
        schema_op("sign_step_", resolve(deltas[0].device))(*args)


def _bound_list(bounds, deltas) -> tuple[list[float], list[torch.Tensor | None] | None]:
    """(one number per delta, the bound tensors or None): a tensor entry becomes a tensor bound
    (its number 0, unused) converted to the delta's dtype and device."""
    n = len(deltas)
    if isinstance(bounds, torch.Tensor):
        bounds = bounds.item() if bounds.dim() == 0 else bounds.tolist()
    if isinstance(bounds, numbers.Real):
        return [_spec.check_nonnegative("bounds", bounds)] * n, None
    if isinstance(bounds, (str, bytes)) or not isinstance(bounds, Sequence):
        raise TypeError(f"bounds must be a number or a list of numbers / tensors, got {bounds!r}")
    numbers_, tensors = [], []
    for i, b in enumerate(bounds):
        if isinstance(b, torch.Tensor) and b.dim() > 0:
            if i < n and b.shape == deltas[i].shape:
                b = b.detach().to(dtype=deltas[i].dtype, device=deltas[i].device)
            # else: the op reports the mismatch, naming bound_tensors[i]
            numbers_.append(0.0)
            tensors.append(b)
        else:
            numbers_.append(_spec.check_nonnegative(f"bounds[{i}]", b))
            tensors.append(None)
    return numbers_, (tensors if any(t is not None for t in tensors) else None)


def _ref_impl(deltas, grads, eta, bounds, bound_tensors=None) -> None:
    check("sign_step_", (deltas, grads, eta, bounds, bound_tensors))
    ref.sign_step_(deltas, grads, eta, bounds, bound_tensors)


def _fake(deltas, grads, eta, bounds, bound_tensors=None) -> None:
    # The op's checks (also the Meta kernel: a meta tensor among CPU ones lands here); on fake
    # tensors they skip what needs memory or values.
    check_in_fake("sign_step_", (deltas, grads, eta, bounds, bound_tensors))


register_ref("sign_step_", _ref_impl)
on_namespace(lambda ns: torch.library.register_fake(f"{ns}::sign_step_", _fake))
