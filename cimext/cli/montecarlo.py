"""``cimext montecarlo``: accuracy over random device instances of a trained model.

Evaluates --n device instances of the model of a `cimext train --out` folder (--run) or of the
dataset's default model (trained on first use, then cached) and writes montecarlo.json (every
instance's accuracy, the summary, the settings and seeds that reproduce it) and montecarlo.png
(the histogram) into --out, with a summary table on the terminal. ``--tail 0.9,0.8`` adds
P(accuracy <= a) for each a (cimext.worstcase.tail_probability, --tail-method subset|is|mc) to
the table and the JSON and draws the tail curve (tail.png). The population is the write-verified
one the worst-case methods are compared with (DeviceModel.verified(--th-g)), or with
--unverified the model's own devices (--sigma overrides their sigma).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

from .. import data, zoo
from ..device import DeviceModel
from ..worstcase import monte_carlo, tail_report
from ..worstcase.tail import plot_tail
from . import _common as C
from .worst_case import add_run_option, load_model

# The estimators --tail-method offers (cimext.worstcase.tail_probability's methods).
TAIL_METHODS = ("subset", "is", "mc")

# The quantiles of the summary table and JSON.
QUANTILES = (0.001, 0.01, 0.05, 0.5)


def add_parser(sub) -> None:
    """Register the ``montecarlo`` subcommand."""
    p = sub.add_parser(
        "montecarlo",
        help="accuracy over random device instances: histogram, quantiles, JSON",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    add_run_option(p)
    C.add_data_options(p)
    p.add_argument("--quant", default="4,4", help="weight[,input] bits of the default model")
    p.add_argument("--n", type=int, default=1000, help="device instances")
    p.add_argument(
        "--th-g",
        type=float,
        default=0.03,
        help="write-verify bound of the verified population, a fraction of full scale",
    )
    p.add_argument(
        "--unverified",
        action="store_true",
        help="the model's own (unverified) devices instead of the write-verified population",
    )
    p.add_argument("--sigma", type=float, default=None, help="with --unverified: device sigma")
    p.add_argument("--split", default="test", choices=["test", "val", "train"])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--bins", type=int, default=40, help="histogram bins")
    p.add_argument("--seed", type=C.seed, default=0, help="seed of the device instances")
    C.add_output_options(p, "runs/montecarlo", "montecarlo.json, montecarlo.png")
    # Options that add analyses of the same population; each adds one entry to the record and
    # rows to the table in run().
    p.add_argument(
        "--tail",
        default=None,
        help="also estimate P(accuracy <= a) at these accuracies, e.g. 0.9 or 0.9,0.8,0.5 "
        "(cimext.worstcase.tail_probability; writes tail.png)",
    )
    p.add_argument(
        "--tail-method",
        default="subset",
        choices=TAIL_METHODS,
        help="estimator of --tail: subset simulation (default: the one whose interval reaches "
        "1e-6 on LeNet), importance sampling along the F-LWC direction, or plain Monte Carlo",
    )
    p.add_argument(
        "--tail-n",
        type=int,
        default=1000,
        help="--tail budget: instances (is, mc) or samples per level (subset)",
    )
    p.set_defaults(run=run, trains=False)


def population(a: argparse.Namespace, net) -> DeviceModel:
    """The DeviceModel the instances are drawn from (see the module docstring)."""
    own = zoo.cim_device(net)
    if a.unverified:
        if a.sigma is None:
            return own
        return C.device_model(**dict(dataclasses.asdict(own), sigma=a.sigma))
    return C.device_model_verified(
        a.th_g, weight_bits=own.weight_bits, bits_per_device=own.bits_per_device
    )


def check(a: argparse.Namespace) -> None:
    """Every option's value, before any model is trained or loaded."""
    C.at_least(a, 1, "n", "batch_size", "bins", "tail_n")
    if a.tail is not None:
        a.tail = C.floats(a.tail, "--tail")
        if any(not 0 <= t <= 1 for t in a.tail):
            raise C.CLIError(f"--tail accuracies must lie in [0, 1], got {a.tail}")
    C.finite_positive(a, "th_g", "sigma")
    if a.sigma is not None and not a.unverified:
        raise C.CLIError("--sigma applies to --unverified devices only")
    C.check_out(a.out)
    if a.run_dir is None:
        C.quant(a.quant)


