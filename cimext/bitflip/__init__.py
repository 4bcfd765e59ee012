"""Bit-flip noise in memory (noisy RRAM reads): ``inject`` a model, ``sweep`` accuracy over the
flip probability and find its ``midpoint`` per storage dtype and bit set."""

from .inject import STORAGE_DTYPES, TARGETS, NoisyMemory, inject
from .study import SweepResult, evaluate, midpoint, sweep

__all__ = [
    "STORAGE_DTYPES",
    "TARGETS",
    "NoisyMemory",
    "SweepResult",
    "evaluate",
    "inject",
    "midpoint",
    "sweep",
]
