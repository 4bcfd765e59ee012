"""The timing code every benchmark under bench/ shares: medians and 20/80 % quantiles of
repeated calls, functions timed in interleaved rounds in one process (so drifts in machine speed
hit all alike), and the peak memory of one call."""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    # Peak memory of one call above what was in use when it started (see peak_memory), MiB;
    # None where it cannot be measured.
    peak_mb: float | None = None


#: Where the timed calls run; CUDA timings synchronize. Set by the suites (set_device).
DEVICE = torch.device("cpu")


def set_device(device) -> torch.device:
    """Time calls on ``device`` from now on (CUDA calls synchronize before the clock stops)."""
    global DEVICE
    DEVICE = torch.device(device)
    return DEVICE


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _status_kb(field: str) -> int | None:
    """A field of /proc/self/status in kB (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    """Hand memory that malloc keeps for reuse back to the system (glibc), so that the next
    call's allocations show up in the resident set instead of reusing freed pages unseen."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident set (VmHWM) to the current one (Linux >= 4.0)."""
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], object], device: torch.device | None = None):
    """(fn's result, peak MiB): how far memory use rose above its level at the call's start.

    CUDA: torch.cuda.max_memory_allocated (tensors). CPU (Linux): the process's peak resident
    set (VmHWM, reset before the call, after malloc returned its free memory to the system) over
    the resident set at the start: every allocation that touched pages, tensors and library
    scratch alike. None where neither is available."""
    device = torch.device(device) if device is not None else DEVICE
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _status_kb("VmRSS")
    if base is None or not _reset_peak_rss():
        return fn(), None
    base = _status_kb("VmRSS")
    out = fn()
    peak = _status_kb("VmHWM")
    return out, None if peak is None else max(0, peak - base) / 1024


def measure(fn: Callable[[], object], *, min_time: float = 0.5, min_reps: int = 5) -> Timing:
    """Median / 20 % / 80 % of repeated calls after one warm-up call, whose peak memory is
    measured (peak_memory)."""
    if DEVICE.type == "cuda":
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()

    _, peak = peak_memory(fn)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 200:
            break
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return Timing(statistics.median(times), q[1], q[7], peak)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, min_time: float) -> dict:
    """Time several functions in alternating rounds so drifts in machine speed hit all alike."""
    samples: dict[str, list[Timing]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(measure(fn, min_time=min_time / rounds))
    out = {}
    for name, ts in samples.items():
        peaks = [t.peak_mb for t in ts if t.peak_mb is not None]
        out[name] = Timing(
            statistics.median(t.median_ms for t in ts),
            min(t.p20_ms for t in ts),
            max(t.p80_ms for t in ts),
            max(peaks) if peaks else None,
        )
    return out


def interleaved_calls(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, Timing]:
    """For long calls (seconds): one warm-up call of each function (its peak memory measured),
    then ``rounds`` rounds of one call each, alternating, each round starting one function later
    (so that no function always runs first or after the same one); median and min / max."""
    peaks = {}
    for name, fn in fns.items():
        _, peaks[name] = peak_memory(lambda fn=fn: (fn(), _sync()))
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            _sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: Timing(statistics.median(v), min(v), max(v), peaks[k]) for k, v in times.items()}


def format_mb(mb: float | None) -> str:
    """A peak-memory cell: MiB with one decimal, or "n/a"."""
    return "n/a" if mb is None else f"{mb:.1f}"


# The name the benchmarks used before this module existed.
_interleaved = interleaved