def run(a: argparse.Namespace) -> int:
    """The ``cimext montecarlo`` command."""
    check(a)
    net, record, dataset = load_model(a)
    device = population(a, net)
    loader = data.loader(dataset, a.split, a.batch_size, root=a.root)
    t0 = time.perf_counter()
    mc = monte_carlo(net, loader, device, a.n, seed=a.seed, progress=not a.quiet)
    result = dict(
        command="montecarlo",
        dataset=dataset,
        split=a.split,
        population="unverified" if a.unverified else f"verified th_g={a.th_g:g}",
        model_record=record,
        quantiles={f"{q:g}": mc.quantile(q) for q in QUANTILES},
        monte_carlo=_json(mc),
        seconds=time.perf_counter() - t0,
    )
    rows = table_rows(mc)
    tails = None
    if a.tail is not None:
        tails = tail_report(
            net,
            loader,
            device,
            a.tail,
            n=a.tail_n,
            method=a.tail_method,
            seed=a.seed,
            progress=not a.quiet,
        )
        result["tail"] = [json.loads(t.to_json()) for t in tails]
        rows += tail_rows(tails)
    written = "montecarlo.json, montecarlo.png" + (", tail.png" if tails else "")
    with C.output_folder(a.out) as out:
        C.write_json(out / "montecarlo.json", result)
        histogram(mc, out / "montecarlo.png", a.bins, f"{record.get('model')} on {dataset}")
        if tails:
            plot_tail(tails, out / "tail.png", accuracies=mc.accuracies)
    print(format_table(rows, f"Monte Carlo: {a.n} instances, {result['population']}"))
    print(f"written: {a.out}/{written}")
    return 0


def tail_rows(tails) -> list[tuple[str, str]]:
    """One row per --tail accuracy: P(accuracy <= a), its 95% interval, the budget spent and
    whether the estimator's own diagnostics trust the interval."""
    rows = []
    for t in tails:
        lo, hi = t.ci
        trust = "" if t.trusted else "  (interval not trusted: see montecarlo.json notes)"
        rows.append(
            (
                f"P(acc <= {100 * t.threshold:.2f}%)",
                f"{t.p:.3g} [{lo:.3g}, {hi:.3g}] {t.method}, n={t.n}{trust}",
            )
        )
    return rows


def _json(mc) -> dict:

    return json.loads(mc.to_json())


def table_rows(mc) -> list[tuple[str, str]]:
    """(label, value) rows of the summary table."""
    rows = [
        ("clean accuracy", _pct(mc.clean_accuracy)),
        ("instances", str(mc.n)),
        ("min", _pct(mc.min)),
    ]
    rows += [(f"quantile {q:g}", _pct(mc.quantile(q))) for q in QUANTILES]
    rows += [
        ("mean ± std", f"{_pct(mc.mean)} ± {100 * mc.std:.2f}"),
        ("max", _pct(mc.max)),
        ("time", f"{mc.seconds:.1f} s"),
    ]
    return rows


def format_table(rows: list[tuple[str, str]], title: str) -> str:
    """A two-column table under ``title``."""
    width = max(len(k) for k, _ in rows)
    return "\n".join([title, *(f"  {k:<{width}}  {v}" for k, v in rows)])


def _pct(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.2f}%"


def histogram(mc, path, bins: int, title: str) -> None:
    """The histogram of the per-instance accuracies (PNG), with the clean accuracy and the
    minimum marked."""
    import matplotlib  # optional heavy dependency, only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.hist([100 * v for v in mc.accuracies], bins=bins, color="#4c72b0", alpha=0.85)
    if not math.isnan(mc.clean_accuracy):
        ax.axvline(100 * mc.clean_accuracy, color="k", linestyle="--", label="clean")
    ax.axvline(100 * mc.min, color="#c44e52", linestyle=":", label=f"min of {mc.n}")
    ax.set_xlabel("accuracy (%)")
    ax.set_ylabel("instances")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
