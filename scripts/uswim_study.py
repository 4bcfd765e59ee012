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
from cimext.nn import cim_layers, clean
from cimext.worstcase.monte_carlo import instance_seeds
from cimext.writeverify import hessian_diag, sensitivity, speedup_study
from cimext.writeverify.hessian import effective_weight
from cimext.writeverify.sensitivity import (
    GRANULARITIES,
    METHODS,
    extra_pulses,
    weight_variances,
)
from cimext.writeverify.study import NON_UNIFORM, _check_batches, _Evaluator, study_device


@torch.no_grad()
def explain(net, calib, test, sigma: float, speedup: float, instances: int, seed: int) -> dict:
    """Why U-SWIM falls short at ``sigma`` (non-uniform, device granularity): the devices it can
    verify within ``speedup``x fewer pulses than full write-verify (expected pulses, closed
    form), the share of the second-order loss increase ½·H·ΔVar they remove, and the mean
    accuracy there against full write-verify (same instances as the study)."""
    layers = cim_layers(net)
    device = study_device(layers[0][1].device, sigma, 0.1, NON_UNIFORM)
    calib_b = _check_batches(calib, "calib", "cpu")
    with clean(net):
        with torch.enable_grad():
            h = hessian_diag(net, calib_b)
        sc = sensitivity(net, calib_b, device, "uswim", hessian=h, granularity="device")
        ben, cost, score, msb = [], [], [], []
        for n, m in layers:
            w = effective_weight(m)
            vu, vv = weight_variances(w, device, per_device=True)
            ben.append((0.5 * h[n].double()[..., None] * (vu - vv)).reshape(-1))
            cost.append(extra_pulses(w, device).reshape(-1))
            score.append(sc[n].reshape(-1))
            d = torch.zeros(*w.shape, device.devices, dtype=torch.bool)
            d[..., -1] = True
            msb.append(d.reshape(-1))
        ben, cost, score, msb = map(torch.cat, (ben, cost, score, msb))
        order = torch.argsort(score, descending=True, stable=True)
        full = float((cost + 1).sum())
        spent = cost.numel() + torch.cumsum(cost[order], 0)
        k = int((spent <= full / speedup).sum())
        capture = float(ben[order[:k]].sum() / ben.sum())
        chosen = torch.zeros_like(msb)
        chosen[order[:k]] = True
        masks, i = {}, 0
        for n, m in layers:
            c = m.weight.numel() * device.devices
            masks[n] = chosen[i : i + c].reshape(*m.weight.shape, device.devices)
            i += c
        test_b = _check_batches(test, "data", "cpu")
        ev = _Evaluator(net, layers, test_b, device, instance_seeds(seed, instances), 100)
        acc, pulses, _ = ev(masks)
        acc_full, p_full, _ = ev(
            {n: torch.ones(t.numel(), dtype=torch.bool) for n, t in ev.targets.items()}
        )
        acc_none, _, _ = ev(None)
        # Devices needed for a share of the loss increase (the ranking's own curve).
        cum = torch.cumsum(ben[order], 0) / ben.sum()
        need = {str(q): float((cum < q).sum()) / cum.numel() for q in (0.8, 0.9, 0.95, 0.97, 0.99)}
    return dict(
        sigma=sigma,
        speedup_budget=speedup,
        devices_verified=k / cost.numel(),
        msb_share_of_verified=float(msb[order[:k]].float().mean()) if k else 0.0,
        loss_share_removed=capture,
        accuracy=acc,
        accuracy_full=acc_full,
        accuracy_unverified=acc_none,
        measured_speedup=p_full / pulses,
        devices_for_loss_share=need,
        loss_increase_unverified=float(ben.sum()),
    )


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
    p.add_argument(
        "--explain",
        type=float,
        nargs="*",
        default=None,
        help="σ values (non-uniform) at which to measure U-SWIM at a 5x pulse budget",
    )
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
        if a.explain:
            res["explain"] = [
                explain(net, calib, test, s, 5.0, a.instances, seed) for s in a.explain
            ]
            for e in res["explain"]:
                print(
                    f"σ {e['sigma']:g} non-uniform, U-SWIM at a 5x budget: "
                    f"{100 * e['devices_verified']:.1f} % of devices "
                    f"({100 * e['msb_share_of_verified']:.0f} % of them MSB) remove "
                    f"{100 * e['loss_share_removed']:.1f} % of ½·H·ΔVar; accuracy "
                    f"{100 * e['accuracy']:.2f} vs full {100 * e['accuracy_full']:.2f} % "
                    f"(unverified {100 * e['accuracy_unverified']:.2f} %); devices for "
                    + ", ".join(
                        f"{float(q) * 100:g} %: {100 * v:.1f} %"
                        for q, v in e["devices_for_loss_share"].items()
                    )
                )
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
