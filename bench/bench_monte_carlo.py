"""Monte Carlo cost per device instance against one clean forward pass and a plain PyTorch loop.

    python bench/bench_monte_carlo.py                  # LeNet and ResNet-18 (~10 min on 2 cores)
    python bench/bench_monte_carlo.py --model lenet --sweep none --rounds 5   # headline only
    python bench/bench_monte_carlo.py --model lenet --quick
    python bench/bench_monte_carlo.py --memory         # peak memory, n = 4 vs n = 1,000

Timings (interleaved rounds in one process, inputs N(0, 1), batches of 256; LeNet: 10,000 images
of 1x28x28, ResNet-18 width 64: 512 images of 3x32x32), every row per device instance (the
clean forward: per pass over the data):

- clean forward: the plain (unconverted) model over the data, torch.no_grad: the floor.
- plain loop: what a research script does per instance: copy W + σ_w·ε into the plain model's
  weights (torch.randn), then run it over the data.
- monte_carlo: cimext.worstcase.monte_carlo with its defaults (device noise of the same std).
- monte_carlo k=K: the same with K instances per forward (the sweep that sets its default).

``x clean`` is each row's time over the clean forward's, ``x loop`` over the plain loop's;
``peak MB`` is the peak memory of one call above the memory in use when it started
(bench.timing.peak_memory). ``--memory`` runs monte_carlo of ResNet-18 (width 64, 8 images) with
n = 4 and n = 1,000 at 4 instances per forward, and n = 1,000 with the default (tuned), each in a
fresh process, and prints the peak memory of each call (k: instances per forward).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's cimext, bench

import torch

import cimext
from bench import suite as B
from cimext.worstcase import monte_carlo

# The module (its name is shadowed by the function in cimext.worstcase): tuning constants.
MC = importlib.import_module("cimext.worstcase.monte_carlo")

DEVICE_MODEL = cimext.DeviceModel(weight_bits=8, bits_per_device=2, sigma=0.1)
CASES = {
    # model: (builder, images, image shape, instances per timed call)
    "lenet": (lambda: cimext.models.lenet(), 10_000, (1, 28, 28), 8),
    "resnet18": (lambda: cimext.models.resnet18(width=1.0), 512, (3, 32, 32), 2),
}
SWEEP = {"lenet": (1, 2, 4, 8, 16), "resnet18": (1, 2, 4)}


def weight_std(device: cimext.DeviceModel) -> float:
    """σ_w / s: the std of one weight's device noise relative to the full scale (the fast path
    of DESIGN section 3: one Gaussian per weight)."""
    levels = 2**device.weight_bits - 1
    d = device.weight_bits // device.bits_per_device
    sum4 = sum(4 ** (i * device.bits_per_device) for i in range(d))
    return device.sigma * sum4**0.5 / levels


def plain_loop(plain, layers, originals, batches, std: float, n: int) -> None:
    """Per instance: W + std·max|W|·ε copied into the plain model, then the data (no cimext)."""
    with torch.no_grad():
        for _ in range(n):
            for m, w0 in zip(layers, originals, strict=True):
                m.weight.copy_(w0 + torch.randn_like(w0) * (std * float(w0.abs().max())))
            for x, _ in batches:
                plain(x).argmax(-1)
        for m, w0 in zip(layers, originals, strict=True):
            m.weight.copy_(w0)


def setup(model_name: str, images: int | None = None, batch: int = 256):
    build, n_images, shape, _ = CASES[model_name]
    n_images = images or n_images
    torch.manual_seed(0)
    plain = build().eval()
    x = torch.randn(n_images, *shape)
    y = torch.randint(0, 10, (n_images,))
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, n_images, batch)]
    conv = cimext.convert(copy.deepcopy(plain), device=DEVICE_MODEL)
    return plain, conv, batches


def bench_case(model_name: str, *, quick: bool, sweep: tuple[int, ...], rounds: int) -> list[dict]:
    quick_images = {"lenet": 2048, "resnet18": 256}
    plain, conv, batches = setup(model_name, images=quick_images[model_name] if quick else None)
    n = CASES[model_name][3]
    layers = [m for m in plain.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    originals = [m.weight.detach().clone() for m in layers]
    std = weight_std(DEVICE_MODEL)

    def clean():  # n passes, so that every timed call is about as long
        with torch.no_grad():
            for _ in range(n):
                for xb, _ in batches:
                    plain(xb).argmax(-1)

    settings: dict = {}

    def mc(k=None):
        # clean_accuracy=False: the per-instance cost, without the one clean pass per call
        # that a run of n instances amortizes over n.
        kw = dict(instances_per_call=k, progress=False, clean_accuracy=False)
        return monte_carlo(conv, batches, DEVICE_MODEL, n, **kw)

    def mc_default():
        settings.update(mc().settings)

    # The default measures instances per forward on the first chunks of a long enough run and
    # remembers the choice: one such run on part of the data (up to 1,024 samples, at most half)
    # stands in for a user's first long run.
    samples = sum(len(yb) for _, yb in batches)
    prime = batches[: max(1, min(1024, samples // 2) // len(batches[0][1]))]
    n_tune = sum(MC.TUNE_CANDIDATES)
    tuned = monte_carlo(conv, prime, DEVICE_MODEL, n_tune, progress=False).settings["tuned"]

    fns = {
        "clean forward": clean,
        "plain loop": lambda: plain_loop(plain, layers, originals, batches, std, n),
        "monte_carlo": mc_default,
    }
    for k in sweep:
        fns[f"monte_carlo k={k}"] = lambda k=k: mc(k)
    res = B.interleaved_calls(fns, rounds)
    samples = sum(len(yb) for _, yb in batches)
    case = f"{model_name} {samples}x{tuple(batches[0][0].shape[1:])} b={len(batches[0][1])}"
    base = res["clean forward"].median_ms / n
    loop = res["plain loop"].median_ms / n
    rows = []
    for name, t in res.items():
        per = n
        rows.append(
            dict(
                case=case,
                provider=name,
                ms_per_instance=t.median_ms / per,
                min_ms=t.p20_ms / per,
                max_ms=t.p80_ms / per,
                x_clean=t.median_ms / per / base,
                x_loop=t.median_ms / per / loop,
                peak_mb=t.peak_mb,
                instances_per_timed_call=per,
            )
        )
    rows[2]["provider"] = f"monte_carlo (k={settings['instances_per_call']})"
    rows[2]["tuning_ms_per_instance"] = {k: v * 1e3 for k, v in tuned.items()}
    return rows


MEMORY_SNIPPET = """
import json, sys, torch
sys.path.insert(0, {bench!r})
import bench_monte_carlo as M
from bench import suite as B
_, conv, batches = M.setup("resnet18", images=8, batch=8)
M.monte_carlo(conv, batches, M.DEVICE_MODEL, 2, progress=False)  # warm-up: lazy inits
kw = dict(instances_per_call={k}, progress=False)
res, peak = B.peak_memory(lambda: M.monte_carlo(conv, batches, M.DEVICE_MODEL, {n}, **kw))
print(json.dumps(dict(n={n}, peak_mb=peak, seconds=res.seconds,
                      instances_per_call=res.settings["instances_per_call"])))
