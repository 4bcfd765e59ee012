"""``cimext worst-case``: the ensemble worst_case (``--method auto``, the default), LWC, F-LWC,
weight PGD and Monte Carlo on one trained model, at one bound or over a sweep of bounds
(``--th-g 0.01,0.02,0.03``), with the Table-I terminal table and the report (JSON, δ, figures) in
--out."""

from __future__ import annotations

import argparse
import math

from .. import data, zoo
from ..worstcase import report
from ..worstcase.auto import BUDGETS
from ..worstcase.report import METHODS
from . import _common as C


def add_run_option(p: argparse.ArgumentParser) -> None:
    """--run DIR: the trained model to analyse (dest ``run_dir``; ``run`` is the dispatch)."""
    p.add_argument(
        "--run",
        dest="run_dir",
        default=None,
        metavar="DIR",
        help="a `cimext train --out` folder to analyze (default: train the dataset's default "
        "model, or reuse it from the cache)",
    )


def add_parser(sub) -> None:
    """Register the ``worst-case`` subcommand."""
    p = sub.add_parser(
        "worst-case",
        help="worst-case accuracy under bounded weight perturbation (ensemble, LWC, PGD, MC)",
        description="Find the worst-case accuracy of a trained model whose weights may move by "
        "up to th_g of each layer's full scale: by default with the ensemble worst_case "
        "(F-LWC, weight PGD, LWC and restarts; --method auto), or with LWC, F-LWC and weight "
        "PGD alone, compared with Monte Carlo over write-verified device instances. "
        "Several bounds (--th-g 0.01,0.02,0.03) run a sweep with a plot of worst-case accuracy "
        "against th_g. Writes report.json, the per-method perturbations and the paper's "
        "figures into --out.",
    )
    add_run_option(p)
    C.add_data_options(p)
    p.add_argument("--quant", default="4,4", help="weight[,input] bits of the default model")
    p.add_argument(
        "--method",
        default="auto",
        help=f"{', '.join(METHODS)} (auto: the ensemble, the default), a comma-separated list, "
        "or all",
    )
    p.add_argument(
        "--th-g",
        default="0.03",
        help="bound, a fraction of each layer's full scale; several increasing bounds separated "
        "by commas run a sweep (e.g. 0.01,0.02,0.03)",
    )
    p.add_argument(
        "--budget",
        default="default",
        help="effort of --method auto: fast (about F-LWC's time), default or thorough",
    )
    p.add_argument("--split", default="test", choices=["test", "val", "train"])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--mc-n", type=int, default=10_000, help="Monte Carlo instances")
    p.add_argument("--eta", type=float, default=None, help="F-LWC step (default th_g / 10)")
    p.add_argument("--no-eta-sweep", action="store_true", help="skip the Fig. 7 eta sweep")
    p.add_argument("--lwc-steps", type=int, default=None, help="LWC epochs per c value")
    p.add_argument("--search-steps", type=int, default=None, help="LWC c values tried")
    p.add_argument("--seed", type=C.seed, default=0)
    p.add_argument("--html", action="store_true", help="also write a self-contained report.html")
    C.add_output_options(p, "runs/worst-case", "report.json, figures, perturbations")
    p.set_defaults(run=run, trains=False)


def load_model(a):
    """The model named by --run, or the cached default for --dataset/--model/--quant."""
    if a.run_dir is not None:
        net, record = zoo.load_run(a.run_dir)
        return net, record, record["dataset"]
    quant = C.quant(a.quant)
    if a.model != "lenet" or a.dataset not in zoo.RECIPES:
        raise C.CLIError(
            f"no default training recipe for {a.model} on {a.dataset}; train it with "
            f"`cimext train --dataset {a.dataset} --model {a.model} --out DIR` and pass --run DIR"
        )
    if not a.quiet:
        print(f"model: {a.model} on {a.dataset} (trained on first use, then cached)")
    net, record = zoo.trained(a.dataset, a.model, quant, root=a.root, progress=not a.quiet)
    return net, record, a.dataset


def run(a: argparse.Namespace) -> int:
    """The ``cimext worst-case`` command."""
    try:
        methods = report.check_methods(a.method)
    except ValueError as e:
        raise C.CLIError(f"--method: {e}") from None
    th_gs = parse_th_g(a.th_g)
    if a.budget not in BUDGETS:
        raise C.CLIError(f"--budget must be one of {', '.join(BUDGETS)}, got {a.budget!r}")
    if a.eta is not None and not 0 < a.eta <= th_gs[0]:
        raise C.CLIError(f"--eta must be in (0, th_g = {th_gs[0]:g}], got {a.eta}")
    C.at_least(a, 1, "batch_size", "mc_n", "lwc_steps", "search_steps")
    C.check_out(a.out)
    if a.run_dir is None:
        C.quant(a.quant)  # a bad --quant fails before the default model is trained
    net, record, dataset = load_model(a)
    loader = data.loader(dataset, a.split, a.batch_size, root=a.root)
    lwc_kwargs = {}
    if a.lwc_steps is not None:
        lwc_kwargs["steps"] = a.lwc_steps
    if a.search_steps is not None:
        lwc_kwargs["search_steps"] = a.search_steps
    rep = report.analyze(
        net,
        loader,
        th_g=th_gs if len(th_gs) > 1 else th_gs[0],
        budget=a.budget,
        methods=methods,
        mc_n=a.mc_n,
        seed=a.seed,
        eta=a.eta,
        eta_sweep=None if a.no_eta_sweep else (1.0, 0.5, 0.25, 0.1, 0.05),
        lwc_kwargs=lwc_kwargs,
        progress=not a.quiet,
    )
    extra = dict(model_record=record, dataset=dataset, split=a.split)
    with C.output_folder(a.out) as out:
        files = report.write(rep, out, html=a.html, extra=extra)
    print(rep.format_table())
    print(f"written: {len(files)} files in {a.out} (report.json, figures *.png)")
    return 0


def parse_th_g(text) -> list[float]:
    """--th-g as a list of bounds: one number, or increasing numbers separated by commas."""
    parts = [t.strip() for t in str(text).split(",")]
    try:
        vals = [float(t) for t in parts]
    except ValueError:
        raise C.CLIError(
            f"--th-g must be a number or increasing numbers separated by commas, got {text!r}"
        ) from None
    for v in vals:
        if not (math.isfinite(v) and v > 0):
            raise C.CLIError(f"--th-g must be > 0, got {text}")
    if any(b <= a for a, b in zip(vals, vals[1:], strict=False)):
        raise C.CLIError(f"--th-g must be strictly increasing for a sweep, got {text}")
    return vals
