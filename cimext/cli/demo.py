"""``cimext demo``: the main job on the embedded default, in one command.

Trains a 4-bit LeNet on the digits data set that ships with scikit-learn (or reuses it from the
cache, see cimext.zoo), then runs Monte Carlo over 1,000 write-verified device instances, weight
PGD, F-LWC, LWC and the ensemble worst_case ("auto", the default analysis, with its stages) at
th_g = 0.03, prints the Table-I-style comparison and writes a self-contained report (report.html
with the figures embedded, report.json, the perturbations) into --out.
"""

from __future__ import annotations

import argparse

from . import _common as C
from . import worst_case


def add_parser(sub) -> None:
    """Register the ``demo`` subcommand."""
    p = sub.add_parser(
        "demo",
        help="the main job: train (or reuse) a 4-bit LeNet on digits and find its worst case",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument(
        "--th-g",
        default="0.03",
        help="bound, fraction of full scale (increasing bounds separated by commas: a sweep)",
    )
    p.add_argument("--mc-n", type=int, default=1000, help="Monte Carlo instances")
    p.add_argument("--seed", type=C.seed, default=0)
    C.add_output_options(p, "runs/demo", "report.html, report.json, figures")
    p.set_defaults(run=run, trains=False)


def worst_case_args(a: argparse.Namespace) -> argparse.Namespace:
    """The ``cimext worst-case`` command line the demo runs, parsed by worst-case's own parser
    (so the two never disagree on options or defaults)."""
    argv = ["--method", "all", "--th-g", a.th_g, "--mc-n", str(a.mc_n), "--seed", str(a.seed)]
    argv += ["--html", "--out", a.out] + (["--quiet"] if a.quiet else [])
    parser = C.Parser(prog="cimext")
    worst_case.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["worst-case", *argv])


def run(a: argparse.Namespace) -> int:
    """The ``cimext demo`` command."""
    code = worst_case.run(worst_case_args(a))
    if code == 0:
        print(f"open {a.out}/report.html for the figures")
    return code
