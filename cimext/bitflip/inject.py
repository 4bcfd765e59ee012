"""``inject``: a context in which a model reads its weights (and optionally its activations)
through noisy memory, every read a fresh draw of bit flips in the storage format."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..ops.bitflip import _probability, bit_mask, bitflip

# Storage formats of the study: the float types as they are, int8 as per-tensor symmetric codes.
STORAGE_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
}
TARGETS = ("weights", "activations", "both")
_READ_SHIFT = 24  # layer_id of a read: (read number << 24) | tensor number


def check_storage(dtype: str, bits: str | int) -> tuple[torch.dtype, int]:
    """(storage torch dtype, bit mask), or a ValueError naming the bad argument."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    store = STORAGE_DTYPES[dtype]
    return store, bit_mask(store, bits)


def to_storage(x: torch.Tensor, store: torch.dtype) -> tuple[torch.Tensor, float | None]:
    """(codes, scale): x in the storage dtype; int8 is per-tensor symmetric post-training
    quantization, x ≈ codes · scale with codes in [-127, 127] (the scale is not noisy)."""
    if store != torch.int8:
        return x.detach().to(store), None
    amax = float(x.detach().abs().max()) if x.numel() else 0.0
    scale = amax / 127.0 if amax > 0 and amax == amax else 1.0
    codes = torch.round(x.detach() / scale).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def from_storage(codes: torch.Tensor, scale: float | None, like: torch.Tensor) -> torch.Tensor:
    out = codes.to(like.dtype)
    return out if scale is None else out * scale


class NoisyMemory:
    """The state of one ``inject`` context: stored images of the model's tensors and a read
    counter, so that every read draws new flips and the whole run is reproducible."""

    def __init__(self, p01, p10, mask, store, seed, zero_nonfinite):
        self.p01, self.p10, self.mask, self.store = p01, p10, mask, store
        self.seed, self.zero_nonfinite = seed, zero_nonfinite
        self.reads = 0
        self.flips = 0

    def read(self, codes: torch.Tensor, scale, like: torch.Tensor, tensor_id: int) -> torch.Tensor:
        self.reads += 1
        if self.p01 > 0 or self.p10 > 0:
            codes, n = bitflip(
                codes,
                seed=self.seed,
                mask=self.mask,
                p01=self.p01,
                p10=self.p10,
                layer_id=(self.reads << _READ_SHIFT) | tensor_id,
                zero_nonfinite=self.zero_nonfinite,
            )
            self.flips += n
        return from_storage(codes, scale, like)


@contextlib.contextmanager
def inject(
    model: nn.Module,
    p: float | None = None,
    *,
    bits: str | int = "all",
    dtype: str = "float32",
    targets: str = "weights",
    seed: int = 0,
    p01: float | None = None,
    p10: float | None = None,
    zero_nonfinite: bool = False,
) -> Iterator[NoisyMemory]:
    """Inside the block, every forward of ``model`` reads its parameters and floating-point
    buffers ("weights"), the inputs of its Linear / Conv layers ("activations"), or both, from a
    memory holding them in ``dtype`` ("float32", "float16", "bfloat16" or "int8": per-tensor
    symmetric codes) whose ``bits`` ("all", "sign", "exponent", "mantissa", or an int mask) flip
    with probability p (p01 / p10 per direction) on every read. Yields the NoisyMemory (``.flips``
    counts the flips so far). The model's own tensors are unchanged after the block."""
    if p is None and (p01 is None or p10 is None):
        raise TypeError("inject: give p, or both p01 and p10")
    p01 = _probability("p01" if p is None else "p", p if p01 is None else p01)
    p10 = _probability("p10" if p is None else "p", p if p10 is None else p10)
    store, mask = check_storage(dtype, bits)
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    mem = NoisyMemory(p01, p10, mask, store, seed, zero_nonfinite)
    handles = []
    originals: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, its own data)
    next_id = 0
    if targets in ("weights", "both"):
        for module in model.modules():
            own = [
                t
                for t in list(module.parameters(recurse=False)) + list(module.buffers(False))
                if t.is_floating_point()
            ]
            if not own:
                continue
            images = []
            for t in own:
                codes, scale = to_storage(t, store)
                images.append((t, t.data, codes, scale, next_id))
                originals.append((t, t.data))
                next_id += 1

            def swap_in(mod, args, images=images):
                for t, data, codes, scale, tid in images:
                    t.data = mem.read(codes, scale, data, tid)

            def swap_out(mod, args, out, images=images):
                for t, data, *_ in images:
                    t.data = data

            handles.append(module.register_forward_pre_hook(swap_in))
            handles.append(module.register_forward_hook(swap_out))
    if targets in ("activations", "both"):
        for module in model.modules():
            if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                continue
            tid = next_id
            next_id += 1

            def noisy_input(mod, args, tid=tid):
                x = args[0]
                if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
                    return None
                codes, scale = to_storage(x, store)
                return (mem.read(codes, scale, x, tid),) + tuple(args[1:])

            handles.append(module.register_forward_pre_hook(noisy_input))
    try:
        yield mem
    finally:
        for h in handles:
            h.remove()
        for t, data in originals:
            t.data = data
