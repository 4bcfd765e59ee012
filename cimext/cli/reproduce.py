"""``cimext reproduce``: every study of the library on one data set, and one results table.

Runs, each into its own folder under --out, the subcommands behind the README's results table:

1. ``worst-case``: LWC vs weight PGD vs Monte Carlo, and F-LWC vs LWC (the default LeNet, 4-bit);
2. ``compare``: vanilla / VA / TRICE / A-TRICE training and their LWC worst cases;
3. ``write-verify``: U-SWIM vs SWIM vs magnitude selective write-verify (pulses at equal accuracy);
4. ``bitflip``: bit-flip midpoints per storage dtype and bit set;

then gathers their JSON into ``results.json`` and ``results.md`` (Markdown tables) and prints
the tables. ``--quick`` shrinks every study (fewer epochs, instances, seeds) to check the pipeline
in minutes; the full run is what the README's table shows. ``--parts`` picks studies. An
interrupted run keeps its finished studies: the same command again resumes with the next one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import _common as C
from . import bitflip, compare, worst_case, write_verify

PARTS = ("worst-case", "compare", "write-verify", "bitflip")
MODULES = {
    "worst-case": worst_case,
    "compare": compare,
    "write-verify": write_verify,
    "bitflip": bitflip,
}
# The JSON file each study writes last: its presence means the study finished.
RESULT_FILES = {
    "worst-case": "report.json",
    "compare": "compare.json",
    "write-verify": "write_verify.json",
    "bitflip": "bitflip.json",
}
STATE = "reproduce-state.json"


def add_parser(sub) -> None:
    """Register the ``reproduce`` subcommand."""
    p = sub.add_parser(
        "reproduce",
        help="run every study (worst case, training, write-verify, bit flips) and tabulate",
        description=__doc__.split("\n\n")[0],
    )
    C.add_data_options(p, model=False)
    p.set_defaults(dataset="fashion-mnist")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {','.join(PARTS)}")
    p.add_argument("--quick", action="store_true", help="small settings (a pipeline check)")
    C.add_output_options(p, "runs/reproduce", "one folder per study, results.md, results.json")
    p.set_defaults(run=run, trains=False)


def _commands(a, out: Path) -> dict[str, list[str]]:
    q = a.quick
    common = ["--dataset", a.dataset, "--model", "lenet"]
    if a.root:
        common += ["--root", a.root]
    if a.quiet:
        common.append("--quiet")
    return {
        "worst-case": [
            "worst-case",
            *common,
            "--quant",
            "4,4",
            "--method",
            "all",
            "--mc-n",
            "200" if q else "1000",
            "--out",
            str(out / "worst-case"),
        ],
        "compare": [
            "compare",
            *common,
            "--quant",
            "4,4",
            "--methods",
            "vanilla,va,trice,atrice",
            "--epochs",
            "2" if q else "10",
            "--th-g",
            "0.01,0.02,0.03",
            "--eval-samples",
            "300" if q else "1000",
            "--lwc-steps",
            "5" if q else "30",
            "--search-steps",
            "2" if q else "6",
            "--out",
            str(out / "compare"),
        ],
        "write-verify": [
            "write-verify",
            *common,
            "--epochs",
            "2" if q else "5",
            "--instances",
            "20" if q else "100",
            "--out",
            str(out / "write-verify"),
        ],
        "bitflip": [
            "bitflip",
            *common,
            "--epochs",
            "2" if q else "5",
            "--dtypes",
            "float32,float16,int8",
            "--bits",
            "all,exponent,mantissa",
            "--seeds",
            "1" if q else "3",
            "--test-samples",
            "300" if q else "2000",
            "--out",
            str(out / "bitflip"),
        ],
    }


_load = C.read_json


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * float(v):.2f}%"


def tables(out: Path) -> tuple[str, dict]:
    """Markdown tables from the studies' JSON files under ``out`` (missing studies are skipped)."""
    md, summary = [], {}
    wc = _load(out / "worst-case" / "report.json")
    if wc:
        md += [
            f"### Worst case at th_g = {wc['th_g']:g} (LeNet 4-bit)",
            "",
            "| method | accuracy | time (s) |",
            "|---|---|---|",
        ]
        for r in wc["table"]:
            t = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
            md.append(f"| {r['label']} | {_pct(r['accuracy'])} | {t} |")
        md.append("")
        summary["worst_case"] = wc["table"]
    cmp_ = _load(out / "compare" / "compare.json")
    if cmp_:
        main = f"{cmp_['main_th_g']:g}"
        md += [
            f"### Training methods: clean and LWC worst case at th_g = {main}",
            "",
            "| method | clean | worst case |",
            "|---|---|---|",
        ]
        rows = []
        for m in cmp_["methods"]:
            runs = [r for r in cmp_["runs"] if r["method"] == m]
            clean = sum(r["test_accuracy"] for r in runs) / max(len(runs), 1)
            worst = sum(r["worst_case"][main] for r in runs) / max(len(runs), 1)
            md.append(f"| {m} | {_pct(clean)} | {_pct(worst)} |")
            rows.append(dict(method=m, clean=clean, worst_case=worst))
        md.append("")
        summary["compare"] = rows
    wv = _load(out / "write-verify" / "write_verify.json")
    if wv and isinstance(wv.get("speedup"), dict):
        md += [
            "### Selective write-verify: pulses saved at ≤ 0.5 point accuracy loss",
            "",
            "| method | speedup over full write-verify | fraction verified |",
            "|---|---|---|",
        ]
        for m, sp in wv["speedup"].items():
            if isinstance(sp, dict):
                frac = sp.get("fraction")
                speed = sp.get("speedup")
                md.append(
                    f"| {m} | {'n/a' if speed is None else f'{speed:.2f}x'} | "
                    f"{'n/a' if frac is None else f'{100 * frac:.1f}%'} |"
                )
        md.append("")
        summary["write_verify"] = wv["speedup"]
    bf = _load(out / "bitflip" / "bitflip.json")
    if bf and isinstance(bf.get("results"), list):
        md += [
            "### Bit-flip midpoints (flip probability at half the accuracy drop)",
            "",
            "| dtype | bits | midpoint p |",
            "|---|---|---|",
        ]
        for r in bf["results"]:
            m = r.get("midpoint")
            md.append(
                f"| {r.get('dtype')} | {r.get('bits')} | "
                f"{'n/a' if m is None else f'{float(m):.3g}'} |"
            )
        md.append("")
        summary["bitflip"] = [
            dict(dtype=r.get("dtype"), bits=r.get("bits"), midpoint=r.get("midpoint"))
            for r in bf["results"]
        ]
    return "\n".join(md), summary


