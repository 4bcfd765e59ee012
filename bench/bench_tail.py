"""The figures of the tail-probability issue on a trained LeNet (digits; Fashion-MNIST with
``--dataset fashion-mnist``), zoo default 4-bit weights and activations, its layers' device model
(sigma 0.1, 4-bit weights on 2-bit devices, no write-verify), the test split.

    OMP_NUM_THREADS=1 python bench/bench_tail.py                 # digits, ~10 min on 2 cores
    OMP_NUM_THREADS=1 python bench/bench_tail.py --quick         # a smoke run (fewer instances)
    CIMEXT_CACHE=/work/cache12 python bench/bench_tail.py --dataset fashion-mnist --images 2000

1. Agreement: plain Monte Carlo with 20,000 instances gives the reference tail; at the threshold
   where its P(acc <= a) is closest to 3e-3 (within 1e-3 .. 1e-2), each estimator ("is" with 2,000
   instances; "subset" with 2,000 instances at most) must lie within 3 combined standard errors
   of it and have a narrower 95% interval than the 20,000-instance one.
2. Reach: at thresholds below any plain Monte Carlo hit, P(acc <= a) at 1e-6 or below with a
   relative half-width <= 50% from <= 5,000 instances.
3. Cost per instance: tail_probability(method="is") against monte_carlo, same instances,
   interleaved rounds in this process (the direction is given, so no F-LWC search is timed);
   "subset" per evaluation against monte_carlo per instance, for information.

Every figure is printed with pass / FAIL and written as JSON to --out (and the tail plot to
--plot).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import cimext
from cimext import zoo
from cimext.nn import cim_layers
from cimext.worstcase import flwc, monte_carlo, tail_probability
from cimext.worstcase.tail import plot_tail


def _combined_z(a, b) -> float:
    se = math.sqrt(a.se**2 + b.se**2)
    return abs(a.p - b.p) / se if se > 0 else math.inf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist"])
    ap.add_argument("--images", type=int, default=None, help="first N test images (default all)")
    ap.add_argument("--mc", type=int, default=20_000, help="plain Monte Carlo reference size")
    ap.add_argument("--agree-n", type=int, default=2_000)
    ap.add_argument("--reach-n", type=int, default=5_000)
    ap.add_argument("--per-level", type=int, default=None, help="subset samples per level")
    ap.add_argument("--reach", default=None, help="comma-separated reach thresholds")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved cost rounds")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench_tail.json")
    ap.add_argument("--plot", default="bench_tail.png")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.mc, args.agree_n, args.reach_n, args.rounds = 2_000, 400, 1_000, 1
    torch.manual_seed(0)
    net, rec = zoo.trained(args.dataset, "lenet", (4, 4), progress=False)
    data = list(cimext.data.loader(args.dataset, "test", 500))
    if args.images:
        xs = torch.cat([x for x, _ in data])[: args.images]
        ys = torch.cat([y for _, y in data])[: args.images]
        data = [(xs[i : i + 500], ys[i : i + 500]) for i in range(0, len(ys), 500)]
    device = cim_layers(net)[0][1].device
    samples = sum(len(y) for _, y in data)
    print(
        f"{args.dataset} LeNet 4-bit, {samples} test images, {device}, threads "
        f"{torch.get_num_threads()}"
    )
    out: dict = dict(dataset=args.dataset, samples=samples, device=str(device), figures={})

    # --- the plain Monte Carlo reference --------------------------------------------------------
    t0 = time.perf_counter()
    mc = monte_carlo(net, data, device, args.mc, seed=123, progress=False)
    acc = torch.tensor(mc.accuracies, dtype=torch.float64)
    print(
        f"plain MC: {args.mc} instances in {time.perf_counter() - t0:.0f} s, mean "
        f"{mc.mean:.4f}, std {mc.std:.4f}, min {mc.min:.4f}, clean {mc.clean_accuracy:.4f}"
    )
    values = sorted(set(acc.tolist()))
    tail = {a: float((acc <= a + 1e-12).double().mean()) for a in values[:40]}
    inside = {a: p for a, p in tail.items() if 1e-3 <= p <= 1e-2}
    if not inside:
        print("no accuracy value with plain-MC P in [1e-3, 1e-2]; enlarge --mc")
        return 1
    a_agree = min(inside, key=lambda a: abs(math.log(inside[a] / 3e-3)))
    ref = tail_probability(
        net, data, device, a_agree, n=args.mc, method="mc", seed=123, progress=False
    )
    print(
        f"agreement threshold {a_agree:.4f}: plain MC p = {ref.p:.3e}, 95% CI "
        f"({ref.ci[0]:.2e}, {ref.ci[1]:.2e}), width {ref.ci[1] - ref.ci[0]:.2e}"
    )
    worst = flwc(net, data, 0.03, progress=False)

    rows = []

    def row(name, r, ok, detail):
        rows.append((name, r, ok, detail))
        print(
            f"  {name:34s} p={r.p:.3e} CI=({r.ci[0]:.2e}, {r.ci[1]:.2e}) n={r.n} "
            f"ess={r.ess:.0f} {r.seconds:.0f}s trusted={r.trusted}  "
            f"{'pass' if ok else 'FAIL'}  {detail}",
            flush=True,
        )

    # --- 1. agreement ---------------------------------------------------------------------------
    print(
        f"1. agreement (within 3 combined s.e., narrower interval, from {args.agree_n} instances)"
    )
    per_level = args.per_level or max(100, args.agree_n // 4)
    res_agree = {}
    for method in ("is", "subset"):
        kw = dict(direction=worst) if method == "is" else {}
        n = args.agree_n if method == "is" else per_level
        r = tail_probability(
            net, data, device, a_agree, n=n, method=method, seed=args.seed, progress=False, **kw
        )
        z = _combined_z(r, ref)
        narrower = (r.ci[1] - r.ci[0]) < (ref.ci[1] - ref.ci[0])
        ok = z <= 3 and narrower and r.n <= args.agree_n
        row(f"{method}", r, ok, f"|z|={z:.2f} width {r.ci[1] - r.ci[0]:.2e}")
        res_agree[method] = r
    out["figures"]["agreement"] = dict(
        threshold=a_agree,
        mc=json.loads(ref.to_json()) | dict(nominal_accuracies=None),
        **{
            m: json.loads(r.to_json()) | dict(nominal_accuracies=None) for m, r in res_agree.items()
        },
    )

    # --- 2. reach -------------------------------------------------------------------------------
    print(f"2. reach (p <= 1e-6, relative half-width <= 50%, <= {args.reach_n} instances)")
    if args.reach:
        thresholds = [float(t) for t in args.reach.split(",")]
    else:  # accuracies below every plain MC instance, one to four samples apart
        thresholds = [(round(mc.min * samples) - k) / samples for k in (1, 3, 5)]
    per_level_reach = args.per_level or args.reach_n // 6
    reach = []
    for a in thresholds:
        r = tail_probability(
            net, data, device, a, n=per_level_reach, method="subset", seed=args.seed, progress=False
        )
        ok = r.p <= 1e-6 and r.p > 0 and r.rel_halfwidth <= 0.5 and r.n <= args.reach_n
        row(f"subset a={a:.4f}", r, ok, f"rel. half-width {r.rel_halfwidth:.2f}")
        reach.append(r)
    out["figures"]["reach"] = [
        json.loads(r.to_json()) | dict(nominal_accuracies=None) for r in reach
    ]

    # --- 3. cost per instance -------------------------------------------------------------------
    print("3. cost per instance against monte_carlo (interleaved rounds)")
    k = 200 if not args.quick else 50
    times: dict[str, list[float]] = {"monte_carlo": [], "is": [], "subset": []}
    for _ in range(args.rounds):
        t = time.perf_counter()
        monte_carlo(net, data, device, k, seed=7, progress=False, clean_accuracy=False)
        times["monte_carlo"].append((time.perf_counter() - t) / k)
        r = tail_probability(
            net, data, device, a_agree, n=k, method="is", direction=worst, seed=7, progress=False
        )
        times["is"].append(r.seconds / r.n)
        r = tail_probability(
            net, data, device, a_agree, n=k // 2, method="subset", seed=7, progress=False
        )
        times["subset"].append(r.seconds / r.n)
    med = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
    ratio_is = med["is"] / med["monte_carlo"]
    ratio_sub = med["subset"] / med["monte_carlo"]
    print(
        f"  monte_carlo {med['monte_carlo'] * 1e3:.2f} ms/instance; is {med['is'] * 1e3:.2f} "
        f"ms ({ratio_is:.2f}x)  {'pass' if ratio_is <= 1.10 else 'FAIL'}; subset "
        f"{med['subset'] * 1e3:.2f} ms/evaluation ({ratio_sub:.2f}x, for information)"
    )
    out["figures"]["cost"] = dict(
        ms=dict((m, v * 1e3) for m, v in med.items()),
        ratio_is=ratio_is,
        ratio_subset=ratio_sub,
        instances=k,
        rounds=args.rounds,
    )

    # --- table, JSON, plot ------------------------------------------------------------------------
    print("\nfigure                 method/threshold        p          rel.hw   n     result")
    for name, r, ok, _ in rows:
        fig = "agreement" if not name.startswith("subset a=") else "reach"
        print(
            f"{fig:22s} {name:22s} {r.p:.3e}  {r.rel_halfwidth:6.2f}  {r.n:5d}  "
            f"{'pass' if ok else 'FAIL'}"
        )
    print(
        f"{'cost':22s} {'is vs monte_carlo':22s} {ratio_is:.2f}x{'':21s}"
        f"{'pass' if ratio_is <= 1.10 else 'FAIL'}"
    )
    out["rows"] = [dict(figure=n, p=r.p, ci=list(r.ci), n=r.n, ok=ok) for n, r, ok, _ in rows]
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    curve = [res_agree["subset"], *reach]
    plot_tail(
        curve,
        args.plot,
        accuracies=mc.accuracies,
        worst=worst.accuracy,
        title=f"{args.dataset} LeNet 4-bit: P(accuracy <= a), subset simulation",
    )
    print(f"wrote {args.out}, {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
