"""Kernel benchmarks: each cimext op against its baselines, timed in the same process.

Run ``cimext bench`` (or ``python bench/suite.py``); bench/bench_perturbed.py runs the same
cases under pytest-benchmark. Every row reports the median time, the 20/80 % quantiles and an ``x``
column: the op's time over the baseline's (``vs clean``: the lower bound, plain F.linear /
F.conv2d on the unperturbed weight) or the naive PyTorch version's time over the op's
(``speedup``), and the peak memory of one call above the memory in use when it started
(``peak MB``, see :func:`peak_memory`).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: this checkout's cimext and bench packages
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import timing as T  # noqa: E402
from bench.hessian import bench_obd  # noqa: E402
from bench.timing import (  # noqa: E402, F401  (re-exported for the bench_*.py scripts)
    Timing,
    format_mb,
    interleaved,
    interleaved_calls,
    measure,
    peak_memory,
)
from cimext import models, ops  # noqa: E402
from cimext.backend import backend as use_backend  # noqa: E402
from cimext.nn import convert  # noqa: E402
from cimext.train import METHODS, StepContext  # noqa: E402

LINEAR_SHAPES = [(256, 4608, 512), (64, 1024, 1024), (1024, 784, 120)]
CONV_SHAPE = (128, 64, 32, 32, 64, 3)  # batch, C_in, H, W, C_out, k
SIGMA = 0.05


def bench_linear(batch: int, inp: int, out: int, S: int, *, min_time: float, rounds: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, inp, generator=g).to(T.DEVICE)
    w = (torch.randn(out, inp, generator=g) * 0.05).to(T.DEVICE)
    b = torch.randn(out, generator=g).to(T.DEVICE)
    seeds = list(range(S))

    def clean():
        for _ in range(S):
            F.linear(x, w, b)

    def naive():
        for _ in range(S):
            F.linear(x, w + SIGMA * w.abs().max() * torch.randn_like(w), b)

    def fused():
        ops.perturbed_linear(x, w, b, gaussian=SIGMA, seeds=seeds)

    return interleaved({"clean": clean, "naive": naive, "cimext": fused}, rounds, min_time)


def bench_conv(S: int, *, min_time: float, rounds: int):
    n, cin, h, wd, cout, k = CONV_SHAPE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, h, wd, generator=g).to(T.DEVICE)
    w = (torch.randn(cout, cin, k, k, generator=g) * 0.05).to(T.DEVICE)
    seeds = list(range(S))

    def clean():
        for _ in range(S):
            F.conv2d(x, w, None, 1, 1)

    def naive():
        for _ in range(S):
            F.conv2d(x, w + SIGMA * w.abs().max() * torch.randn_like(w), None, 1, 1)

    def fused():
        ops.perturbed_conv2d(x, w, None, 1, 1, gaussian=SIGMA, seeds=seeds)

    return interleaved({"clean": clean, "naive": naive, "cimext": fused}, rounds, min_time)


def bench_noise(n: int, *, min_time: float, rounds: int):
    """n normals: torch.randn, ops.gaussian_noise into a fresh tensor, and into a reused one
    (out=: no page faults of a fresh allocation, which dominate at tens of MB)."""
    w = torch.ones(n, device=T.DEVICE)
    buf = torch.zeros(n, device=T.DEVICE)  # touched: resident before any timed call

    def randn():
        torch.randn(n, device=T.DEVICE)

    def fused():
        ops.gaussian_noise(w, 1.0, 1, scale=1.0)

    def fused_out():
        ops.gaussian_noise(w, 1.0, 1, scale=1.0, out=buf)

    fns = {"torch.randn": randn, "cimext": fused, "cimext out=": fused_out}
    return interleaved(fns, rounds, min_time)


SIGN_STEP_MODELS = ("lenet", "resnet18")


def sign_step_shapes(model: str) -> list[torch.Size]:
    """The parameter shapes of a model from cimext.models: the tensor list one F-LWC / PGD step
    updates (lenet: 10 tensors, 62K elements; resnet18: 62 tensors, 11.2M elements)."""
    return [p.shape for p in getattr(models, model)().parameters()]


def bench_sign_step(model: str = "resnet18", *, min_time: float, rounds: int):
    """ops.sign_step_ on every parameter-shaped delta of ``model`` against the naive per-tensor
    PyTorch loop (a temporary for eta * sign(g), then two in-place passes per tensor)."""
    shapes = sign_step_shapes(model)
    g = torch.Generator().manual_seed(0)
    deltas = [(0.01 * torch.randn(s, generator=g)).to(T.DEVICE) for s in shapes]
    grads = [torch.randn(s, generator=g).to(T.DEVICE) for s in shapes]
    bounds = [0.01 * (1 + i % 3) for i in range(len(shapes))]
    eta = 0.003

    def naive():
        for d, gr, b in zip(deltas, grads, bounds, strict=True):
            d.sub_(eta * gr.sign()).clamp_(-b, b)

    def fused():
        ops.sign_step_(deltas, grads, eta, bounds)

    return interleaved({"naive": naive, "cimext": fused}, rounds, min_time)


# Training-step cases: case-name suffix -> method of cimext.train (device / rcg noise are the
# va / trice steps; adv / atrice add the sign-step perturbation search).
TRAIN_STEP_CASES = {"device": "va", "rcg": "trice", "adv": "adv", "atrice": "atrice"}


def bench_train_step(method: str, *, min_time: float, rounds: int, batch: int = 128):
    """One optimizer step of LeNet (28x28) with training ``method`` on the converted model
    ("va": fresh device noise every forward, "trice": RCG noise σ_t = 0.1, th = 1, "adv" /
    "atrice" with α = 0.5: sign-step perturbation search, adversarial pass and, for atrice, an
    RCG noise pass), against a vanilla step of the plain model."""
    torch.manual_seed(0)
    plain = models.lenet().to(T.DEVICE)
    conv = convert(copy.deepcopy(plain))
    x = torch.randn(batch, 1, 28, 28, device=T.DEVICE)
    y = torch.randint(0, 10, (batch,), device=T.DEVICE)
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

    return interleaved(
        {"clean": lambda: step(plain, "vanilla"), "cimext": lambda: step(conv, method)},
        rounds,
        min_time,
    )


def _bench_obd(*, min_time: float, rounds: int) -> dict:
    return bench_obd(batch=256, min_time=min_time, rounds=rounds, device=T.DEVICE)


def build_cases(quick: bool, min_time: float, rounds: int) -> list:
    """The cases as (name, run, kind, work) tuples (see run)."""
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
    return cases


def case_names(quick: bool = False, match: str | None = None) -> list[str]:
    """The names of the cases (those containing ``match``, if given)."""
    names = [c[0] for c in build_cases(quick, 0.0, 1)]
    return [n for n in names if match is None or match in n]


def run(
    quick: bool = False, backend: str = "auto", device: str = "cpu", only: str | None = None
) -> list[dict]:
    """Run every case on ``device`` (only those whose name contains ``only``, if given); returns
    one row per (case, provider). ``backend="all"`` times every backend available there side by
    side (cpp and triton on CUDA)."""
    T.set_device(device)
    if backend == "all":
        names = ["cpp", "triton"] if T.DEVICE.type == "cuda" else ["cpp"]
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
    cases = build_cases(quick, min_time, rounds)
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


def main(argv: list[str] | None = None) -> int:
    """``python bench/suite.py [options]``: the same as ``cimext bench [options]``."""
    from cimext.cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
