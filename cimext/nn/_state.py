"""Noise modes of the CiM layers and the per-forward bookkeeping the context managers share."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..device import DeviceModel

_M64 = 2**64 - 1


# A compiled forward takes the seed after the previous one plus this (2**64 / golden ratio, as
# an int64 bit pattern): distinct, well spread seeds that the kernels' splitmix64 decorrelates.
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64


def draw_seed_tensor(generator: torch.Generator | None = None) -> torch.Tensor:
    """A 64-bit device-instance seed as a (1,) int64 CPU tensor (its bit pattern), drawn from
    ``generator`` (torch's default generator if None): the seed :func:`draw_seed` gives."""
    dev = generator.device if generator is not None else "cpu"
    hi_lo = torch.randint(0, 2**32, (2,), generator=generator, device=dev, dtype=torch.int64)
    # hi << 32 wraps modulo 2**64 in int64: the bit pattern of the unsigned (hi << 32) | lo.
    return ((hi_lo[:1] << 32) | hi_lo[1:]).cpu()


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A 64-bit device-instance seed from ``generator`` (torch's default generator if None)."""
    return int(draw_seed_tensor(generator)) & _M64


def _peek_seed(generator: torch.Generator | None) -> torch.Tensor:
    """The seed draw_seed_tensor(generator) would return next, without advancing generator."""
    gen = generator if generator is not None else torch.default_generator
    copy = torch.Generator(device=gen.device)
    copy.set_state(gen.get_state())
    return draw_seed_tensor(copy)


class ForwardState:
    """What the CiM layers of one model share within one forward, for one context.

    The context registers a forward pre-hook on the model it was entered on that calls
    :meth:`begin`; nothing is reset after the forward, so modules called again outside it (a
    submodule called directly, activation checkpointing recomputing a segment) continue the last
    forward: same sampling seed, same folded batch size.

    Sampling seeds: an eager forward draws its seed from ``generator``. A forward compiled with
    torch.compile cannot call a generator, so the seeds enter the graph as tensor state: the
    first compiled forward takes the seed the generator would give next, each later one the
    previous seed + _GOLDEN, and on leaving the context the generator is advanced by one draw per
    compiled forward, as eager forwards would have left it. No recompilation per seed, and a
    user's torch.Generator works.

    ``weights`` caches each layer's perturbed weights for a fixed instance (instance modes, no
    gradient needed): built on a layer's first forward in the context, reused while the layer's
    weight, δ, device model and mask stay the same, dropped with the context.
    """

    def __init__(
        self,
        generator: torch.Generator | None = None,
        buffers: dict[int, torch.Tensor] | None = None,
        *,
        sampling: bool = False,
    ) -> None:
        self.generator = generator
        self.sampling = sampling
        self.batch: int | None = None  # B of the current folded forward (instances mode)
        self.seed_t: torch.Tensor | None = None  # sampling seed of the current forward
        if sampling:
            # The next compiled forward's seed and the number of compiled forwards so far.
            self.next_t = _peek_seed(generator)
            self.compiled_t = torch.zeros(1, dtype=torch.int64)
        self.weights: dict[int, tuple[tuple, torch.Tensor]] = {}
        # Storage for the cached weights, by layer; a caller that enters many contexts in a row
        # (Monte Carlo) passes the same dict to each so the storage is allocated once.
        self.buffers: dict[int, torch.Tensor] = {} if buffers is None else buffers

    def begin(self) -> None:
        """Start a new forward of the model (a sampling forward also gets its seed)."""
        self.batch = None
        self.seed_t = self._draw() if self.sampling else None

    def _draw(self) -> torch.Tensor:
        if torch.compiler.is_compiling():
            seed = self.next_t.clone()
            self.next_t.add_(_GOLDEN)
            self.compiled_t.add_(1)
            return seed
        seed = draw_seed_tensor(self.generator)
        self.next_t = _peek_seed(self.generator)
        return seed

    def finish(self) -> None:
        """Leave the context: advance the generator past the compiled forwards' seeds."""
        if self.sampling:
            # One draw per compiled forward, exactly as eager forwards draw (a GPU generator's
            # offset advances per call, not per value).
            for _ in range(int(self.compiled_t)):
                draw_seed_tensor(self.generator)
            self.compiled_t.zero_()

    @property
    def seed(self) -> int | None:
        """The sampling seed of the latest forward, in [0, 2**64) (None before the first)."""
        return None if self.seed_t is None else int(self.seed_t) & _M64

    def sampling_seed(self) -> torch.Tensor:
        """The seed all layers of the current forward share, as a (1,) int64 tensor (drawn on
        first use by a layer called outside a forward of the model)."""
        if self.seed_t is None:
            self.seed_t = self._draw()
        return self.seed_t

    def buffer(self, key: int, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        """A tensor of ``shape`` for layer ``key``, reusing the storage of an earlier one when
        it is large enough (the leading dimension may shrink: the last chunk of instances)."""
        buf = self.buffers.get(key)
        if (
            buf is None
            or buf.dtype != dtype
            or buf.device != torch.device(device)
            or tuple(buf.shape[1:]) != tuple(shape[1:])
            or buf.shape[0] < shape[0]
        ):
            buf = self.buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf[: shape[0]]

    def fold(self, n: int, instances: int) -> bool:
        """Whether an input with leading size ``n`` is already folded (S*B) or a plain batch.

        The first CiM layer of a forward sees B; every later one sees S*B. An input that is not
        S*B (a second branch fed from the raw input) is a plain batch too.
        """
        if self.batch is not None and n == instances * self.batch:
            return True
        self.batch = n
        return False


@dataclass(frozen=True, eq=False)
class Mode:
    """How a CiM layer draws its weight noise; a layer with no Mode computes clean."""

    kind: str  # "instance", "instances" or "sampling"
    state: ForwardState
    # instance / instances: the seeds as an int64 tensor (S,) of bit patterns (S = 1 for
    # "instance"): a tensor so that a compiled model takes other seeds without recompiling.
    seeds: torch.Tensor | None = None
    device: DeviceModel | None = None  # sampling "device" override (None: the layer's own)
    rcg: tuple[float, float] | None = None  # sampling "rcg": (sigma_t, th)
    gaussian: float | None = None  # sampling "gaussian": sigma
    cache: bool = False  # instance modes: reuse perturbed weights when no gradient is needed

    @property
    def seed(self) -> int | None:
        """The seed of an "instance" mode, in [0, 2**64)."""
        return None if self.seeds is None else int(self.seeds[0]) & _M64

    def noise_kwargs(self, layer_device: DeviceModel) -> dict:
        """The noise keywords of the fused ops for this mode."""
        if self.rcg is not None:
            return {"rcg": self.rcg}
        if self.gaussian is not None:
            return {"gaussian": self.gaussian}
        return {"device": self.device if self.device is not None else layer_device}
