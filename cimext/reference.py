"""Pure-PyTorch versions of every cimext op: the executable specification (DESIGN sections 3-5).

Everything here is written for clarity, not speed; the C++, CUDA and Triton kernels must agree with
it (uniforms bit-identical, normals within 1e-6). Random numbers follow Triton's Philox4x32-10
(``tl.randint4x`` / ``tl.rand4x`` / ``tl.randn4x``) with 32-bit words held in int64 tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
UNIFORM_SCALE = 4.6566127342e-10
TWO_PI = 6.283185307179586
BOX_MULLER_FLOOR = 1.0e-7

# Noise modes of the op schemas (csrc/cimext.cpp). KIND_DEVICE_FAST is internal: device noise
# without level-dependent sigma or verification, which is one Gaussian per weight (j = i).
KIND_NONE, KIND_GAUSSIAN, KIND_DEVICE, KIND_RCG = 0, 1, 2, 3
KIND_DEVICE_FAST = -2


# ------------------------------------------------------------------------------------------------
# Integer helpers (Python ints, 64-bit wrap-around)
# ------------------------------------------------------------------------------------------------
def splitmix64(x: int) -> int:
    """SplitMix64 finalizer of x + golden ratio, on Python ints modulo 2**64."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def stream_seed(seed: int, layer_id: int) -> int:
    """Philox key of layer ``layer_id`` of instance ``seed``: splitmix64(s ^ splitmix64(l))."""
    return splitmix64((seed & _M64) ^ splitmix64(layer_id & _M64))


def _mul_hilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a * b) >> 32 and (a * b) & 0xFFFFFFFF for uint32 values in int64 tensors, no overflow."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    t_hi, t_lo = a_hi * b, a_lo * b  # each < 2**48
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (((t_hi & 0xFFFF) << 16) + t_lo) & _M32
    return hi, lo


