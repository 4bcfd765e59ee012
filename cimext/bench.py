"""Kernel benchmarks: each cimext op against its baselines, timed in the same process.

Run ``cimext bench`` (or ``python -m cimext.bench``); bench/bench_perturbed.py runs the same cases
under pytest-benchmark. Every row reports the median time, the 20/80 % quantiles and an ``x``
column: the op's time over the baseline's (``vs clean``: the lower bound, plain F.linear /
F.conv2d on the unperturbed weight) or the naive PyTorch version's time over the op's
(``speedup``), and the peak memory of one call above the memory in use when it started
(``peak MB``, see :func:`peak_memory`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import ops
from .backend import backend as use_backend

LINEAR_SHAPES = [(256, 4608, 512), (64, 1024, 1024), (1024, 784, 120)]
CONV_SHAPE = (128, 64, 32, 32, 64, 3)  # batch, C_in, H, W, C_out, k
SIGMA = 0.05


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    # Peak memory of one call above what was in use when it started (see peak_memory), MiB;
    # None where it cannot be measured.
    peak_mb: float | None = None


DEVICE = torch.device("cpu")


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
        import ctypes

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


def _interleaved(fns: dict[str, Callable[[], object]], rounds: int, min_time: float) -> dict:
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


def bench_linear(batch: int, inp: int, out: int, S: int, *, min_time: float, rounds: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, inp, generator=g).to(DEVICE)
    w = (torch.randn(out, inp, generator=g) * 0.05).to(DEVICE)
    b = torch.randn(out, generator=g).to(DEVICE)
    seeds = list(range(S))

    def clean():
        for _ in range(S):
            F.linear(x, w, b)

    def naive():
        for _ in range(S):
            F.linear(x, w + SIGMA * w.abs().max() * torch.randn_like(w), b)

    def fused():
        ops.perturbed_linear(x, w, b, gaussian=SIGMA, seeds=seeds)

    return _interleaved({"clean": clean, "naive": naive, "cimext": fused}, rounds, min_time)


def bench_conv(S: int, *, min_time: float, rounds: int):
    n, cin, h, wd, cout, k = CONV_SHAPE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, h, wd, generator=g).to(DEVICE)
    w = (torch.randn(cout, cin, k, k, generator=g) * 0.05).to(DEVICE)
    seeds = list(range(S))

    def clean():
        for _ in range(S):
            F.conv2d(x, w, None, 1, 1)

    def naive():
        for _ in range(S):
            F.conv2d(x, w + SIGMA * w.abs().max() * torch.randn_like(w), None, 1, 1)

    def fused():
        ops.perturbed_conv2d(x, w, None, 1, 1, gaussian=SIGMA, seeds=seeds)

    return _interleaved({"clean": clean, "naive": naive, "cimext": fused}, rounds, min_time)


def bench_noise(n: int, *, min_time: float, rounds: int):
    """n normals: torch.randn, ops.gaussian_noise into a fresh tensor, and into a reused one
    (out=: no page faults of a fresh allocation, which dominate at tens of MB)."""
    w = torch.ones(n, device=DEVICE)
    buf = torch.zeros(n, device=DEVICE)  # touched: resident before any timed call

    def randn():
        torch.randn(n, device=DEVICE)

    def fused():
        ops.gaussian_noise(w, 1.0, 1, scale=1.0)

    def fused_out():
        ops.gaussian_noise(w, 1.0, 1, scale=1.0, out=buf)

    fns = {"torch.randn": randn, "cimext": fused, "cimext out=": fused_out}
    return _interleaved(fns, rounds, min_time)


SIGN_STEP_MODELS = ("lenet", "resnet18")


def sign_step_shapes(model: str) -> list[torch.Size]:
    """The parameter shapes of a model from cimext.models: the tensor list one F-LWC / PGD step
    updates (lenet: 10 tensors, 62K elements; resnet18: 62 tensors, 11.2M elements)."""
    from . import models

    return [p.shape for p in getattr(models, model)().parameters()]


def bench_sign_step(model: str = "resnet18", *, min_time: float, rounds: int):
    """ops.sign_step_ on every parameter-shaped delta of ``model`` against the naive per-tensor
    PyTorch loop (a temporary for eta * sign(g), then two in-place passes per tensor)."""
    shapes = sign_step_shapes(model)
    g = torch.Generator().manual_seed(0)
    deltas = [(0.01 * torch.randn(s, generator=g)).to(DEVICE) for s in shapes]
    grads = [torch.randn(s, generator=g).to(DEVICE) for s in shapes]
    bounds = [0.01 * (1 + i % 3) for i in range(len(shapes))]
    eta = 0.003

    def naive():
        for d, gr, b in zip(deltas, grads, bounds, strict=True):
            d.sub_(eta * gr.sign()).clamp_(-b, b)

    def fused():
        ops.sign_step_(deltas, grads, eta, bounds)

    return _interleaved({"naive": naive, "cimext": fused}, rounds, min_time)


# Training-step cases: case-name suffix -> method of cimext.train (device / rcg noise are the
# va / trice steps; adv / atrice add the sign-step perturbation search).
TRAIN_STEP_CASES = {"device": "va", "rcg": "trice", "adv": "adv", "atrice": "atrice"}


def bench_train_step(method: str, *, min_time: float, rounds: int, batch: int = 128):
    """One optimizer step of LeNet (28x28) with training ``method`` on the converted model
    ("va": fresh device noise every forward, "trice": RCG noise σ_t = 0.1, th = 1, "adv" /
    "atrice" with α = 0.5: sign-step perturbation search, adversarial pass and, for atrice, an
    RCG noise pass), against a vanilla step of the plain model."""
    import copy

    from . import models
    from .nn import convert
    from .train import METHODS, StepContext

    torch.manual_seed(0)
    plain = models.lenet().to(DEVICE)
    conv = convert(copy.deepcopy(plain))
    x = torch.randn(batch, 1, 28, 28, device=DEVICE)
    y = torch.randint(0, 10, (batch,), device=DEVICE)
    opts = {id(m): torch.optim.SGD(m.parameters(), lr=1e-3) for m in (plain, conv)}
    settings = dict(th_g=0.03, step_size=0.03, adv_steps=1, kappa=0.0, alpha=0.5)
    settings.update(sigma_t=0.1, th_rcg=1.0, device=None)
    gen = torch.Generator().manual_seed(0)

    def step(m, name):
        opt = opts[id(m)]
        loss = METHODS[name](m, x, y, StepContext(settings, 0, 0, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _interleaved(
        {"clean": lambda: step(plain, "vanilla"), "cimext": lambda: step(conv, method)},
        rounds,
        min_time,
    )


def _bench_obd(*, min_time: float, rounds: int) -> dict:
    from .writeverify.bench import bench_obd

    return bench_obd(batch=256, min_time=min_time, rounds=rounds, device=DEVICE)


def run(
    quick: bool = False, backend: str = "auto", device: str = "cpu", only: str | None = None
) -> list[dict]:
    """Run every case on ``device`` (only those whose name contains ``only``, if given); returns
    one row per (case, provider). ``backend="all"`` times every backend available there side by
    side (cpp and triton on CUDA)."""
    global DEVICE
    DEVICE = torch.device(device)
    if backend == "all":
        names = ["cpp", "triton"] if DEVICE.type == "cuda" else ["cpp"]
        rows = []
        for name in names:
            for r in run(quick, name, device, only):
                if r["provider"].startswith("cimext"):
                    r["provider"] = f"cimext-{name}" + r["provider"][len("cimext") :]
                    rows.append(r)
                elif name == names[0]:
                    rows.append(r)
        return sorted(rows, key=lambda r: r["case"])
    min_time, rounds = (0.3, 2) if quick else (1.5, 3)
    # (name, run, kind, work): "gemm" rows (work = FLOPs) get GFLOP/s and ratios against clean
    # and naive, "ratio" rows only the ratio against clean, "noise" rows (work = samples) G/s,
    # "bytes" rows (work = bytes read and written) GB/s and the speedup over naive.
    cases: list[tuple[str, Callable[[], dict], str, float]] = []
    for batch, inp, out in LINEAR_SHAPES:
        for S in (1, 8):
            if quick and S == 8 and inp * out > 1e6:
                continue
            flops = 2.0 * batch * inp * out * S
            cases.append(
                (
                    f"linear b={batch} in={inp} out={out} S={S}",
                    lambda b=batch, i=inp, o=out, s=S: bench_linear(
                        b, i, o, s, min_time=min_time, rounds=rounds
                    ),
                    "gemm",
                    flops,
                )
            )
    n, cin, h, wd, cout, k = CONV_SHAPE
    conv_flops = 2.0 * n * cin * h * wd * cout * k * k
    for S in (1,) if quick else (1, 8):
        cases.append(
            (
                f"conv2d 3x3 {cin}->{cout} {h}x{wd} b={n} S={S}",
                lambda s=S: bench_conv(s, min_time=min_time, rounds=rounds),
                "gemm",
                conv_flops * S,
            )
        )
    for suffix, method in TRAIN_STEP_CASES.items():
        cases.append(
            (
                f"train step lenet b=128 {suffix}",
                lambda m=method: bench_train_step(m, min_time=min_time, rounds=rounds),
                "ratio",
                0.0,
            )
        )
    # Hessian diagonal ("obd", cimext.writeverify) against one forward + backward of LeNet.
    cases.append(
        (
            "hessian obd lenet b=256",
            lambda: _bench_obd(min_time=min_time, rounds=rounds),
            "ratio",
            0.0,
        )
    )
    for n_noise in (1 << 22,) if quick else (1 << 22, 1 << 26):
        cases.append(
            (
                f"noise n={n_noise}",
                lambda n=n_noise: bench_noise(n, min_time=min_time, rounds=rounds),
                "noise",
                float(n_noise),
            )
        )
    for model in SIGN_STEP_MODELS:
        shapes = sign_step_shapes(model)
        elements = sum(s.numel() for s in shapes)
        cases.append(
            (
                f"sign_step_ {model} {len(shapes)} tensors {elements / 1e6:.2f}M",
                lambda m=model: bench_sign_step(m, min_time=min_time, rounds=rounds),
                "bytes",
                3.0 * 4 * elements,  # float32: read delta and grad, write delta
            )
        )
    if only is not None:
        cases = [c for c in cases if only in c[0]]
    rows = []
    with use_backend(backend):
        for name, fn, kind, work in cases:
            res = fn()
            for provider, t in res.items():
                row = dict(case=name, provider=provider, **asdict(t))
                if kind == "noise":
                    row["g_per_s"] = work / (t.median_ms * 1e-3) / 1e9
                    if provider.startswith("cimext"):
                        row["speedup_vs_naive"] = res["torch.randn"].median_ms / t.median_ms
                elif kind == "bytes":
                    row["gb_per_s"] = work / (t.median_ms * 1e-3) / 1e9
                    if provider == "cimext":
                        row["speedup_vs_naive"] = res["naive"].median_ms / t.median_ms
                else:
                    row["vs_clean"] = t.median_ms / res["clean"].median_ms
                if kind == "gemm":
                    row["gflops"] = work / (t.median_ms * 1e-3) / 1e9
                    if provider == "cimext":
                        row["speedup_vs_naive"] = res["naive"].median_ms / t.median_ms
                rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of the rows from run()."""
    head = (
        f"{'case':40} {'provider':12} {'median ms':>10} {'p20':>8} {'p80':>8} {'rate':>14} "
        f"{'x':>16} {'peak MB':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "gflops" in r:
            rate = f"{r['gflops']:.1f} GFLOP/s"
        elif "g_per_s" in r:
            rate = f"{r['g_per_s']:.3f} G/s"
        elif "gb_per_s" in r:
            rate = f"{r['gb_per_s']:.1f} GB/s"
        else:
            rate = ""
        if "vs_clean" in r and r["provider"] != "clean":
            x = f"{r['vs_clean']:.2f} vs clean"
        else:
            x = ""
        if "speedup_vs_naive" in r:
            x = (x + "; " if x else "") + f"{r['speedup_vs_naive']:.1f}x faster"
        lines.append(
            f"{r['case']:40} {r['provider']:12} {r['median_ms']:10.3f} {r['p20_ms']:8.3f} "
            f"{r['p80_ms']:8.3f} {rate:>14} {x:>16} {format_mb(r.get('peak_mb')):>8}"
        )
    return "\n".join(lines)


def format_mb(mb: float | None) -> str:
    """A peak-memory cell: MiB with one decimal, or "n/a"."""
    return "n/a" if mb is None else f"{mb:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cimext bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "cpp", "triton", "ref", "all"],
        help="backend of the cimext rows; 'all' puts every available backend side by side",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--case", metavar="TEXT", help="only the cases whose name contains TEXT")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available")
    where = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}, "
        f"backend {a.backend}"
    )
    rows = run(quick=a.quick, backend=a.backend, device=a.device, only=a.case)
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            meta = dict(torch=torch.__version__, threads=torch.get_num_threads())
            json.dump(dict(meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
