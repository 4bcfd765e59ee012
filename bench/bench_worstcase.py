"""Worst-case benchmarks: LWC against the published procedure, Monte Carlo against a clean pass.

    python bench/bench_worstcase.py            # all cases, table on the terminal
    python bench/bench_worstcase.py --quick --json wc.json

1. LWC vs the published procedure (section III-C of the paper), run side by side on the same
   trained LeNet (4-bit) and data: ten sequential Adam runs of the binary search on c, each from
   δ = 0 over the whole evaluation set for a fixed number of epochs, minimizing objective (10)
   literally, c·Σp + (L(ΔW) − th_g) with L = max|ΔW|; the reported δ is that of the largest
   feasible c (clamped to the bound when no c was feasible). Reported: both worst cases and
   the time ratio.
2. Monte Carlo cost per device instance against one clean forward pass over the same data and a
   plain per-instance PyTorch loop, for LeNet (28x28) and ResNet-18 (32x32): the cases of
   bench/bench_monte_carlo.py (run that script for the instances-per-forward sweep alone).

Every ratio compares functions timed in the same process, interleaved; ``peak_mb`` is the peak
memory of one call above the memory in use when it started (bench.timing.peak_memory).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's cimext, bench

import torch

import cimext
from bench import suite as B
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
    pub, pub_mb = B.peak_memory(lambda: published_lwc(net, data, 0.03, runs=runs, epochs=steps))
    ours, ours_mb = B.peak_memory(lambda: lwc(net, data, 0.03, steps=steps, progress=False))
    return [
        dict(
            case=f"lwc vs published ({runs} runs x {steps} epochs) lenet digits",
            provider="published",
            accuracy=pub["accuracy"],
            seconds=pub["seconds"],
            feasible_found=pub["feasible_found"],
            peak_mb=pub_mb,
        ),
        dict(
            case=f"lwc vs published ({runs} runs x {steps} epochs) lenet digits",
            provider="cimext lwc",
            accuracy=ours.accuracy,
            seconds=ours.seconds,
            time_vs_published=ours.seconds / pub["seconds"],
            epochs=ours.settings["epochs"],
            peak_mb=ours_mb,
        ),
    ]


# ------------------------------------------------------------------------------ Monte Carlo
def bench_mc(quick: bool) -> list[dict]:
    """The Monte Carlo case of bench/bench_monte_carlo.py (per instance vs the clean pass and the
    plain loop), in this script's row format."""
    import bench_monte_carlo as M

    rows = []
    for model in ("lenet", "resnet18"):
        sweep = () if quick else M.SWEEP[model]
        for r in M.bench_case(model, quick=quick, sweep=sweep, rounds=2 if quick else 3):
            rows.append(dict(case=f"monte carlo {r.pop('case')}", provider=r.pop("provider"), **r))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--case", default=None, help="only cases containing this text (lwc, mc)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    if a.case in (None, "mc"):
        rows += bench_mc(a.quick)
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
