"""U-SWIM vs SWIM vs magnitude vs random on the Fashion-MNIST LeNet (4-bit weights and inputs).

For each seed: the trained model (cimext.zoo.trained, cached under $CIMEXT_CACHE), the Hessian on
``--calib`` training images, accuracies on a fixed subset of ``--images`` images (the first ones
of a permutation with seed 0 of the chosen split: the same images for every seed and method), and
cimext.writeverify.speedup_study over σ, uniform and non-uniform level sigma. Prints one table per
seed and the mean over seeds; ``--json`` writes everything.

    OMP_NUM_THREADS=1 python scripts/uswim_study.py --seeds 0 1 2 --json runs/uswim.json

``--split val`` (held out of the training set) is for choosing settings; the reported figures use
``--split test``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import DataLoader, Subset

from cimext import data, zoo
from cimext.writeverify import speedup_study
from cimext.writeverify.sensitivity import GRANULARITIES, METHODS


def subset(ds, n: int, seed: int):
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(ds, idx.sort().values.tolist()), idx.sort().values.tolist()


def table(res: dict, methods) -> str:
    lines = []
    for kind in [k for k in ("uniform", "non-uniform") if k in res]:
        r = res[kind]
        lines.append(f"{kind}: speedup over full write-verify at <= 0.5 points (fraction verified)")
        head = "| σ | acc. unverified / full |" + "".join(f" {m} |" for m in methods)
        lines += [head, "|" + " --- |" * (2 + len(methods))]
        for i, s in enumerate(res["sigma"]):
            row = f"| {s:g} | {100 * r['accuracy_unverified'][i]:.2f} / "
            row += f"{100 * r['accuracy_full'][i]:.2f} % |"
            for m in methods:
                row += f" {r[f'{m}_speedup'][i]:.2f}x ({100 * r[f'{m}_fraction'][i]:g} %) |"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def mean_table(runs: list[dict], methods) -> str:
    lines = []
    sig = runs[0]["sigma"]
    for kind in [k for k in ("uniform", "non-uniform") if k in runs[0]]:
        lines.append(f"{kind}: mean ± std over seeds of the speedup")
        lines += [
            "| σ |" + "".join(f" {m} |" for m in methods),
            "|" + " --- |" * (1 + len(methods)),
        ]
        for i, s in enumerate(sig):
            row = f"| {s:g} |"
            for m in methods:
                v = torch.tensor([r[kind][f"{m}_speedup"][i] for r in runs], dtype=torch.float64)
                sd = float(v.std()) if len(runs) > 1 else 0.0
                row += f" {float(v.mean()):.2f} ± {sd:.2f}x |"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--calib", type=int, default=1024)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--granularity", choices=GRANULARITIES, default="device")
    p.add_argument("--per-pulse", action="store_true")
    p.add_argument("--instances", type=int, default=8)
    p.add_argument("--hessian-instances", type=int, default=0)
    p.add_argument("--kinds", nargs="+", default=["uniform", "non-uniform"])
    p.add_argument("--th-ratio", type=float, default=0.1)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    test_ds, test_idx = subset(data.load(a.dataset, a.split), a.images, 0)
    calib_ds, _ = subset(data.load(a.dataset, "train"), a.calib, 1)
    test = DataLoader(test_ds, batch_size=a.images)
    calib = DataLoader(calib_ds, batch_size=256)
    runs = []
    for seed in a.seeds:
        net, rec = zoo.trained(a.dataset, "lenet", (4, 4), seed=seed, progress=False)
        t = time.perf_counter()
        res = speedup_study(
            net,
            calib,
            test,
            sigmas=a.sigmas,
            methods=a.methods,
            granularity=a.granularity,
            per_pulse=a.per_pulse,
            instances=a.instances,
            hessian_instances=a.hessian_instances,
            kinds=a.kinds,
            th_ratio=a.th_ratio,
            seed=seed,
        )
        res["model_seed"] = seed
        res["test_accuracy_full_set"] = rec.get("test_accuracy")
        runs.append(res)
        took = time.perf_counter() - t
        print(f"\nseed {seed}: {took:.0f} s, clean {100 * res['clean_accuracy']:.2f} % (subset)")
        print(table(res, a.methods), flush=True)
    if len(runs) > 1:
        print(mean_table(runs, a.methods))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(args=vars(a), images=test_idx, runs=runs), f, indent=1)


if __name__ == "__main__":
    main()