def run_study(part: str, argv: list[str]) -> int:
    """Run one study's subcommand with ``argv`` (its options), parsed by its own parser."""
    parser = C.Parser(prog="cimext")
    MODULES[part].add_parser(parser.add_subparsers(dest="command"))
    a = parser.parse_args(argv)
    return a.run(a)


def run(a: argparse.Namespace) -> int:
    """The ``cimext reproduce`` command."""
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise C.CLIError(f"--parts must name some of {', '.join(PARTS)}; got {a.parts!r}")
    with C.output_folder(a.out, resumable=True) as out:
        cmds = _commands(a, out)
        state = _load(out / STATE) or {}
        done = set(state.get("done", [])) if state.get("commands") == cmds else set()
        seconds = dict(state.get("seconds", {})) if done else {}
        t0 = time.perf_counter()
        for p in parts:
            if p in done and (out / p / RESULT_FILES[p]).is_file():
                print(f"== {p}: finished in an earlier run, kept", flush=True)
                continue
            print(f"== {p}: cimext {' '.join(cmds[p])}", flush=True)
            t = time.perf_counter()
            try:
                code = run_study(p, cmds[p])
            except KeyboardInterrupt:
                raise C.Interrupted(
                    f"the finished studies are kept in {C.partial_dir(Path(a.out))}; the same "
                    "command resumes with the next one"
                ) from None
            seconds[p] = time.perf_counter() - t
            if code != 0:
                raise C.CLIError(
                    f"the {p} study failed (exit {code}); its command is printed above"
                )
            done.add(p)
            C.write_json(out / STATE, dict(commands=cmds, done=sorted(done), seconds=seconds))
        md, summary = tables(out)
        header = (
            f"Produced by `cimext reproduce --dataset {a.dataset}{' --quick' if a.quick else ''}` "
            f"in {time.perf_counter() - t0:.0f} s.\n\n"
        )
        C.write_text(out / "results.md", header + md)
        record = dict(
            dataset=a.dataset,
            quick=a.quick,
            parts=parts,
            seconds=seconds,
            commands=cmds,
            summary=summary,
        )
        C.write_json(out / "results.json", record)
    print()
    print(md)
    print(f"written: {a.out}/results.md, results.json")
    return 0
