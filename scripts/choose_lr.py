"""Choose the default learning rate of `cimext train` / fit() per dataset on the validation split.

Trains LeNet (vanilla, Adam, cosine schedule, the CLI's default epochs) with every candidate lr
and batch size and prints the best validation accuracy of each; the test split is never read.
The chosen values live in cimext.train.DEFAULT_LR.

    OMP_NUM_THREADS=1 python scripts/choose_lr.py --dataset digits --batch-sizes 64,128,256
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cimext import data, zoo
from cimext.train import fit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--lrs", default="0.001,0.003,0.01,0.03")
    p.add_argument("--batch-sizes", default="64,128,256")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", default="0")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    lrs = [float(v) for v in a.lrs.split(",")]
    batches = [int(v) for v in a.batch_sizes.split(",")]
    seeds = [int(v) for v in a.seeds.split(",")]
    val = data.loader(a.dataset, "val", 1024)
    rows = []
    print(f"{a.dataset}: LeNet, Adam, {a.epochs} epochs, torch {torch.__version__}")
    print(f"{'batch':>6} {'lr':>8} {'val acc':>8} {'s':>6}")
    for b in batches:
        for lr in lrs:
            accs = []
            t0 = time.perf_counter()
            for s in seeds:
                train = data.loader(a.dataset, "train", b, seed=s)
                net = zoo.build(a.dataset, "lenet", seed=s)
                res = fit(net, train, val, epochs=a.epochs, lr=lr, seed=s, progress=False)
                accs.append(res.best_value)
            acc = sum(accs) / len(accs)
            rows.append(dict(batch=b, lr=lr, val_accuracy=acc, seconds=time.perf_counter() - t0))
            print(f"{b:6d} {lr:8g} {100 * acc:7.2f}% {rows[-1]['seconds']:6.0f}", flush=True)
    best = {}
    for lr in lrs:
        best[lr] = sum(r["val_accuracy"] for r in rows if r["lr"] == lr) / len(batches)
    choice = max(best, key=best.get)
    means = ", ".join(f"{k:g}: {100 * v:.2f}%" for k, v in best.items())
    print(f"mean val accuracy over batch sizes: {means}")
    print(f"chosen lr for {a.dataset}: {choice:g}")
    if a.json:
        with open(a.json, "w") as f:
            record = dict(dataset=a.dataset, epochs=a.epochs, rows=rows, chosen=choice)
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
