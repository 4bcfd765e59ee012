"""CPU perturbed_linear against clean F.linear and against its floor (clean GEMM + the normals).

    python bench/bench_linear_floor.py                       # (256, 4608, 512), S = 1
    python bench/bench_linear_floor.py --simd 1,2 --json out/floor.json

Rows, timed in interleaved rounds in one process (median of the per-round medians):
- ``clean``: F.linear(x, W, b);
- ``normals``: the generator alone, ``ops.gaussian_noise(W, ..., out=buf)`` into a preallocated
  buffer (Philox + Box-Muller for every weight, no allocation, no GEMM);
- ``floor`` = clean + normals: what any kernel that draws every weight's normal and then runs the
  clean GEMM must spend;
- ``perturbed_linear`` with a DeviceModel (one normal per weight), one row per SIMD level of the
  generator (``--simd``: 0 scalar, 1 AVX2, 2 AVX-512; a level the CPU lacks runs lower).
The table gives each row's ratio to clean and to the floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cimext  # noqa: E402
from cimext import ops  # noqa: E402

LEVELS = {0: "scalar", 1: "avx2", 2: "avx512"}


def _median_ms(fn, reps: int, clock) -> float:
    ts = []
    for _ in range(reps):
        t0 = clock()
        fn()
        ts.append((clock() - t0) * 1e3)
    return statistics.median(ts)


def run(
    shape, simd_levels, rounds: int, reps: int, seeds: int = 1, clock=time.perf_counter
) -> dict:
    """{name: median ms} and the SIMD level each perturbed row really used."""
    batch, inp, out = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, inp, generator=g)
    w = torch.randn(out, inp, generator=g) * 0.05
    b = torch.randn(out, generator=g)
    scale = float(w.abs().max())
    dev = cimext.DeviceModel(sigma=0.1)
    seed_list = list(range(1, seeds + 1))
    buf = torch.empty(seeds, out, inp)

    def clean():
        for _ in range(seeds):
            F.linear(x, w, b)

    def normals():
        ops.gaussian_noise(w, 0.1, seeds=seed_list, scale=scale, out=buf)

    fns = {"clean": clean, "normals": normals}
    used = {}
    prev = torch.ops.cimext._set_cpu_simd(2)
    try:
        for level in simd_levels:
            torch.ops.cimext._set_cpu_simd(level)
            used[level] = int(torch.ops.cimext._cpu_simd())

            def pl(level=level):
                torch.ops.cimext._set_cpu_simd(level)
                ops.perturbed_linear(x, w, b, device=dev, seeds=seed_list, scale=scale)

            fns[f"perturbed_linear {LEVELS[used[level]]}"] = pl
        # The normals row uses the widest level asked for.
        top = max(simd_levels)

        def normals_at_top():
            torch.ops.cimext._set_cpu_simd(top)
            normals()

        fns["normals"] = normals_at_top
        for fn in fns.values():  # warm-up: page in buffers, oneDNN primitives
            fn()
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                samples[name].append(_median_ms(fn, reps, clock))
    finally:
        torch.ops.cimext._set_cpu_simd(prev)
    res = {k: statistics.median(v) for k, v in samples.items()}
    res["floor"] = res["clean"] + res["normals"]
    return dict(ms=res, spread={k: (min(v), max(v)) for k, v in samples.items()}, simd=used)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="256,4608,512", help="batch,in,out")
    p.add_argument("--seeds", type=int, default=1, help="S instances per call")
    p.add_argument("--simd", default="1,2", help="generator levels to time (0,1,2)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=5, help="calls per row per round")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the process CPU clock instead of the wall clock: on a machine shared "
        "with other work it leaves out the time spent waiting for a core (use with --threads 1)",
    )
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    shape = tuple(int(v) for v in a.shape.split(","))
    if len(shape) != 3:
        p.error("--shape takes batch,in,out")
    levels = sorted({int(v) for v in a.simd.split(",")})
    if not set(levels) <= set(LEVELS):
        p.error("--simd levels are 0, 1, 2")
    clock = time.process_time if a.cpu_time else time.perf_counter
    r = run(shape, levels, a.rounds, a.reps, a.seeds, clock)
    ms = r["ms"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, shape (batch, in, out) = "
        f"{shape}, S = {a.seeds}, {a.rounds} rounds x {a.reps} calls, "
        f"{'process CPU' if a.cpu_time else 'wall'} clock"
    )
    head = f"{'row':28} {'median ms':>10} {'min':>8} {'max':>8} {'x clean':>8} {'x floor':>8}"
    print(head)
    print("-" * len(head))
    for name, t in ms.items():
        lo, hi = r["spread"].get(name, (t, t))
        print(
            f"{name:28} {t:10.3f} {lo:8.3f} {hi:8.3f} {t / ms['clean']:8.3f} {t / ms['floor']:8.3f}"
        )
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(
                dict(
                    shape=shape,
                    seeds=a.seeds,
                    threads=torch.get_num_threads(),
                    torch=torch.__version__,
                    clock="process_cpu" if a.cpu_time else "wall",
                    **r,
                ),
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
