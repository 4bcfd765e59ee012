"""GPU benchmark: the perturbed ops against cuBLAS / cuDNN clean, CUDA and Triton side by side, and
Monte Carlo of LeNet against a per-instance PyTorch loop on the same GPU.

    python bench/bench_gpu.py --json out/bench_gpu.json            # on a machine with a GPU
    python bench/bench_gpu.py --device cpu --quick                 # dry run of every code path

Every figure is a ratio against a baseline timed in the same process, in interleaved rounds:
- ``linear`` / ``conv2d``: perturbed_linear / perturbed_conv2d with a DeviceModel (σ = 0.1, one
  fresh ΔW per call) against F.linear / F.conv2d on the clean weight, float32 and bfloat16, S = 1
  (and S = 8 where marked); rows per backend ("cpp" = the CUDA kernels, "triton").
- ``mc``: cimext.worstcase.monte_carlo of LeNet (28x28) over the images at n instances, against
  the usual script (per instance: W + σ·s·ε into the plain model, then every batch), instances per
  second each, and the extrapolated time of the paper's 100,000-instance run.
A case that fails is recorded with its error and the run goes on; the JSON is rewritten after every
case, so a run stopped by a time limit keeps what it measured. ``--budget`` skips the cases that
would start after that many seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cimext  # noqa: E402  (this checkout's cimext, wherever the script is run from)
from cimext import ops  # noqa: E402

SIGMA = 0.1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (M, K, N): x (M, K) @ W (N, K)^T; the first is the figure.
LINEAR_SHAPES = [(4096, 4096, 4096), (256, 4608, 512), (8192, 1024, 1024)]
LINEAR_SHAPES_QUICK = [(64, 96, 80)]
# (batch, C_in, H, W, C_out, k)
CONV_SHAPES = [(128, 64, 32, 32, 64, 3), (64, 256, 28, 28, 256, 3)]
CONV_SHAPES_QUICK = [(4, 8, 9, 9, 16, 3)]


class Timer:
    """Median milliseconds of repeated calls; CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, min_time: float, min_reps: int = 3):
        self.device, self.min_time, self.min_reps = device, min_time, min_reps

    def __call__(self, fn: Callable[[], object]) -> list[float]:
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < self.min_reps or time.perf_counter() - start < self.min_time:
            if self.device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            if len(times) >= 200:
                break
        return times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: dict[str, Callable[[], object]], device, rounds: int, min_time: float, min_reps: int = 3
):
    """{name: {median_ms, p20_ms, p80_ms, warmup_s, peak_mb} or {error}}: one warm-up call each
    (Triton compiles and autotunes there), then alternating timed rounds."""
    out: dict[str, dict] = {}
    live: dict[str, Callable[[], object]] = {}
    for name, fn in fns.items():
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            out[name] = dict(warmup_s=time.perf_counter() - t0)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) - base
                out[name]["peak_mb"] = peak / 2**20
            live[name] = fn
        except Exception as e:  # a failing provider is reported, the others still run
            out[name] = dict(error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
    timer = Timer(device, min_time / max(1, rounds), min_reps)
    samples: dict[str, list[float]] = {k: [] for k in live}
    for _ in range(rounds):
        for name, fn in live.items():
            try:
                samples[name] += timer(fn)
            except Exception as e:
                out[name] = dict(error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
    for name, ts in samples.items():
        if "error" in out[name] or not ts:
            continue
        q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else ts * 9
        out[name].update(median_ms=statistics.median(ts), p20_ms=q[1], p80_ms=q[7])
    return out


def backends(device: torch.device) -> list[str]:
    """The backends of the cimext rows: the CUDA kernels (when built) and Triton on a GPU, the
    C++ kernels and Triton (interpreted) on the CPU."""
    return ["cpp", "triton"]


def _on(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with cimext.backend(backend):
            return fn()

    return run


def case_linear(shape, dtype_name, S, device, min_time, rounds) -> list[dict]:
    m, k, n = shape
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(device, dtype)
    b = (0.1 * torch.randn(n, generator=g)).to(device, dtype)
    scale = float(w.float().abs().max())  # the layer's full scale, fixed when it is programmed
    dev = cimext.DeviceModel(sigma=SIGMA)
    seeds = list(range(1, S + 1))

    def clean():
        for _ in range(S):
            F.linear(x, w, b)

    fns = {"clean": clean}
    for be in backends(device):
        fns[f"cimext-{be}"] = _on(
            be, lambda: ops.perturbed_linear(x, w, b, device=dev, seeds=seeds, scale=scale)
        )
    res = interleaved(fns, device, rounds, min_time)
    flops = 2.0 * m * k * n * S
    return _rows(f"linear {m}x{k}x{n} {dtype_name} S={S}", res, flops)


def case_conv(shape, dtype_name, S, device, min_time, rounds) -> list[dict]:
    nb, cin, h, wd, cout, ks = shape
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(nb, cin, h, wd, generator=g).to(device, dtype)
    w = (torch.randn(cout, cin, ks, ks, generator=g) / math.sqrt(cin * ks * ks)).to(device, dtype)
    scale = float(w.float().abs().max())
    dev = cimext.DeviceModel(sigma=SIGMA)
    seeds = list(range(1, S + 1))
    pad = ks // 2

    def clean():
        for _ in range(S):
            F.conv2d(x, w, None, 1, pad)

    fns = {"clean": clean}
    for be in backends(device):
        fns[f"cimext-{be}"] = _on(
            be,
            lambda: ops.perturbed_conv2d(x, w, None, 1, pad, device=dev, seeds=seeds, scale=scale),
        )
    res = interleaved(fns, device, rounds, min_time)
    flops = 2.0 * nb * cin * h * wd * cout * ks * ks * S
    return _rows(f"conv2d {ks}x{ks} {cin}->{cout} {h}x{wd} b={nb} {dtype_name} S={S}", res, flops)


def _rows(case: str, res: dict, flops: float) -> list[dict]:
    rows = []
    clean = res.get("clean", {}).get("median_ms")
    for provider, r in res.items():
        row = dict(case=case, provider=provider, **r)
        if "median_ms" in r:
            row["tflops"] = flops / (r["median_ms"] * 1e-3) / 1e12
            if clean and provider != "clean":
                row["vs_clean"] = r["median_ms"] / clean
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ Monte Carlo
def _plain_loop(plain, layers, batches, std_rel, seeds, device) -> list[float]:
    """The usual research script on the GPU: per instance, W + σ·s·ε written into the plain
    model's weights, then every batch; returns the per-instance accuracies."""
    saved = [m.weight.detach().clone() for m in layers]
    scales = [float(w.abs().max()) for w in saved]
    samples = sum(int(y.numel()) for _, y in batches)
    accs = []
    gen = torch.Generator(device=device)
    with torch.no_grad():
        for s in seeds:
            gen.manual_seed(s)
            for m, w, sc in zip(layers, saved, scales, strict=True):
                m.weight.copy_(
                    w + (std_rel * sc) * torch.randn(w.shape, generator=gen, device=device)
                )
            hits = torch.zeros((), dtype=torch.int64, device=device)
            for x, y in batches:
                hits += (plain(x).argmax(-1) == y).sum()
            accs.append(int(hits) / samples)
        for m, w in zip(layers, saved, strict=True):
            m.weight.copy_(w)
    return accs


def case_mc(images, n, loop_n, batch, device, reps: int = 1) -> list[dict]:
    from cimext.worstcase import monte_carlo

    torch.manual_seed(0)
    plain = cimext.models.lenet().to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(images, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (images,), generator=g).to(device)
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, images, batch)]
    conv = cimext.convert(copy.deepcopy(plain)).eval()
    dev = cimext.DeviceModel(sigma=SIGMA)
    # The device model's fast path: one Gaussian per weight with this std relative to s_l.
    levels = 2**dev.weight_bits - 1
    k = dev.bits_per_device
    std_rel = SIGMA * math.sqrt(sum(4 ** (d * k) for d in range(dev.weight_bits // k))) / levels
    layers = [m for m in plain.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    case = f"monte carlo lenet {images} images b={batch}"
    rows = []

    def clean():
        with torch.no_grad():
            for xb, _ in batches:
                plain(xb)

    # Warm-ups: kernels, cuDNN algorithm choice, Triton compiles.
    clean()
    _plain_loop(plain, layers, batches, std_rel, [0], device)
    monte_carlo(conv, batches, dev, 2, progress=False)
    sync(device)
    t_clean = min(_wall(clean, device) for _ in range(3))
    rows.append(dict(case=case, provider="clean forward", seconds=t_clean))

    t_loop = min(
        _wall(lambda: _plain_loop(plain, layers, batches, std_rel, range(loop_n), device), device)
        for _ in range(reps)
    )
    loop_rate = loop_n / t_loop
    rows.append(
        dict(
            case=case,
            provider="per-instance loop",
            instances=loop_n,
            seconds=t_loop,
            instances_per_s=loop_rate,
            vs_clean_forward=t_loop / loop_n / t_clean,
            hours_for_100k=1e5 / loop_rate / 3600,
        )
    )
    res = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    res = monte_carlo(conv, batches, dev, n, progress=False)
    sync(device)
    t_mc = time.perf_counter() - t0
    mc_rate = n / t_mc
    row = dict(
        case=case,
        provider="cimext monte_carlo",
        instances=n,
        seconds=t_mc,
        instances_per_s=mc_rate,
        vs_clean_forward=t_mc / n / t_clean,
        speedup_vs_loop=mc_rate / loop_rate,
        minutes_for_100k=1e5 / mc_rate / 60,
        mean_accuracy=res.mean,
        settings=res.settings,
    )
    if device.type == "cuda":
        row["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    rows.append(row)
    return rows


def _wall(fn: Callable[[], object], device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------ driver
def plan(a) -> list[tuple[str, Callable[[], list[dict]]]]:
    """The cases in priority order (the issue's figures first: a run cut short by --budget keeps
    them): linear 4096^3 fp32 / bf16, Monte Carlo, conv2d, the other linear shapes."""
    device = torch.device(a.device)
    quick = a.quick
    min_time, rounds = (0.0, 1) if quick else (a.min_time, 3)
    dtypes = ["fp32"] if device.type == "cpu" else ["fp32", "bf16"]
    linear = LINEAR_SHAPES_QUICK if quick else LINEAR_SHAPES
    first: list[tuple[str, Callable[[], list[dict]]]] = []
    later: list[tuple[str, Callable[[], list[dict]]]] = []
    if "linear" in a.only:
        for i, shape in enumerate(linear):
            for dt in dtypes:
                (first if i == 0 else later).append(
                    (
                        f"linear {shape} {dt}",
                        lambda s=shape, d=dt: case_linear(s, d, 1, device, min_time, rounds),
                    )
                )
        n_seeds = 2 if quick else 8
        later.append(
            (
                f"linear {linear[-1]} fp32 S={n_seeds}",
                lambda s=linear[-1]: case_linear(s, "fp32", n_seeds, device, min_time, rounds),
            )
        )
    if "mc" in a.only:
        images, n, loop_n = (64, 4, 2) if quick else (a.mc_images, a.mc_instances, a.loop_instances)
        batch = min(a.mc_batch, images)
        first.append(
            (
                f"monte carlo lenet {images} images n={n}",
                lambda: case_mc(images, n, loop_n, batch, device),
            )
        )
    conv: list[tuple[str, Callable[[], list[dict]]]] = []
    if "conv" in a.only:
        for shape in CONV_SHAPES_QUICK if quick else CONV_SHAPES:
            for dt in dtypes:
                conv.append(
                    (
                        f"conv2d {shape} {dt}",
                        lambda s=shape, d=dt: case_conv(s, d, 1, device, min_time, rounds),
                    )
                )
    return first + conv + later


def format_rows(rows: list[dict]) -> str:
    head = f"{'case':44} {'provider':20} {'median ms':>10} {'TFLOP/s':>8} {'x':>18} {'peak MB':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:44} {r['provider']:20} ERROR {r['error'][:80]}")
            continue
        if "instances_per_s" in r:
            x = f"{r['speedup_vs_loop']:.1f}x vs loop" if "speedup_vs_loop" in r else ""
            lines.append(
                f"{r['case']:44} {r['provider']:20} {r['instances_per_s']:10.1f} inst/s "
                f"({r['vs_clean_forward']:.2f} clean passes per instance) {x}"
            )
            continue
        if "median_ms" not in r:
            lines.append(f"{r['case']:44} {r['provider']:20} {r.get('seconds', 0) * 1e3:10.3f}")
            continue
        x = f"{r['vs_clean']:.2f} vs clean" if "vs_clean" in r else ""
        peak = f"{r['peak_mb']:.0f}" if "peak_mb" in r else ""
        lines.append(
            f"{r['case']:44} {r['provider']:20} {r['median_ms']:10.3f} {r.get('tflops', 0):8.2f} "
            f"{x:>18} {peak:>8}"
        )
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    env = dict(
        torch=torch.__version__,
        cuda=torch.version.cuda,
        device=str(device),
        python=sys.version.split()[0],
        cimext=cimext.__file__,
    )
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda_kernels_built"] = torch._C._dispatch_has_kernel_for_dispatch_key(
            "cimext::perturbed_linear", "CUDA"
        )
        # float32 GEMMs are timed as torch runs them by default (IEEE, no TF32); record which.
        matmul = torch.backends.cuda.matmul
        try:
            env["fp32_matmul"] = getattr(matmul, "fp32_precision", None) or (
                "tf32" if matmul.allow_tf32 else "ieee"
            )
        except Exception as e:  # the setting's API moved between torch versions
            env["fp32_matmul"] = f"unknown ({type(e).__name__})"
    else:
        env["threads"] = torch.get_num_threads()
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions")
    p.add_argument("--only", default="linear,conv,mc", help="comma list of linear, conv, mc")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON (after every case)")
    p.add_argument("--budget", type=float, default=None, help="seconds; later cases are skipped")
    p.add_argument("--min-time", type=float, default=0.6, help="timed seconds per case")
    p.add_argument("--mc-images", type=int, default=10_000)
    p.add_argument("--mc-instances", type=int, default=1_000)
    p.add_argument("--loop-instances", type=int, default=50, help="instances the loop times")
    p.add_argument("--mc-batch", type=int, default=2_000, help="images per batch (both sides)")
    a = p.parse_args(argv)
    a.only = {s.strip() for s in a.only.split(",") if s.strip()}
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available (use --device cpu for a dry run)")
    if device.type == "cpu":
        # Triton's interpreter; cimext imports triton only on first use, so this is in time.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    env = environment(device)
    print("bench_gpu:", ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    t_start = time.perf_counter()
    rows: list[dict] = []
    skipped: list[str] = []

    def write():
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            tmp = a.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(dict(env=env, rows=rows, skipped=skipped), f, indent=1, default=str)
            os.replace(tmp, a.json)

    for name, fn in plan(a):
        if a.budget is not None and time.perf_counter() - t_start > a.budget:
            skipped.append(name)
            print(f"bench_gpu: skipped {name} (past the {a.budget:.0f} s budget)", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            new = fn()
        except Exception as e:
            traceback.print_exc()
            new = [dict(case=name, provider="-", error=f"{type(e).__name__}: {e}"[:300])]
        for r in new:
            r["case_seconds"] = time.perf_counter() - t0
        rows.extend(new)
        print(format_rows(new).split("\n", 2)[-1], flush=True)
        write()
    print()
    print(format_rows(rows))
    write()
    failed = [r for r in rows if "error" in r]
    print(f"bench_gpu: {len(rows)} rows, {len(failed)} errors, {len(skipped)} cases skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
