"""The worst-case figures (issue 12): is worst_case the strongest analysis, and at what cost?

    python bench/bench_worst_case.py --json wc.json          # all 13 models (hours on 2 cores)
    python bench/bench_worst_case.py --models digits         # the six digits LeNets (minutes)
    python bench/bench_worst_case.py --models fashion-mnist-4bit-s0 --mc-n 10000 --mc-limit 2000

Models (bench/worstcase_models.py, trained on first use and cached under ``$CIMEXT_CACHE``):
LeNet on digits and Fashion-MNIST, float and 4-bit weights + inputs, training seeds 0-2, and
ResNet-18 (width 16) trained 3 epochs on Fashion-MNIST resized to 32x32. Every analysis runs on
the test split (all of it unless ``--limit``) at th_g = 0.03, all at the library's defaults:

- lwc, flwc, weight_pgd, worst_case (each stage's accuracy and seconds), worst_case "fast";
- ``lwc@6048d80``: today's lwc, the file at the base commit of this work, loaded from git and
  timed in the same process (the cost reference of worst_case);
- ``plain PGD``: a 60-step, 3-restart sign PGD in plain PyTorch (bench/plain_pgd.py), which
  shares no code with cimext.worstcase and calls no cimext op; its clean accuracy must equal
  the library's (the check that it attacks the same network);
- with ``--mc-n``: the minimum accuracy over that many write-verified Monte Carlo instances.

Timed methods run in alternating order (model i: old, worst_case, flwc, fast; model i + 1 the
reverse), so drift in the machine's load does not favour one side. Every result is checked with
WorstCaseResult.verify (plain torch) before it is reported. One table per model, then the
targets with pass / fail; ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import plain_pgd  # noqa: E402
import worstcase_models as M  # noqa: E402

TH_G = 0.03
OLD_REV = "6048d80"


def load_old_lwc(rev: str = OLD_REV):
    """lwc as it was at commit ``rev``: its lwc.py and _common.py from git, loaded as modules
    cimext.worstcase.lwc_<rev> / _common_<rev> (the rest of the package is today's)."""
    import cimext.worstcase  # noqa: F401  (the parent package of the loaded modules)

    mods = {}
    for name in ("_common", "lwc"):
        src = subprocess.run(
            ["git", "-C", str(HERE.parent), "show", f"{rev}:cimext/worstcase/{name}.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        src = src.replace("from . import _common as C", f"from . import _common_{rev} as C")
        full = f"cimext.worstcase.{name}_{rev}"
        mod = types.ModuleType(full)
        mod.__package__ = "cimext.worstcase"
        mod.__file__ = f"<git {rev}:cimext/worstcase/{name}.py>"
        sys.modules[full] = mod
        exec(compile(src, mod.__file__, "exec"), mod.__dict__)
        mods[name] = mod
    return mods["lwc"].lwc


def _checked(res, net, data, cpu: float | None = None) -> dict:
    acc = res.verify(net, data)
    if acc != res.accuracy:
        raise AssertionError(f"{res.method}: verify() gives {acc}, the result says {res.accuracy}")
    out = dict(accuracy=res.accuracy, seconds=res.seconds)
    if cpu is not None:
        out["cpu_seconds"] = cpu
    return out


def _ratio(a: dict, b: dict) -> tuple[float, str]:
    """a's time over b's: CPU seconds when both have them (this process's CPU time, which a loaded
    machine inflates far less than wall time; with --threads 1 it is the single core's work),
    else wall seconds; and the figures as text (CPU and wall)."""
    wall = a["seconds"] / b["seconds"]
    if "cpu_seconds" in a and "cpu_seconds" in b:
        cpu = a["cpu_seconds"] / b["cpu_seconds"]
        return cpu, f"{cpu:.2f}x CPU time ({wall:.2f}x wall)"
    return wall, f"{wall:.2f}x wall"


def run_model(name: str, net, data, *, order: int, plain: bool, old: bool, mc: dict | None):
    """Every analysis of one model; returns the row of the JSON."""
    from cimext.worstcase import flwc, lwc, weight_pgd, worst_case

    row: dict = dict(model=name, samples=sum(int(y.numel()) for _, y in data), th_g=TH_G)
    timed = {
        "worst_case": lambda: worst_case(net, data, TH_G, progress=False),
        "flwc": lambda: flwc(net, data, TH_G, progress=False),
        "worst_case_fast": lambda: worst_case(net, data, TH_G, budget="fast", progress=False),
    }
    if old:
        old_lwc = load_old_lwc()
        timed = {f"lwc@{OLD_REV}": lambda: old_lwc(net, data, TH_G, progress=False), **timed}
    names = list(timed) if order % 2 == 0 else list(reversed(timed))
    results = {}
    for m in names:
        t = time.process_time()
        results[m] = timed[m]()
        row[m] = _checked(results[m], net, data, time.process_time() - t)
    row["worst_case"]["stages"] = results["worst_case"].settings["stages"]
    row["worst_case_fast"]["stages"] = results["worst_case_fast"].settings["stages"]
    row["clean"] = results["worst_case"].clean_accuracy
    for m, fn in (
        ("lwc", lambda: lwc(net, data, TH_G, progress=False)),
        ("weight_pgd", lambda: weight_pgd(net, data, TH_G, progress=False)),
    ):
        row[m] = _checked(fn(), net, data)
    if plain:
        p = plain_pgd.sign_pgd(net, data, TH_G)
        if p["clean_accuracy"] != row["clean"]:
            raise AssertionError(
                f"{name}: the plain copy's clean accuracy {p['clean_accuracy']} differs from the "
                f"library's {row['clean']}: it does not attack the same network"
            )
        row["plain_pgd"] = p
    if mc is not None:
        from cimext.worstcase import monte_carlo

        dev = M.verified_device(net, TH_G)
        mc_data = data if mc["limit"] is None else M.limit(data, mc["limit"])
        r = monte_carlo(net, mc_data, dev, mc["n"], progress=False)
        row["monte_carlo"] = dict(
            n=mc["n"],
            samples=sum(int(y.numel()) for _, y in mc_data),
            min=r.min,
            mean=r.mean,
            seconds=r.seconds,
        )
    return row


def targets(row: dict) -> list[tuple[str, bool, str]]:
    """(target, met, figures) for one model."""
    out = []
    wc, lw = row["worst_case"]["accuracy"], row["lwc"]["accuracy"]
    singles = {m: row[m]["accuracy"] for m in ("lwc", "flwc", "weight_pgd")}
    floor = min(singles["weight_pgd"], singles["flwc"])
    out.append(
        (
            "lwc <= min(weight_pgd, flwc) + 0.5 pt",
            lw <= floor + 0.005,
            f"{100 * lw:.2f} vs {100 * floor:.2f}",
        )
    )
    worst_single = min(singles.values())
    out.append(
        (
            "worst_case <= every single method",
            wc <= worst_single,
            f"{100 * wc:.2f} vs {100 * worst_single:.2f}",
        )
    )
    if "plain_pgd" in row:
        p = row["plain_pgd"]["accuracy"]
        out.append(("worst_case <= plain PGD", wc <= p, f"{100 * wc:.2f} vs {100 * p:.2f}"))
    old = row.get(f"lwc@{OLD_REV}")
    if old is not None and row["model"].startswith("lenet-fashion-mnist"):
        r, text = _ratio(row["worst_case"], old)
        out.append((f"worst_case time <= 2x lwc@{OLD_REV}", r <= 2, text))
    if row["model"].startswith("lenet-fashion-mnist"):
        r, text = _ratio(row["worst_case_fast"], row["flwc"])
        out.append(("fast time <= 2x flwc", r <= 2, text))
    if row["model"].startswith("lenet-fashion-mnist-4bit"):
        out.append(("worst_case <= 3%", wc <= 0.03, f"{100 * wc:.2f}"))
    if row["model"].startswith("resnet18"):
        out.append(("worst_case <= 1%", wc <= 0.01, f"{100 * wc:.2f}"))
    if "monte_carlo" in row:
        m = row["monte_carlo"]["min"]
        out.append(
            (
                "MC min >= worst_case + 30 pt",
                m >= wc + 0.30,
                f"{100 * m:.2f} vs {100 * wc:.2f}",
            )
        )
    return out


def table(row: dict) -> str:
    lines = [f"== {row['model']}: {row['samples']} test samples, th_g = {row['th_g']}"]
    head = f"{'method':<34} {'accuracy':>9} {'seconds':>9}"
    lines += [head, "-" * len(head)]

    def line(label, acc, sec=None):
        s = "" if sec is None else f"{sec:.1f}"
        lines.append(f"{label:<34} {100 * acc:>8.2f}% {s:>9}")

    line("clean", row["clean"])
    for m in ("lwc", "flwc", "weight_pgd"):
        line(m, row[m]["accuracy"], row[m]["seconds"])
    line("worst_case (default)", row["worst_case"]["accuracy"], row["worst_case"]["seconds"])
    for s in row["worst_case"]["stages"]:
        line(f"  stage {s['stage']}", s["accuracy"], s["seconds"])
    line("worst_case (fast)", row["worst_case_fast"]["accuracy"], row["worst_case_fast"]["seconds"])
    old = row.get(f"lwc@{OLD_REV}")
    if old is not None:
        line(f"lwc@{OLD_REV} (today's lwc)", old["accuracy"], old["seconds"])
    if "plain_pgd" in row:
        p = row["plain_pgd"]
        line("plain PGD (60 steps x 3 restarts)", p["accuracy"], p["seconds"])
    if "monte_carlo" in row:
        m = row["monte_carlo"]
        line(f"Monte Carlo min of {m['n']} ({m['samples']} img)", m["min"], m["seconds"])
    for name, ok, fig in row["targets"]:
        lines.append(f"  [{'pass' if ok else 'FAIL'}] {name}: {fig}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--models",
        default="",
        help="comma-separated substrings of model names to run (default: all 13), e.g. "
        "digits, fashion-mnist-4bit, resnet18",
    )
    ap.add_argument("--cache", default=None, help="model cache folder (default $CIMEXT_CACHE)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N test images")
    ap.add_argument("--resnet-limit", type=int, default=None, help="--limit for ResNet-18 only")
    ap.add_argument(
        "--resnet-all", action="store_true", help="also the plain PGD and old lwc on ResNet-18"
    )
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-PyTorch PGD")
    ap.add_argument("--no-old", action="store_true", help=f"skip lwc@{OLD_REV}")
    ap.add_argument("--mc-n", type=int, default=0, help="Monte Carlo instances (0: none)")
    ap.add_argument("--mc-limit", type=int, default=None, help="MC on the first N images")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.cache:
        os.environ["CIMEXT_CACHE"] = a.cache
    if a.threads:
        torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    names = [M.model_name(*spec) for spec in M.LENETS] + ["resnet18-fashion-mnist32"]
    wanted = [w for w in a.models.split(",") if w]
    names = [n for n in names if not wanted or any(w in n for w in wanted)]
    rows = []
    t0 = time.perf_counter()
    for i, name in enumerate(names):
        if name.startswith("resnet18"):
            net, rec = M.resnet()
            data = M.test_batches("fashion-mnist32", limit=a.resnet_limit or a.limit)
        else:
            spec = next(s for s in M.LENETS if M.model_name(*s) == name)
            net, rec = M.lenet(*spec)
            data = M.test_batches(spec[0], limit=a.limit)
        mc = None
        if a.mc_n:
            mc = dict(n=a.mc_n, limit=a.mc_limit)
        resnet = name.startswith("resnet18")
        row = run_model(
            name,
            net,
            data,
            order=i,
            # the ResNet figure is worst_case <= 1%: its plain PGD and old lwc only on request
            plain=not a.no_plain and (not resnet or a.resnet_all),
            old=not a.no_old and (not resnet or a.resnet_all),
            mc=mc,
        )
        row["train_record"] = {k: rec.get(k) for k in ("test_accuracy", "val_accuracy", "seconds")}
        row["targets"] = targets(row)
        rows.append(row)
        print(table(row), flush=True)
    print(f"\n{len(rows)} models in {time.perf_counter() - t0:.0f} s")
    failed = [(r["model"], t) for r in rows for t, ok, _ in r["targets"] if not ok]
    print("all targets met" if not failed else f"{len(failed)} targets missed: {failed}")
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                dict(
                    torch=torch.__version__,
                    threads=torch.get_num_threads(),
                    load_average=os.getloadavg(),
                    rows=rows,
                ),
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
