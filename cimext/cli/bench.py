"""``cimext bench``: the kernel benchmarks of bench/suite.py (each op against plain PyTorch,
timed interleaved in one process), as a table and optionally JSON. A thin entry point: the
benchmark code lives in the source checkout's bench/ folder, beside the cimext package."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

import torch

from . import _common as C

BACKENDS = ("auto", "cpp", "triton", "ref", "all")


def add_parser(sub) -> None:
    """Register the ``bench`` subcommand."""
    p = sub.add_parser(
        "bench",
        help="kernel benchmarks against plain PyTorch (a table; --json for the rows)",
        description=__doc__.replace("\n", " "),
    )
    p.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="backend of the cimext rows; 'all' puts every available backend side by side",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--case", metavar="TEXT", help="only the cases whose name contains TEXT")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON to this file")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    p.set_defaults(run=run, trains=False)


def check(a: argparse.Namespace) -> None:
    """The options, before any benchmark runs."""
    try:
        device = torch.device(a.device)
    except (RuntimeError, ValueError):
        raise C.CLIError(f"--device must be cpu or cuda (cuda:N), got {a.device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise C.CLIError(f"--device must be cpu or cuda (cuda:N), got {a.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise C.CLIError(f"--device {a.device}: no CUDA GPU is available")
    if a.backend == "triton" and importlib.util.find_spec("triton") is None:
        raise C.CLIError("--backend triton: triton is not installed (pip install triton)")
    if a.json is not None:
        path = Path(a.json)
        if not a.json.strip() or path.is_dir():
            raise C.CLIError(f"--json {a.json}: is a folder; name a file such as bench.json")
        if not path.parent.is_dir():
            raise C.CLIError(f"--json {a.json}: no folder {path.parent}")


def load_suite():
    """bench/suite.py of the checkout this cimext comes from (imported as ``bench.suite``)."""
    root = Path(__file__).resolve().parents[2]
    init = root / "bench" / "__init__.py"
    if not (root / "bench" / "suite.py").is_file():
        raise C.CLIError(
            f"cimext bench runs bench/suite.py of a source checkout; there is none in {root} "
            "(install cimext from a clone of the repository)"
        )
    known = sys.modules.get("bench")
    if known is not None and Path(getattr(known, "__file__", "") or "").resolve() != init:
        raise C.CLIError(f"another module named bench is loaded ({known!r}); run from a clone")
    if known is None:
        spec = importlib.util.spec_from_file_location("bench", init)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench"] = module
        spec.loader.exec_module(module)
    return importlib.import_module("bench.suite")


def run(a: argparse.Namespace) -> int:
    """The ``cimext bench`` command."""
    check(a)
    suite = load_suite()
    if a.case is not None and not suite.case_names(quick=a.quick, match=a.case):
        raise C.CLIError(f"--case {a.case!r} matches no benchmark case (see cimext bench --list)")
    if a.list:
        print("\n".join(suite.case_names(quick=a.quick, match=a.case)))
        return 0
    where = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}, {a.backend}")
    rows = suite.run(quick=a.quick, backend=a.backend, device=a.device, only=a.case)
    print(suite.format_table(rows))
    if a.json:
        meta = dict(torch=torch.__version__, threads=torch.get_num_threads())
        C.write_json(a.json, dict(meta, rows=rows))
        print(f"written: {a.json}")
    return 0
