"""``cimext reproduce``: the paper's studies on one data set over 3 seeds, and one results table.

A thin layer over :func:`cimext.reproduce.reproduce`: per seed it trains LeNet (4-bit weights
and inputs) with vanilla, VA, TRICE, adversarial and A-TRICE training and sweeps their worst
cases over th_g (Tables V/VI, Fig. 8), compares Monte Carlo, weight PGD, F-LWC, LWC and the
ensemble on the vanilla model (Tables I and IV), runs U-SWIM vs SWIM vs magnitude vs random
selective write-verify over device sigma, and finds bit-flip midpoints per storage dtype. It
writes ``results.json``, ``results.md`` and figures into --out. A killed run resumes where it
stopped when the same command is run again; a study that fails is marked failed in the table
and the others still run.
"""

from __future__ import annotations

import argparse

from .. import reproduce as R
from . import _common as C


def add_parser(sub) -> None:
    """Register the ``reproduce`` subcommand."""
    p = sub.add_parser(
        "reproduce",
        help="the paper's studies over 3 seeds (worst case, training, write-verify, bit flips)",
        description=__doc__.split("\n\n")[0],
    )
    C.add_data_options(p, model=False)
    p.set_defaults(dataset="fashion-mnist")
    p.add_argument(
        "--parts", default=",".join(R.PARTS), help=f"comma-separated: {','.join(R.PARTS)}"
    )
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    p.add_argument(
        "--eval-images",
        type=int,
        default=None,
        help="test images the worst-case, write-verify and bit-flip studies use (default 2000)",
    )
    p.add_argument("--mc-n", type=int, default=None, help="Monte Carlo instances (default 10000)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 10)")
    p.add_argument("--quick", action="store_true", help="small settings (a pipeline check)")
    C.add_output_options(p, "runs/reproduce", "results.md, results.json, figures, cache/")
    p.set_defaults(run=run, trains=False)


def _plan(a: argparse.Namespace) -> dict:
    if a.root:
        raise C.CLIError("--root is not supported by reproduce (it uses the installed data sets)")
    parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    seeds = None
    if a.seeds is not None:
        try:
            seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
        except ValueError:
            raise C.CLIError(f"--seeds must be comma-separated integers, got {a.seeds!r}") from None
    over = {}
    for opt, key in (("eval_images", "eval_images"), ("mc_n", "mc_n"), ("epochs", "epochs")):
        v = getattr(a, opt)
        if v is not None:
            if v < 1:
                raise C.CLIError(f"--{opt.replace('_', '-')} must be >= 1, got {v}")
            over[key] = v
    if "mc_n" in over:
        over["mc_block"] = min(over["mc_n"], 100 if a.quick else 2000)
    try:
        return R.plan(a.dataset, quick=a.quick, seeds=seeds, parts=parts, **over)
    except ValueError as e:
        msg = str(e)
        if msg.startswith("parts"):
            msg = f"--parts must name some of {', '.join(R.PARTS)}; got {a.parts!r}"
        elif msg.startswith("seeds"):
            msg = f"--{msg}"
        raise C.CLIError(msg) from None


def run(a: argparse.Namespace) -> int:
    """The ``cimext reproduce`` command."""
    plan = _plan(a)
    log = (lambda s: None) if a.quiet else (lambda s: print(s, flush=True))
    with C.output_folder(a.out, resumable=True, keep="cache") as out:
        try:
            res = R.reproduce(out, plan, progress=not a.quiet, log=log)
        except KeyboardInterrupt:
            raise C.Interrupted(
                f"the finished units are kept in {a.out}/cache; the same "
                "command resumes where it stopped"
            ) from None
    print()
    print(R.tables(res))
    total = res["seconds"]["total"]
    print(
        f"written: {a.out}/results.md, results.json, figures ({res['wall_seconds']:.0f} s this "
        f"run, {total:.0f} s of units in all)"
    )
    if res["failed"]:
        print(f"{len(res['failed'])} unit(s) failed; the same command retries them")
        return 1
    return 0
