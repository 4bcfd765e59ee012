"""Cost and quality of the "obd" Hessian diagonal (cimext.writeverify.hessian_diag).

    python bench/bench_hdiag.py            # timings + Spearman (trains LeNet on digits: ~1 min)
    python bench/bench_hdiag.py --quick

Timings (LeNet 28x28, one batch of 256, interleaved in one process): one forward + backward of
the model (the baseline), "obd", the exact diagonal GGN (per-sample Jacobians) and Hutchinson with
10 probes; the x column is each time over the forward + backward, "peak MB" the peak memory of
one call above the memory in use when it started (bench.timing.peak_memory). Quality: Spearman rank
correlation of "obd" against the exact diagonal GGN, on LeNet trained for a few epochs on digits
and on the untrained 28x28 LeNet.
"""

from __future__ import annotations

import argparse
import json
import sys  # noqa: I001
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's cimext, bench

import torch

from bench.hessian import _lenet_batch, bench_obd, ggn_agreement
from bench.timing import format_mb
from cimext import data, models
from cimext.nn import convert
from cimext.train import fit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    min_time, rounds = (0.5, 2) if a.quick else (2.0, 4)

    t = bench_obd(batch=a.batch, min_time=min_time, rounds=rounds, extra=True)
    base = t["clean"].median_ms
    names = {"clean": "forward+backward", "cimext": "obd"}
    print(f"LeNet 28x28, batch {a.batch}, {torch.get_num_threads()} threads")
    print(f"{'provider':<22}{'median ms':>10}{'p20':>9}{'p80':>9}{'x':>8}{'peak MB':>9}")
    rows = {}
    for k, v in t.items():
        name = names.get(k, k)
        rows[name] = dict(median_ms=v.median_ms, ratio=v.median_ms / base, peak_mb=v.peak_mb)
        print(
            f"{name:<22}{v.median_ms:>10.2f}{v.p20_ms:>9.2f}{v.p80_ms:>9.2f}"
            f"{v.median_ms / base:>7.2f}x{format_mb(v.peak_mb):>9}"
        )

    # Spearman against the exact diagonal GGN.
    model, x, y = _lenet_batch(a.batch, torch.device("cpu"))
    untrained = ggn_agreement(model, [(x, y)])
    torch.manual_seed(0)
    c, h, _ = data.input_shape("digits")
    net = convert(models.lenet(num_classes=10, in_channels=c, input_size=h))
    train = data.loader("digits", "train", 64, seed=0)
    val = data.loader("digits", "val", 1024)
    fit(net, train, val, epochs=2 if a.quick else 5, lr=2e-3, progress=False)
    calib = data.load("digits", "train")
    xs, ys = calib.tensors[0][:512], calib.tensors[1][:512]
    trained = ggn_agreement(net, [(xs[:256], ys[:256]), (xs[256:], ys[256:])])
    print()
    print(f"{'obd vs exact diag GGN':<34}{'spearman':>9}{'rel L2':>9}")
    for name, r in (
        ("LeNet digits (trained), 512 samples", trained),
        ("LeNet 28x28 (init)", untrained),
    ):
        print(f"{name:<34}{r['spearman']:>9.3f}{r['rel_l2']:>9.3f}")
        print("   per layer: " + ", ".join(f"{k} {v:.3f}" for k, v in r["per_layer"].items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(timings=rows, trained=trained, untrained=untrained), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
