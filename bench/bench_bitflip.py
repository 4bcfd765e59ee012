"""Bit flips in memory at p = 1e-6 on a 64 MB float32 tensor (DESIGN section 5, issue 7).

    python bench/bench_bitflip.py            # ~1 min on 2 cores
    python bench/bench_bitflip.py --quick

Providers, interleaved in one process: torch.clone (the bandwidth floor of an out-of-place op),
one uniform per bit in PyTorch (torch.rand per bit, compared with p, packed into an XOR mask;
chunked so memory stays small), and cimext's bitflip (out of place) and bitflip_ (in place),
which draw the gaps between flips. GB/s counts the bytes read plus written (2 x 64 MB, in place
as out of place). "x per-bit" is the per-bit baseline's time over the provider's (the speedup);
"x clone bw" is torch.clone's time over the provider's, i.e. the provider's bandwidth as a
fraction of clone's (>= 0.5: at least half of clone's bandwidth). "peak MB": the peak memory of
one call above the memory in use when it started (bench.timing.peak_memory).
"""

from __future__ import annotations

import argparse
import json
import sys  # noqa: I001
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's cimext, bench

import torch

from bench.timing import format_mb
from bench.timing import interleaved as _interleaved
from cimext import ops


def per_bit_baseline(t: torch.Tensor, p: float, chunk: int = 1 << 18) -> torch.Tensor:
    """One uniform per bit: the plain-PyTorch way to flip every bit with probability p."""
    out = t.clone()
    raw = out.view(torch.int32).reshape(-1)
    weights = torch.ones(32, dtype=torch.int64) << torch.arange(32)
    for i in range(0, raw.numel(), chunk):
        hit = torch.rand(min(chunk, raw.numel() - i), 32) < p
        rows = hit.any(1).nonzero().squeeze(1)
        if rows.numel():
            mask = (hit[rows].to(torch.int64) * weights).sum(1)
            mask = torch.where(mask >= 2**31, mask - 2**32, mask).to(torch.int32)
            raw[i + rows] ^= mask
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--p", type=float, default=1e-6)
    ap.add_argument("--mbytes", type=int, default=64)
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    min_time, rounds = (0.5, 1) if a.quick else (2.0, 3)
    n = a.mbytes * (1 << 20) // 4
    t = torch.randn(n)
    work = t.clone()
    fns = {
        "torch.clone": lambda: t.clone(),
        "per-bit torch.rand": lambda: per_bit_baseline(t, a.p),
        "cimext bitflip": lambda: ops.bitflip(t, a.p, seed=1),
        "cimext bitflip_": lambda: ops.bitflip_(work, a.p, seed=1),
    }
    res = _interleaved(fns, rounds, min_time)
    base = res["per-bit torch.rand"].median_ms
    clone = res["torch.clone"].median_ms
    _, flips = ops.bitflip(t, a.p, seed=1)
    print(
        f"{a.mbytes} MB float32 ({n} elements, {32 * n} bits), p = {a.p:g}: {flips} flips "
        f"(expected {32 * n * a.p:.0f}); {torch.get_num_threads()} threads"
    )
    head = f"{'provider':<20}{'median ms':>11}{'p20':>9}{'p80':>9}{'GB/s':>8}"
    print(head + f"{'x per-bit':>11}{'x clone bw':>12}{'peak MB':>9}")
    rows = {}
    for k, v in res.items():
        gbs = 2 * 4 * n / (v.median_ms * 1e-3) / 1e9
        rows[k] = dict(
            median_ms=v.median_ms,
            p20_ms=v.p20_ms,
            p80_ms=v.p80_ms,
            gb_per_s=gbs,
            speedup_vs_per_bit=base / v.median_ms,
            bandwidth_vs_clone=clone / v.median_ms,
            peak_mb=v.peak_mb,
        )
        print(
            f"{k:<20}{v.median_ms:>11.2f}{v.p20_ms:>9.2f}{v.p80_ms:>9.2f}{gbs:>8.2f}"
            f"{base / v.median_ms:>11.1f}{clone / v.median_ms:>12.2f}{format_mb(v.peak_mb):>9}"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(p=a.p, mbytes=a.mbytes, flips=flips, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