"""


def bench_memory(runs=((4, 4), (1000, 4), (1000, None))) -> list[dict]:
    """Peak memory of monte_carlo on ResNet-18 (width 64, 8 images) for each (n, instances per
    forward; None: the default, tuned), each in a fresh process so that nothing an earlier run
    left resident hides an allocation."""
    import os

    rows = []
    here = os.path.dirname(os.path.abspath(__file__))
    for n, k in runs:
        code = MEMORY_SNIPPET.format(bench=here, n=n, k=k)
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def format_rows(rows: list[dict]) -> str:
    head = (
        f"{'case':34} {'provider':20} {'ms/instance':>12} {'min':>9} {'max':>9} "
        f"{'x clean':>8} {'x loop':>7} {'peak MB':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['case']:34} {r['provider']:20} {r['ms_per_instance']:12.1f} {r['min_ms']:9.1f} "
            f"{r['max_ms']:9.1f} {r['x_clean']:8.3f} {r['x_loop']:7.3f} "
            f"{B.format_mb(r['peak_mb']):>8}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(CASES), action="append", help="default: both")
    ap.add_argument(
        "--quick", action="store_true", help="2,048 LeNet / 256 ResNet images, fewer rounds"
    )
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    ap.add_argument(
        "--sweep", default=None, help="instances per forward to time, e.g. 1,2,4 (none: no sweep)"
    )
    ap.add_argument("--memory", action="store_true", help="only the n = 4 vs 1,000 memory check")
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    out: dict = dict(torch=torch.__version__, threads=torch.get_num_threads())
    if a.memory:
        mem = bench_memory()
        head = f"{'monte_carlo resnet18 8 images':30} {'n':>6} {'k':>3} {'peak MB':>8}"
        print(head + f" {'seconds':>8}")
        for r in mem:
            print(
                f"{'':30} {r['n']:>6} {r['instances_per_call']:>3} "
                f"{B.format_mb(r['peak_mb']):>8} {r['seconds']:>8.1f}"
            )
        out["memory"] = mem
    else:
        rows = []
        for model in a.model or ["lenet", "resnet18"]:
            if a.sweep is None:
                sweep = SWEEP[model]
            else:  # "none": only the clean pass, the plain loop and the default
                sweep = tuple(int(k) for k in a.sweep.split(",") if k not in ("", "none"))
            rounds = a.rounds or (2 if a.quick else 3)
            rows += bench_case(model, quick=a.quick, sweep=sweep, rounds=rounds)
            print(format_rows([r for r in rows if r["case"].startswith(model)]), flush=True)
        out["rows"] = rows
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
