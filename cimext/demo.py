"""``cimext demo``: the main job on the embedded default, in one command.

Trains a 4-bit LeNet on the digits data set that ships with scikit-learn (or reuses it from the
cache, see cimext.zoo), then runs Monte Carlo over 1,000 write-verified device instances, weight
PGD, F-LWC, LWC and the ensemble worst_case ("auto", the default analysis, with its stages) at
th_g = 0.03, prints the Table-I-style comparison and writes a self-contained report (report.html
with the figures embedded, report.json, the perturbations) into --out.
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: train (or reuse) a 4-bit LeNet on digits and find its worst case",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("--out", default="runs/demo", help="report folder (default runs/demo)")
    p.add_argument(
        "--th-g",
        default="0.03",
        help="bound, fraction of full scale (increasing bounds separated by commas: a sweep)",
    )
    p.add_argument("--mc-n", type=int, default=1000, help="Monte Carlo instances")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(a) -> int:
    from .worstcase import cli as wc

    args = argparse.Namespace(
        run=None,
        dataset="digits",
        root=None,
        model="lenet",
        quant="4,4",
        method="all",
        th_g=a.th_g,
        budget="default",
        split="test",
        batch_size=512,
        mc_n=a.mc_n,
        eta=None,
        no_eta_sweep=False,
        lwc_steps=None,
        search_steps=None,
        seed=a.seed,
        html=True,
        out=a.out,
        quiet=a.quiet,
    )
    code = wc.run(args)
    if code == 0:
        print(f"open {a.out}/report.html for the figures")
    return code