def philox4x32_10(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ten Philox rounds on uint32 counters held in int64 tensors (triton philox_impl)."""
    for _ in range(10):
        hi_b, lo_b = _mul_hilo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hilo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def randint4x(seed: int, offset: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """tl.randint4x: four uint32 words (in int64 tensors) per offset; counter (lo, hi, 0, 0)."""
    seed &= _M64
    offset = offset.to(torch.int64)
    lo, hi = offset & _M32, (offset >> 32) & _M32
    zero = torch.zeros_like(lo)
    return philox4x32_10(lo, hi, zero, zero, seed & _M32, seed >> 32)


def uint_to_uniform(u: torch.Tensor) -> torch.Tensor:
    """Triton's uint32 -> float32 in [0, 1): reinterpret as int32, map negatives with ~x, scale."""
    i = torch.where(u >= 2**31, u - 2**32, u)
    i = torch.where(i < 0, ~i, i)
    return i.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's pair_uniform_to_normal in float32."""
    u1 = torch.clamp_min(u1, torch.tensor(BOX_MULLER_FLOOR, dtype=torch.float32))
    th = u2 * torch.tensor(TWO_PI, dtype=torch.float32)
    r = torch.sqrt(torch.log(u1) * torch.tensor(-2.0, dtype=torch.float32))
    return r * torch.cos(th), r * torch.sin(th)


def rand4x(seed: int, offset: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """tl.rand4x: four float32 uniforms in [0, 1) per offset."""
    return tuple(uint_to_uniform(w) for w in randint4x(seed, offset))


def randn4x(seed: int, offset: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """tl.randn4x: four float32 normals per offset."""
    u1, u2, u3, u4 = rand4x(seed, offset)
    n1, n2 = box_muller(u1, u2)
    n3, n4 = box_muller(u3, u4)
    return n1, n2, n3, n4


def _pick(values: Sequence[torch.Tensor], j: torch.Tensor) -> torch.Tensor:
    return torch.stack(values, dim=-1).gather(-1, (j & 3).unsqueeze(-1)).squeeze(-1)


def normals(stream: int, j: torch.Tensor) -> torch.Tensor:
    """The j-th standard normals of a Philox stream: randn4x(stream, j >> 2)[j & 3]."""
    j = j.to(torch.int64)
    return _pick(randn4x(stream, j >> 2), j)


def uniforms(stream: int, j: torch.Tensor) -> torch.Tensor:
    """The j-th uniforms of a Philox stream: rand4x(stream, j >> 2)[j & 3]."""
    j = j.to(torch.int64)
    return _pick(rand4x(stream, j >> 2), j)


# ------------------------------------------------------------------------------------------------
# Noise model (DESIGN section 3)
# ------------------------------------------------------------------------------------------------
def noise_kind(mode: int, level_sigma: Sequence[float], verify: bool, has_mask: bool) -> int:
    """The kind a noise spec resolves to. Device noise without level-dependent sigma and without
    any verification is one Gaussian per weight (j = i); otherwise one normal per device."""
    if mode == KIND_DEVICE and not level_sigma and not verify and not has_mask:
        return KIND_DEVICE_FAST
    return mode


def device_noise_constants(
    scale: float, weight_bits: int, bits_per_device: int, sigma: float
) -> tuple[float, float]:
    """(gaussian std of one weight, weight value of one least significant level), in float64."""
    levels = (1 << weight_bits) - 1
    devices = weight_bits // bits_per_device
    sum4 = float(sum(4 ** (d * bits_per_device) for d in range(devices)))
    return scale * sigma * math.sqrt(sum4) / levels, scale / levels


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def noise_flat(
    w: torch.Tensor,
    stream: int,
    *,
    kind: int,
    scale: float,
    weight_bits: int = 8,
    bits_per_device: int = 2,
    sigma: float = 0.1,
    level_sigma: Sequence[float] = (),
    verified_sigma: float = 0.01,
    th: float = 0.06,
    verify: bool = False,
    verify_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """ΔW (float32, flat) of the flat float32 weights ``w`` for one Philox stream."""
    n = w.numel()
    idx = torch.arange(n, dtype=torch.int64)
    if kind == KIND_NONE:
        return torch.zeros(n, dtype=torch.float32)
    if kind == KIND_RCG:
        eps = normals(stream, idx)
        return _f32(scale * sigma) * torch.minimum(eps, _f32(th))
    if kind == KIND_GAUSSIAN:
        return _f32(scale * sigma) * normals(stream, idx)
    std, lsb = device_noise_constants(scale, weight_bits, bits_per_device, sigma)
    if kind == KIND_DEVICE_FAST:
        return _f32(std) * normals(stream, idx)
    levels = (1 << weight_bits) - 1
    devices = weight_bits // bits_per_device
    if scale > 0:
        q = torch.round(w.abs() / _f32(scale) * _f32(float(levels)))
        q = q.clamp(0, levels).to(torch.int64)
    else:
        q = torch.zeros(n, dtype=torch.int64)
    digit_mask = (1 << bits_per_device) - 1
    table = [sigma * (level_sigma[v] if level_sigma else 1.0) for v in range(digit_mask + 1)]
    dev_std = torch.tensor(table, dtype=torch.float32)
    if verify_mask is not None:
        verified = verify_mask.reshape(-1).to(torch.bool)
    else:
        verified = torch.full((n,), bool(verify))
    eps = normals(stream, (idx.unsqueeze(1) * devices + torch.arange(devices)).reshape(-1))
    eps = eps.reshape(n, devices)
    acc = torch.zeros(n, dtype=torch.float32)
    for d in range(devices):
        e = eps[:, d]
        digit = (q >> (d * bits_per_device)) & digit_mask
        unver = dev_std[digit] * e
        ver = torch.clamp(_f32(verified_sigma) * e, -_f32(th), _f32(th))
        acc = acc + _f32(float(1 << (d * bits_per_device))) * torch.where(verified, ver, unver)
    return _f32(lsb) * acc


def full_scale(weight: torch.Tensor) -> float:
    """s_l = max|W| as a Python float (the float32 value the kernels use)."""
    if weight.numel() == 0:
        return 0.0
    # aminmax is one pass with no temporary, unlike abs().max().
    lo, hi = torch.aminmax(weight.detach())
    return float(torch.maximum(-lo, hi).to(torch.float32))


def noise(
    weight: torch.Tensor,
    seed: int,
    layer_id: int = 0,
    *,
    mode: int = KIND_DEVICE,
    scale: float | None = None,
    verify_mask: torch.Tensor | None = None,
    **spec,
) -> torch.Tensor:
    """ΔW of ``weight`` (same shape and dtype) for instance ``seed`` of layer ``layer_id``."""
    if scale is None:
        scale = full_scale(weight)
    kind = noise_kind(
        mode, spec.get("level_sigma", ()), spec.get("verify", False), verify_mask is not None
    )
    w = weight.detach().reshape(-1).to(torch.float32).cpu()
    mask = None if verify_mask is None else verify_mask.reshape(-1).cpu()
    out = noise_flat(
        w, stream_seed(seed, layer_id), kind=kind, scale=scale, verify_mask=mask, **spec
    )
    return out.reshape(weight.shape).to(device=weight.device, dtype=weight.dtype)


def perturbed_weights(
    weight: torch.Tensor,
    seeds: Sequence[int],
    layer_id: int = 0,
    *,
    delta: torch.Tensor | None = None,
    **noise_spec,
) -> list[torch.Tensor]:
    """W + δ + ΔW(seed) for every seed."""
    base = weight if delta is None else weight + delta
    return [base + noise(weight, s, layer_id, **noise_spec) for s in seeds]


def perturbed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    seeds: Sequence[int] = (0,),
    layer_id: int = 0,
    delta: torch.Tensor | None = None,
    x_stacked: bool = False,
    **noise_spec,
) -> torch.Tensor:
    """Stack over seeds of F.linear(x_s, W + δ + ΔW(s), b); x_s = x[s] when x_stacked."""
    ws = perturbed_weights(weight, seeds, layer_id, delta=delta, **noise_spec)
    return torch.stack([F.linear(x[i] if x_stacked else x, w, bias) for i, w in enumerate(ws)])


def perturbed_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    seeds: Sequence[int] = (0,),
    layer_id: int = 0,
    delta: torch.Tensor | None = None,
    x_stacked: bool = False,
    **noise_spec,
) -> torch.Tensor:
    """Stack over seeds of F.conv2d(x_s, W + δ + ΔW(s), b, ...); x_s = x[s] when x_stacked."""
    ws = perturbed_weights(weight, seeds, layer_id, delta=delta, **noise_spec)
    return torch.stack(
        [
            F.conv2d(x[i] if x_stacked else x, w, bias, stride, padding, dilation, groups)
            for i, w in enumerate(ws)
        ]
    )


# ------------------------------------------------------------------------------------------------
# sign_step_ (F-LWC, weight PGD)
# ------------------------------------------------------------------------------------------------
SIGN_STEP_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_sign_step(
    deltas: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    eta: float,
    bounds: Sequence[float],
    bound_tensors: Sequence[torch.Tensor | None] | None = None,
    *,
    memory: bool = True,
) -> None:
    """Raise, naming the argument, unless sign_step_ may run on these arguments (the rules of the
    C++ kernels): one grad and one bound per delta; every delta float32 / float64 / float16 /
    bfloat16 on one device; grads[i] like deltas[i] in shape, dtype and device; eta and every bound
    finite and >= 0; ``bound_tensors`` None or one entry per delta, each None (bounds[i] holds) or
    a tensor like deltas[i] in shape, dtype and device. With ``memory``: no delta that overlaps
    itself or another delta, no bound tensor sharing memory with a delta, and every bound tensor's
    entries finite and >= 0 (the one check that reads tensor data; fake tensors skip it). A
    backend that checks first writes nothing when the call is rejected."""
    if not len(deltas) == len(grads) == len(bounds):
        raise ValueError(
            "deltas, grads and bounds need one entry per tensor, got "
            f"{len(deltas)} deltas, {len(grads)} grads and {len(bounds)} bounds"
        )
    if bound_tensors is not None and len(bound_tensors) != len(deltas):
        raise ValueError(
            f"bound_tensors needs one entry (a tensor or None) per delta, got "
            f"{len(bound_tensors)} for {len(deltas)} deltas"
        )
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be finite and >= 0, got {eta}")
    spans, bound_spans = [], []
    for i, (d, g, b) in enumerate(zip(deltas, grads, bounds, strict=True)):
        for name, t in (("deltas", d), ("grads", g)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if not math.isfinite(b) or b < 0:
            raise ValueError(f"bounds[{i}] must be finite and >= 0, got {b}")
        if d.device != deltas[0].device:
            raise ValueError(
                f"deltas[{i}] is on {d.device} but deltas[0] is on {deltas[0].device} "
                "(all deltas must be on one device)"
            )
        if g.device != d.device:
            raise ValueError(f"grads[{i}] is on {g.device} but deltas[{i}] is on {d.device}")
        if d.dtype not in SIGN_STEP_DTYPES:
            raise TypeError(
                f"deltas[{i}] must be float32, float64, float16 or bfloat16, got {d.dtype}"
            )
        if g.dtype != d.dtype:
            raise TypeError(f"grads[{i}] dtype {g.dtype} must match deltas[{i}] dtype {d.dtype}")
        if g.shape != d.shape:
            raise ValueError(
                f"grads[{i}] shape {tuple(g.shape)} must equal deltas[{i}] shape {tuple(d.shape)}"
            )
        bt = None if bound_tensors is None else bound_tensors[i]
        if bt is not None:
            if not isinstance(bt, torch.Tensor):
                raise TypeError(
                    f"bound_tensors[{i}] must be a torch.Tensor or None, got {type(bt).__name__}"
                )
            if bt.device != d.device:
                raise ValueError(
                    f"bound_tensors[{i}] is on {bt.device} but deltas[{i}] is on {d.device}"
                )
            if bt.dtype != d.dtype:
                raise TypeError(
                    f"bound_tensors[{i}] dtype {bt.dtype} must match deltas[{i}] dtype {d.dtype}"
                )
            if bt.shape != d.shape:
                raise ValueError(
                    f"bound_tensors[{i}] shape {tuple(bt.shape)} must equal deltas[{i}] shape "
                    f"{tuple(d.shape)}"
                )
        if memory and d.numel() > 0:
            if torch._debug_has_internal_overlap(d) == 1:
                raise ValueError(
                    f"deltas[{i}] has elements that share memory (an expanded view?); "
                    "it cannot be written"
                )
            spans.append((*_span(d), i))
            if bt is not None:
                if not bool((bt >= 0).all()) or not bool(torch.isfinite(bt).all()):
                    raise ValueError(
                        f"bound_tensors[{i}] must be finite and >= 0 everywhere (it has a "
                        "negative, NaN or infinite entry)"
                    )
                bound_spans.append((*_span(bt), i))
    spans.sort()
    for (_, end, i), (start, _, j) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise ValueError(
                f"deltas[{i}] and deltas[{j}] overlap in memory; every delta must be a "
                "separate tensor"
            )
    for b_start, b_end, i in bound_spans:
        for start, end, j in spans:
            if b_start < end and start < b_end:
                raise ValueError(
                    f"bound_tensors[{i}] shares memory with deltas[{j}], which is written"
                )


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) of a non-empty tensor with non-negative strides."""
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def sign_step_(
    deltas: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    eta: float,
    bounds: Sequence[float],
    bound_tensors: Sequence[torch.Tensor | None] | None = None,
) -> None:
    """deltas[i] ← clamp(deltas[i] − eta·sign(grads[i]), −b_i, b_i) in place, where b_i is
    bound_tensors[i] (per element) when given and bounds[i] otherwise.

    sign(0) = 0 (and sign(NaN) = 0, as torch.sign); a NaN delta stays NaN. The step is computed in
    float64 for float64 deltas and in float32 otherwise (eta rounded to that type, not to float16:
    ATen's CPU ``sub_(..., alpha=eta)`` would round it to the tensor's dtype; a bound tensor
    converted exactly), then rounded once. For float32 / float64 this equals
    ``d.sub_(eta * g.sign()).clamp_(-b, b)``."""
    check_sign_step(deltas, grads, eta, bounds, bound_tensors)
    with torch.no_grad():
        for i, (d, g, b) in enumerate(zip(deltas, grads, bounds, strict=True)):
            acc = torch.float64 if d.dtype == torch.float64 else torch.float32
            step = d.to(acc) - eta * g.sign().to(acc)
            bt = None if bound_tensors is None else bound_tensors[i]
            if bt is None:
                d.copy_(step.clamp_(-b, b))
            else:
                bt = bt.to(acc)
                d.copy_(step.clamp_(min=-bt, max=bt))


# ------------------------------------------------------------------------------------------------
# bitflip / bitflip_ (noisy memory, DESIGN section 5)
# ------------------------------------------------------------------------------------------------
# dtype -> (bits, signed int view of the same width, sign, exponent, mantissa masks). Integer
# dtypes have no exponent or mantissa; unsigned ones have no sign bit.
BITFLIP_FORMATS: dict[torch.dtype, tuple[int, torch.dtype, int, int, int]] = {
    torch.float32: (32, torch.int32, 0x80000000, 0x7F800000, 0x007FFFFF),
    torch.float16: (16, torch.int16, 0x8000, 0x7C00, 0x03FF),
    torch.bfloat16: (16, torch.int16, 0x8000, 0x7F80, 0x007F),
    torch.int8: (8, torch.int8, 0x80, 0, 0),
    torch.uint8: (8, torch.int8, 0, 0, 0),
    torch.int16: (16, torch.int16, 0x8000, 0, 0),
    torch.int32: (32, torch.int32, 0x80000000, 0, 0),
}
# The largest number of elements in one segment of the flip stream, and the expected number of
# candidate flips a segment is cut down to (the work of one thread / lane between two loads of
# the gap table: small enough to balance, large enough that a segment's first draw is amortized).
BITFLIP_MAX_SEGMENT = 65536
BITFLIP_FLIPS_PER_SEGMENT = 64
# Gaps are found by binary search over q^(2^k); 2^22 - 1 exceeds every segment's bit count.
BITFLIP_MAX_LEVELS = 22
_TWO_M53 = 2.0**-53


def bit_mask(dtype: torch.dtype, bits: str | int = "all") -> int:
    """The mask of the bits named by ``bits`` in ``dtype``'s raw representation: "all", "sign",
    "exponent", "mantissa", several joined by "+" ("sign+exponent"), or an int mask (checked)."""
    if dtype not in BITFLIP_FORMATS:
        names = ", ".join(str(d).removeprefix("torch.") for d in BITFLIP_FORMATS)
        raise TypeError(f"bitflip: dtype must be one of {names}, got {dtype}")
    width, _, sign, exponent, mantissa = BITFLIP_FORMATS[dtype]
    full = (1 << width) - 1
    if isinstance(bits, bool):
        raise TypeError(f"mask must be an int or a string, got {bits!r}")
    if isinstance(bits, int):
        if not 0 <= bits <= full:
            raise ValueError(f"mask must be in [0, {full:#x}] for {dtype}, got {bits:#x}")
        return bits
    if not isinstance(bits, str):
        raise TypeError(f"mask must be an int or a string, got {bits!r}")
    parts = {"all": full, "sign": sign, "exponent": exponent, "mantissa": mantissa}
    mask = 0
    for name in bits.split("+"):
        name = name.strip().lower()
        if name not in parts:
            raise ValueError(
                f"mask {bits!r}: {name!r} is not one of 'all', 'sign', 'exponent', 'mantissa'"
            )
        if parts[name] == 0:
            raise ValueError(f"mask {bits!r}: {dtype} has no {name} bits")
        mask |= parts[name]
    return mask


def check_bitflip(t: torch.Tensor, p01: float, p10: float, mask: int) -> None:
    """Raise, naming the argument, unless bitflip may run: ``t`` a tensor of a supported dtype;
    p01 and p10 in [0, 1] (not NaN); ``mask`` within the dtype's bits."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"bitflip: t must be a torch.Tensor, got {type(t).__name__}")
    bit_mask(t.dtype, mask)
    for name, p in (("p01", p01), ("p10", p10)):
        if not 0.0 <= p <= 1.0:  # also false for NaN
            raise ValueError(f"bitflip: {name} must be a probability in [0, 1], got {p}")


def bitflip_segment(pmax: float, m: int) -> int:
    """Elements per segment: the largest power of two <= BITFLIP_MAX_SEGMENT whose expected
    number of candidate flips, E * m * pmax, is <= BITFLIP_FLIPS_PER_SEGMENT (or 1)."""
    e = BITFLIP_MAX_SEGMENT
    while e > 1 and e * m * pmax > BITFLIP_FLIPS_PER_SEGMENT:
        e //= 2
    return e


def bitflip_gap_table(pmax: float) -> list[float]:
    """q^(2^k), q = 1 - pmax, for the levels k that a 53-bit uniform can reach (at most 22)."""
    table, t = [], 1.0 - pmax
    while len(table) < BITFLIP_MAX_LEVELS and t >= _TWO_M53:
        table.append(t)
        t = t * t
    return table


def bitflip_gaps(table: Sequence[float], u: torch.Tensor) -> torch.Tensor:
    """Geometric gaps G with P(G >= g) = q^g from 53-bit uniforms u in (0, 1]: the largest g
    (< 2^len(table)) with q^g >= u, found bit by bit from the top level down. Only float64
    products and comparisons, so every backend that keeps this order gets the same gaps."""
    acc = torch.ones_like(u)
    gap = torch.zeros(u.shape, dtype=torch.int64, device=u.device)
    for level in range(len(table) - 1, -1, -1):
        cand = acc * table[level]
        take = cand >= u
        acc = torch.where(take, cand, acc)
        gap = gap + (take.to(torch.int64) << level)
    return gap


def _u53(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """53 random bits (hi's 32 and lo's top 21) as an int64 in [0, 2^53)."""
    return (hi << 21) | (lo >> 11)


def bitflip_(
    t: torch.Tensor,
    p01: float,
    p10: float,
    mask: int,
    seed: int,
    layer_id: int = 0,
    zero_nonfinite: bool = False,
) -> torch.Tensor:
    """Flip bits of ``t``'s raw representation in place; returns the number of flips (int64).

    The bits eligible under ``mask`` (positions b_0 < ... < b_{m-1}) of element i (flat,
    row-major) are the stream positions i·m + r. Elements are cut into segments of E =
    bitflip_segment(max(p01, p10), m) elements; segment s draws candidate positions one after
    the other, gaps G with P(G >= g) = (1 − pmax)^g (bitflip_gaps), from the Philox block
    randint4x(stream_seed(seed, layer_id), (s << 32) | d) of its d-th candidate: words 0 and 1 give
    the gap uniform u = (u53 + 1)·2^-53, words 2 and 3 the thinning uniform v = u53·2^-53. A
    candidate bit that is 0 flips if v < p01 / pmax, one that is 1 if v < p10 / pmax (so p01 =
    p10 flips every candidate). With ``zero_nonfinite``, a float element that a flip made NaN or
    ±Inf becomes +0 (still counted); otherwise it stays as the flip left it."""
    check_bitflip(t, p01, p10, mask)
    count = torch.zeros((), dtype=torch.int64, device=t.device)
    pmax = max(p01, p10)
    width, view_dtype, _, exponent, _ = BITFLIP_FORMATS[t.dtype]
    positions = [b for b in range(width) if (mask >> b) & 1]
    m, n = len(positions), t.numel()
    if pmax == 0.0 or m == 0 or n == 0:
        return count
    stream = stream_seed(seed, layer_id)
    table = bitflip_gap_table(pmax)
    e = bitflip_segment(pmax, m)
    n_seg = (n + e - 1) // e
    seg = torch.arange(n_seg, dtype=torch.int64, device=t.device)
    seg_len = torch.clamp_max(n - seg * e, e) * m  # positions per segment
    cur = torch.zeros_like(seg)
    active = torch.ones(n_seg, dtype=torch.bool, device=t.device)
    elems, bits, accept_v = [], [], []
    draw = 0
    while bool(active.any()):
        x0, x1, x2, x3 = randint4x(stream, (seg << 32) | draw)
        u = (_u53(x0, x1) + 1).to(torch.float64) * _TWO_M53
        v = _u53(x2, x3).to(torch.float64) * _TWO_M53
        pos = cur + bitflip_gaps(table, u)
        active = active & (pos < seg_len)
        elems.append((seg * e + pos // m)[active])
        bits.append((pos % m)[active])
        accept_v.append(v[active])
        cur = pos + 1
        draw += 1
    elem, r, v = torch.cat(elems), torch.cat(bits), torch.cat(accept_v)
    bit = torch.tensor(positions, dtype=torch.int64, device=t.device)[r]
    with torch.no_grad():
        flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)
        raw = flat.view(view_dtype).to(torch.int64) & ((1 << width) - 1)
        was_one = ((raw[elem] >> bit) & 1) == 1
        ratio = torch.where(was_one, p10 / pmax, p01 / pmax).to(torch.float64)
        keep = v < ratio
        elem, bit = elem[keep], bit[keep]
        flips = torch.zeros(n, dtype=torch.int64, device=t.device)
        flips.index_put_((elem,), torch.ones_like(bit) << bit, accumulate=True)  # distinct bits
        raw = raw ^ flips
        if zero_nonfinite and exponent:
            bad = (flips != 0) & ((raw & exponent) == exponent)
            raw = torch.where(bad, torch.zeros_like(raw), raw)
        # Back to the signed view's range, then to the tensor's own bits.
        signed = torch.where(raw >= 1 << (width - 1), raw - (1 << width), raw)
        flat.view(view_dtype).copy_(signed.to(view_dtype))
        if flat.data_ptr() != t.data_ptr() or not t.is_contiguous():
            t.copy_(flat.view(t.shape))
    count.fill_(int(keep.sum()))
    return count


def bitflip(
    t: torch.Tensor,
    p01: float,
    p10: float,
    mask: int,
    seed: int,
    layer_id: int = 0,
    zero_nonfinite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A flipped copy of ``t`` and the number of flips (bitflip_ on a clone)."""
    check_bitflip(t, p01, p10, mask)
    out = t.clone(memory_format=torch.contiguous_format)
    return out, bitflip_(out, p01, p10, mask, seed, layer_id, zero_nonfinite)


# ------------------------------------------------------------------------------------------------
# Becker–LeCun curvature ops: hdiag_linear / hdiag_conv2d / curv_backward_linear / _conv2d
# ------------------------------------------------------------------------------------------------
def _check_curv_pair(op: str, a: torch.Tensor, b: torch.Tensor, an: str, bn: str) -> None:
    for name, t in ((an, a), (bn, b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if a.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: {an} must be float32 or float64, got {a.dtype}")
    if b.dtype != a.dtype:
        raise TypeError(f"{op}: {bn} dtype {b.dtype} must match {an} dtype {a.dtype}")
    if b.device != a.device:
        raise ValueError(f"{op}: {bn} is on {b.device} but {an} is on {a.device}")


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _check_conv_args(op: str, kernel, stride, padding, dilation, groups: int) -> None:
    for name, v, low in (
        ("kernel_size", kernel, 1),
        ("stride", stride, 1),
        ("padding", padding, 0),
        ("dilation", dilation, 1),
    ):
        if len(v) != 2 or any(int(e) < low for e in v):
            raise ValueError(f"{op}: {name} must be two ints >= {low}, got {list(v)}")
    if groups < 1:
        raise ValueError(f"{op}: groups must be >= 1, got {groups}")


def check_hdiag_linear(x: torch.Tensor, s_out: torch.Tensor) -> None:
    """The argument checks of hdiag_linear (same exception types as the C++ kernels)."""
    op = "hdiag_linear"
    _check_curv_pair(op, x, s_out, "x", "s_out")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension, got a scalar")
    if s_out.dim() != x.dim() or s_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"{op}: s_out shape {list(s_out.shape)} must be x shape {list(x.shape)} with the "
            "last dimension replaced by out_features"
        )


def check_curv_backward_linear(s_out: torch.Tensor, weight: torch.Tensor) -> None:
    """The argument checks of curv_backward_linear."""
    op = "curv_backward_linear"
    _check_curv_pair(op, s_out, weight, "s_out", "weight")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D (out, in), got shape {list(weight.shape)}")
    if s_out.dim() < 1 or s_out.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"{op}: s_out shape {list(s_out.shape)} must end in out_features = {weight.shape[0]}"
        )


def check_hdiag_conv2d(x, s_out, kernel_size, stride, padding, dilation, groups) -> None:
    """The argument checks of hdiag_conv2d."""
    op = "hdiag_conv2d"
    _check_curv_pair(op, x, s_out, "x", "s_out")
    _check_conv_args(op, kernel_size, stride, padding, dilation, groups)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be (N, C, H, W), got shape {list(x.shape)}")
    if s_out.dim() != 4:
        raise ValueError(f"{op}: s_out must be (N, O, OH, OW), got shape {list(s_out.shape)}")
    if x.shape[1] % groups or s_out.shape[1] % groups:
        raise ValueError(
            f"{op}: groups {groups} must divide the channels of x ({x.shape[1]}) and s_out "
            f"({s_out.shape[1]})"
        )
    oh, ow = (
        _conv_out(x.shape[2 + k], kernel_size[k], stride[k], padding[k], dilation[k])
        for k in range(2)
    )
    if oh < 1 or ow < 1:
        raise ValueError(f"{op}: the kernel does not fit the padded input {list(x.shape)}")
    if s_out.shape[0] != x.shape[0] or tuple(s_out.shape[2:]) != (oh, ow):
        raise ValueError(
            f"{op}: s_out shape {list(s_out.shape)} must be ({x.shape[0]}, O, {oh}, {ow}) for x "
            f"shape {list(x.shape)}"
        )


def check_curv_backward_conv2d(s_out, weight, input_size, stride, padding, dilation, groups):
    """The argument checks of curv_backward_conv2d."""
    op = "curv_backward_conv2d"
    _check_curv_pair(op, s_out, weight, "s_out", "weight")
    if weight.dim() != 4:
        raise ValueError(
            f"{op}: weight must be (O, C/groups, kh, kw), got shape {list(weight.shape)}"
        )
    _check_conv_args(op, weight.shape[2:], stride, padding, dilation, groups)
    if s_out.dim() != 4:
        raise ValueError(f"{op}: s_out must be (N, O, OH, OW), got shape {list(s_out.shape)}")
    if weight.shape[0] % groups:
        raise ValueError(f"{op}: groups {groups} must divide out_channels {weight.shape[0]}")
    if s_out.shape[1] != weight.shape[0]:
        raise ValueError(
            f"{op}: s_out has {s_out.shape[1]} channels, weight has out_channels {weight.shape[0]}"
        )
    if len(input_size) != 2 or min(input_size) < 1:
        raise ValueError(f"{op}: input_size must be positive, got {list(input_size)}")
    want = tuple(
        _conv_out(input_size[k], weight.shape[2 + k], stride[k], padding[k], dilation[k])
        for k in range(2)
    )
    if tuple(s_out.shape[2:]) != want:
        raise ValueError(
            f"{op}: s_out spatial size {tuple(s_out.shape[2:])} must be {want} for input_size "
            f"{list(input_size)}"
        )


def hdiag_linear(x: torch.Tensor, s_out: torch.Tensor) -> torch.Tensor:
    """H[o, i] = Σ_n s_out[n, o] · x[n, i]² over all leading dims: shape (out, in)."""
    check_hdiag_linear(x, s_out)
    return s_out.reshape(-1, s_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).square()


def hdiag_conv2d(x, s_out, kernel_size, stride, padding, dilation, groups) -> torch.Tensor:
    """Σ_n,p s_out[n, o, p] · unfold(x)²: the weight gradient of conv2d on x² with output
    gradient s_out, shape (O, C/groups, kh, kw)."""
    check_hdiag_conv2d(x, s_out, kernel_size, stride, padding, dilation, groups)
    shape = (s_out.shape[1], x.shape[1] // groups, *kernel_size)
    return torch.nn.grad.conv2d_weight(
        x.square(), shape, s_out, list(stride), list(padding), list(dilation), groups
    )


def curv_backward_linear(s_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """S_in = s_out · W² (per sample (W²)ᵀ S_out): shape (..., in)."""
    check_curv_backward_linear(s_out, weight)
    return s_out @ weight.square()


def curv_backward_conv2d(s_out, weight, input_size, stride, padding, dilation, groups):
    """S_in: the input gradient of conv2d with weight W² and output gradient s_out, shape
    (N, C, H, W) for input_size (H, W)."""
    check_curv_backward_conv2d(s_out, weight, input_size, stride, padding, dilation, groups)
    shape = (s_out.shape[0], weight.shape[1] * groups, *input_size)
    return torch.nn.grad.conv2d_input(
        shape, weight.square(), s_out, list(stride), list(padding), list(dilation), groups
    )
