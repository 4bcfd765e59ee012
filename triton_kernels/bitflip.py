"""Triton kernels of ``cimext::bitflip`` / ``cimext::bitflip_``: bit flips of raw tensor storage.

Follows csrc/kernels/bitflip.h (and cimext.reference.bitflip_, the specification) draw for draw:
one lane per segment of the flip stream walks its candidate positions, the gap to the next one
found by the same float64 products of the q^(2^k) table, so every backend flips the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .philox import as_key, stream_tensor

BITFLIP_BLOCK = 64  # segments (lanes) per program
_TWO_M53 = 2.0**-53


@triton.jit
def _bitflip_kernel(
    data_ptr,
    partial_ptr,
    table_ptr,
    bitpos_ptr,
    scalars_ptr,
    stream_ptr,
    n,
    seg_elems,
    n_seg,
    m,
    levels,
    exp_mask,
    ZERO_NONFINITE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    key = as_key(tl.load(stream_ptr))
    r01 = tl.load(scalars_ptr)
    r10 = tl.load(scalars_ptr + 1)
    s = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    begin = s * seg_elems
    seg_len = tl.minimum(n - begin, seg_elems) * m
    active = s < n_seg
    cur = tl.zeros([BLOCK], tl.int64)
    last = tl.full([BLOCK], -1, tl.int64)
    flips = tl.zeros([BLOCK], tl.int64)
    draw = tl.zeros([BLOCK], tl.int64)
    while tl.max(active.to(tl.int32), axis=0) > 0:
        x0, x1, x2, x3 = tl.randint4x(key, (s << 32) | draw)
        gap_bits = (x0.to(tl.uint64) << 21) | (x1.to(tl.uint64) >> 11)
        u = (gap_bits + 1).to(tl.float64) * _TWO_M53
        # bitflip_gap: the largest g with q^g >= u, built bit by bit from the top level down.
        acc = tl.full([BLOCK], 1.0, tl.float64)
        gap = tl.zeros([BLOCK], tl.int64)
        for j in range(0, levels):
            c = acc * tl.load(table_ptr + (levels - 1 - j))
            take = c >= u
            acc = tl.where(take, c, acc)
            gap = gap * 2 + take.to(tl.int64)
        pos = cur + gap
        active = active & (pos < seg_len)
        cur = pos + 1
        e = begin + pos // m
        b = tl.load(bitpos_ptr + pos % m, mask=active, other=0)
        x = tl.load(data_ptr + e, mask=active, other=0).to(tl.int32)
        v = ((x2.to(tl.uint64) << 21) | (x3.to(tl.uint64) >> 11)).to(tl.float64) * _TWO_M53
        flip = active & (v < tl.where(((x >> b) & 1) == 1, r10, r01))
        if ZERO_NONFINITE:
            # An element is final once the lane's flips move past it.
            done = flip & (last >= 0) & (last != e)
            y = tl.load(data_ptr + last, mask=done, other=0).to(tl.int32)
            zero = tl.zeros([BLOCK], tl.int32).to(data_ptr.dtype.element_ty)
            tl.store(data_ptr + last, zero, mask=done & ((y & exp_mask) == exp_mask))
        one = tl.full([BLOCK], 1, tl.int32)
        tl.store(data_ptr + e, (x ^ (one << b)).to(data_ptr.dtype.element_ty), mask=flip)
        last = tl.where(flip, e, last)
        flips += flip.to(tl.int64)
        draw += 1
    if ZERO_NONFINITE:
        done = last >= 0
        y = tl.load(data_ptr + last, mask=done, other=0).to(tl.int32)
        zero = tl.zeros([BLOCK], tl.int32).to(data_ptr.dtype.element_ty)
        tl.store(data_ptr + last, zero, mask=done & ((y & exp_mask) == exp_mask))
    tl.store(partial_ptr + tl.program_id(0), tl.sum(flips, axis=0))


def bitflip_(
    t: torch.Tensor,
    p01: float,
    p10: float,
    mask: int,
    seed: int,
    layer_id: int,
    zero_nonfinite: bool,
) -> torch.Tensor:
    """Flip bits of ``t`` in place (schema of cimext::bitflip_); returns the number of flips.
    Checked first by cimext::_check_bitflip, the checks of the C++ kernels."""
    torch.ops.cimext._check_bitflip(t, p01, p10, mask, seed, layer_id, zero_nonfinite, True)
    return _bitflip_into(t, p01, p10, mask, seed, layer_id, zero_nonfinite)


def _bitflip_into(t, p01, p10, mask, seed, layer_id, zero_nonfinite) -> torch.Tensor:
    from cimext import reference as ref

    width, view_dtype, _, exponent, _ = ref.BITFLIP_FORMATS[t.dtype]
    positions = [b for b in range(width) if (mask >> b) & 1]
    pmax, m, n = max(p01, p10), len(positions), t.numel()
    if pmax == 0.0 or m == 0 or n == 0:
        return torch.zeros((), dtype=torch.int64, device=t.device)
    table = ref.bitflip_gap_table(pmax)
    seg = ref.bitflip_segment(pmax, m)
    n_seg = (n + seg - 1) // seg
    dev = t.device
    work = t if t.is_contiguous() else t.contiguous()
    grid = (triton.cdiv(n_seg, BITFLIP_BLOCK),)
    partial = torch.zeros(grid[0], dtype=torch.int64, device=dev)
    # The exponent mask as the signed value the kernel sees after widening to int32.
    exp_mask = exponent - (1 << 32) if exponent >= 1 << 31 else exponent
    _bitflip_kernel[grid](
        work.view(view_dtype),
        partial,
        torch.tensor(table or [0.0], dtype=torch.float64, device=dev),
        torch.tensor(positions, dtype=torch.int32, device=dev),
        torch.tensor([p01 / pmax, p10 / pmax], dtype=torch.float64, device=dev),
        stream_tensor([ref.stream_seed(seed, layer_id)], dev),
        n,
        seg,
        n_seg,
        m,
        len(table),
        exp_mask,
        ZERO_NONFINITE=bool(zero_nonfinite and exponent),
        BLOCK=BITFLIP_BLOCK,
    )
    if work is not t:
        with torch.no_grad():
            t.copy_(work)
    return partial.sum()


def bitflip(
    t: torch.Tensor,
    p01: float,
    p10: float,
    mask: int,
    seed: int,
    layer_id: int,
    zero_nonfinite: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A flipped copy of ``t`` and the number of flips (schema of cimext::bitflip)."""
    torch.ops.cimext._check_bitflip(t, p01, p10, mask, seed, layer_id, zero_nonfinite, False)
    out = t.clone(memory_format=torch.contiguous_format)
    return out, _bitflip_into(out, p01, p10, mask, seed, layer_id, zero_nonfinite)
