"""Triton kernel of ``cimext::sign_step_``: d ← clamp(d − η·sign(g), −b, b) in place, per tensor,
with b one number per tensor or a tensor of per-element bounds.

Follows csrc/kernels/sign_step.h: the arithmetic is float32 for float32 / float16 / bfloat16 and
float64 for float64, with η and b rounded to it once, so every backend gives the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

SIGN_STEP_BLOCK = 1024


@triton.jit
def _sign_step_kernel(
    d_ptr,
    g_ptr,
    b_ptr,
    scalars_ptr,
    n,
    F64: tl.constexpr,
    PER_ELEMENT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # η and b come from a float64 tensor (a float argument would be float32, too coarse for
    # float64 deltas) and are rounded here to the arithmetic type. PER_ELEMENT: the bound is
    # b_ptr[i] (a tensor like the delta) instead of the scalar.
    acc_ty = tl.float64 if F64 else tl.float32
    eta = tl.load(scalars_ptr).to(acc_ty)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    if PER_ELEMENT:
        bound = tl.load(b_ptr + i, mask=inside, other=0).to(acc_ty)
    else:
        bound = tl.load(scalars_ptr + 1).to(acc_ty)
    d = tl.load(d_ptr + i, mask=inside, other=0).to(acc_ty)
    g = tl.load(g_ptr + i, mask=inside, other=0).to(acc_ty)
    s = (g > 0).to(acc_ty) - (g < 0).to(acc_ty)  # sign(0) = sign(NaN) = 0, as torch.sign
    v = d - eta * s
    # Selects rather than minimum / maximum: a NaN delta stays NaN, as torch.clamp.
    v = tl.where(v < -bound, -bound, tl.where(v > bound, bound, v))
    tl.store(d_ptr + i, v.to(d_ptr.dtype.element_ty), mask=inside)


def sign_step_(
    deltas: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    eta: float,
    bounds: Sequence[float],
    bound_tensors: Sequence[torch.Tensor | None] | None = None,
) -> None:
    """deltas[i] ← clamp(deltas[i] − eta·sign(grads[i]), −b_i, b_i) in place, b_i =
    bound_tensors[i] when given, else bounds[i] (schema of cimext::sign_step_); every argument is
    checked before any tensor is written, by cimext::_check_sign_step_ (the checks of the C++
    kernels)."""
    torch.ops.cimext._check_sign_step_(deltas, grads, eta, bounds, bound_tensors)
    if not deltas:
        return
    # (eta, bound) per tensor, moved to the device in one copy.
    scalars = torch.tensor([[eta, b] for b in bounds], dtype=torch.float64).to(deltas[0].device)
    for k, (d, g) in enumerate(zip(deltas, grads, strict=True)):
        n = d.numel()
        if n == 0:
            continue
        work = d if d.is_contiguous() else d.contiguous()
        bt = None if bound_tensors is None else bound_tensors[k]
        _sign_step_kernel[(triton.cdiv(n, SIGN_STEP_BLOCK),)](
            work,
            g.contiguous(),
            work if bt is None else bt.contiguous(),  # not read without PER_ELEMENT
            scalars[k],
            n,
            F64=d.dtype == torch.float64,
            PER_ELEMENT=bt is not None,
            BLOCK=SIGN_STEP_BLOCK,
        )
        if work is not d:
            with torch.no_grad():
                d.copy_(work)
