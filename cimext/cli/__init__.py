"""The ``cimext`` command line: a thin layer over the library, which never imports it.

One module per subcommand (train, worst-case, montecarlo, compare, write-verify, bitflip, demo,
reproduce, bench), each with ``add_parser(sub)`` that registers its options and
``set_defaults(run=...)``; shared pieces live in ``_common``. Every subcommand prints one clear
line on stderr and exits non-zero on bad input, missing data, an unwritable --out or Ctrl-C;
results go to --out, which holds exactly one run (written beside it and swapped in whole)."""

from __future__ import annotations

import os
import sys

from . import bench, bitflip, compare, demo, montecarlo, reproduce, train, worst_case, write_verify
from ._common import CLIError, Interrupted, Parser, one_line

# The order of `cimext --help`.
SUBCOMMANDS = (
    demo,
    train,
    worst_case,
    montecarlo,
    compare,
    write_verify,
    bitflip,
    reproduce,
    bench,
)


def build_parser() -> Parser:
    """The ``cimext`` argument parser with every subcommand."""
    parser = Parser(
        prog="cimext",
        description="Worst-case analysis and protection of DNNs on compute-in-memory hardware.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cimext`` console script; returns the exit status: 0, 1 (a failure
    of the analysis or the data), 2 (bad command line) or 130 (Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    a = None
    try:
        a = parser.parse_args(argv)
        if getattr(a, "run", None) is None:
            names = ", ".join(m.__name__.rpartition(".")[2].replace("_", "-") for m in SUBCOMMANDS)
            raise CLIError(f"no command given: one of {names} (see cimext --help)")
        return a.run(a)
    except CLIError as e:
        print(f"cimext: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        print(f"cimext: error: {one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: one line, the traceback on request
        if os.environ.get("CIMEXT_DEBUG"):
            raise
        print(
            f"cimext: internal error: {type(e).__name__}: {one_line(e)} (set CIMEXT_DEBUG=1 "
            "for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
    except Interrupted as e:
        print(f"cimext: interrupted ({e})", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        trains = getattr(a, "trains", False)
        resume = (
            "; training resumes from its last finished epoch: run the same command again"
            if trains
            else ""
        )
        print(
            f"cimext: interrupted (--out is left as it was before this run{resume})",
            file=sys.stderr,
        )
        return 130


__all__ = ["CLIError", "build_parser", "main"]
