"""Worst-case benchmarks: LWC against the published procedure, Monte Carlo against a clean pass.

    python bench/bench_worstcase.py            # all cases, table on the terminal
    python bench/bench_worstcase.py --quick --json wc.json

1. LWC vs the published procedure (section III-C of the paper), run side by side on the same
   trained LeNet (4-bit) and data: ten sequential Adam runs of the binary search on c, each from
   δ = 0 over the whole evaluation set for a fixed number of epochs, minimizing objective (10)
   literally, c·Σp + (L(ΔW) − th_g) with L = max|ΔW|; the reported δ is that of the largest
   feasible c (clamped to the bound when no c was feasible). Reported: both worst cases and
   the time ratio.
2. Monte Carlo cost per device instance against one clean forward pass over the same data, for
   LeNet (28x28) and ResNet-18 (32x32): cimext.worstcase.monte_carlo (many instances per
   fused-op call) and a Python loop that samples W + ΔW and calls the plain model per instance.

Every ratio compares functions timed in the same process, interleaved.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

import cimext
from cimext import bench as B
from cimext.worstcase import _common as C
from cimext.worstcase.lwc import margin_loss


# ------------------------------------------------------------------ the published procedure
def published_lwc(
    model,
    data,
    th_g: float = 0.03,
    *,
    runs: int = 10,
    epochs: int = 30,
    lr: float | None = None,
    c_range: tuple[float, float] = (1e-2, 1e2),
) -> dict:
    """The paper's LWC as published: ``runs`` binary-search steps on c (log scale in
    ``c_range``), each a fresh Adam run from δ = 0 of ``epochs`` passes over ``data`` on
    c·Σ_batch p·N/B + (max|u| − th_g) (u = δ / full scale, p the eq. (8) margin hinge, κ = 0).
    Returns accuracy (of the largest feasible c's δ; of the clamped δ of the smallest c when
    no c is feasible), seconds and the c history."""
    lr = th_g / 10 if lr is None else lr
    t0 = time.perf_counter()
    with C.analysis(model, data, "published_lwc") as prob:
        lo, hi = math.log(c_range[0]), math.log(c_range[1])
        best, hist, fallback = None, [], None
        for _ in range(runs):
            c = math.exp(0.5 * (lo + hi))
            us = [u.requires_grad_(True) for u in prob.zeros()]
            opt = torch.optim.Adam(us, lr=lr)
            for _ in range(epochs):
                for x, y in prob.batches:
                    prob.set_relative(us)
                    p = margin_loss(prob.model(x), y).sum() * (prob.samples / y.numel())
                    L = torch.stack([u.abs().max() for u in us]).max()
                    opt.zero_grad(set_to_none=True)
                    (c * p + (L - th_g)).backward()
                    opt.step()
            us = [u.detach() for u in us]
            L = prob.max_relative(us)
            feasible = L <= th_g
            hist.append(dict(c=c, max_perturbation=L, feasible=feasible))
            if feasible:
                lo, best = math.log(c), us
            else:
                hi = math.log(c)
                if fallback is None or c < fallback[0]:
                    fallback = (c, [u.clamp(-th_g, th_g) for u in us])
        final = best if best is not None else fallback[1]
        acc = prob.correct(final) / prob.samples
    return dict(
        accuracy=acc,
        seconds=time.perf_counter() - t0,
        feasible_found=best is not None,
        history=hist,
        clean_accuracy=prob.clean_accuracy,
    )


def bench_lwc(quick: bool) -> list[dict]:
    """LWC (cimext defaults) and the published procedure on the digits LeNet (4-bit), the same
    model and data; the published procedure's epochs per run equal LWC's first-run budget."""
    from cimext import zoo
    from cimext.worstcase import lwc

    net, _ = zoo.trained("digits", "lenet", (4, 4), progress=False)
    data = list(cimext.data.loader("digits", "test", 512))
    steps = 30
    runs = 4 if quick else 10
    pub = published_lwc(net, data, 0.03, runs=runs, epochs=steps)
    ours = lwc(net, data, 0.03, steps=steps, progress=False)
    return [
        dict(
            case=f"lwc vs published ({runs} runs x {steps} epochs) lenet digits",
            provider="published",
            accuracy=pub["accuracy"],
            seconds=pub["seconds"],
            feasible_found=pub["feasible_found"],
        ),
        dict(
            case=f"lwc vs published ({runs} runs x {steps} epochs) lenet digits",
            provider="cimext lwc",
            accuracy=ours.accuracy,
            seconds=ours.seconds,
            time_vs_published=ours.seconds / pub["seconds"],
            epochs=ours.settings["epochs"],
        ),
    ]


# ------------------------------------------------------------------------------ Monte Carlo
def _loop_instances(plain, layers, batches, sigma, seeds):
    """The usual research script: per instance, W + σ·s·ε materialized in Python, then the plain
    model over the data (no cimext op)."""
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        saved = []
        for m in layers:
            w = m.weight.data
            saved.append(w.clone())
            w.add_(torch.randn(w.shape, generator=g) * (sigma * float(w.abs().max())))
        with torch.no_grad():
            for x, _ in batches:
                plain(x)
        for m, w in zip(layers, saved, strict=True):
            m.weight.data.copy_(w)


def bench_mc(model_name: str, quick: bool) -> list[dict]:
    from cimext.worstcase import monte_carlo

    torch.manual_seed(0)
    if model_name == "lenet":
        plain = cimext.models.lenet()
        x = torch.randn(1024, 1, 28, 28)
    else:
        plain = cimext.models.resnet18(num_classes=10)
        # a data set, not a batch: the noise of an instance is drawn once per layer and batch,
        # and a real evaluation set (CIFAR-10 test: 10,000 images) amortizes it over many samples
        x = torch.randn(256 if quick else 512, 3, 32, 32)
    plain.eval()
    y = torch.randint(0, 10, (x.shape[0],))
    batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, x.shape[0], 256)]
    import copy

    conv = cimext.convert(copy.deepcopy(plain))
    dev = cimext.DeviceModel(weight_bits=8, bits_per_device=2, sigma=0.1)
    layers = [m for m in plain.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    n = 16 if model_name == "lenet" else 4
    seeds = list(range(n))

    def clean():
        with torch.no_grad():
            for xb, _ in batches:
                plain(xb)

    fns = {
        "clean forward": clean,
        "python loop": lambda: _loop_instances(plain, layers, batches, 0.1, seeds),
        "cimext monte_carlo": lambda: monte_carlo(conv, batches, dev, n, progress=False),
    }
    min_time, rounds = (1.0, 2) if quick else (3.0, 3)
    res = B._interleaved(fns, rounds, min_time)
    rows = []
    base = res["clean forward"].median_ms
    for name, t in res.items():
        per = t.median_ms if name == "clean forward" else t.median_ms / n
        rows.append(
            dict(
                case=f"monte carlo {model_name} {x.shape[0]}x{tuple(x.shape[1:])}",
                provider=name,
                ms_per_instance=per,
                vs_clean_forward=per / base,
            )
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--case", default=None, help="only cases containing this text (lwc, mc)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    if a.case in (None, "mc"):
        for m in ("lenet", "resnet18"):
            rows += bench_mc(m, a.quick)
    if a.case in (None, "lwc"):
        rows += bench_lwc(a.quick)
    for r in rows:
        extra = " ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in r.items()
            if k not in ("case", "provider")
        )
        print(f"{r['case']:<48} {r['provider']:<20} {extra}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                dict(torch=torch.__version__, threads=torch.get_num_threads(), rows=rows),
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())


def test_published_lwc_smoke():
    """The baseline runs and returns a bounded, reproducible result (pytest entry)."""
    net = cimext.convert(cimext.models.lenet(input_size=8), quant=(4, 4)).eval()
    data = [(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))]
    r = published_lwc(net, data, 0.03, runs=2, epochs=1)
    assert 0.0 <= r["accuracy"] <= 1.0 and len(r["history"]) == 2
