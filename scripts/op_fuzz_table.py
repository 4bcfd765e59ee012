"""The op fuzz campaign: N generated bad calls per op on every CPU backend, and the table.

    OMP_NUM_THREADS=1 python scripts/op_fuzz_table.py --per-backend 600

Draws (op, corruption, seed) cases with hypothesis (tests/op_fuzz.py builds and classifies
them), spread evenly over the ops, until every backend has run at least --per-backend bad
calls; prints per op and backend: tried, clear, unclear, silent, crash, partial write, and one
example of each non-clear outcome. Exit status 1 when any of the last four columns is not 0.
Triton runs in its interpreter (TRITON_INTERPRET=1) on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import op_fuzz  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

COLUMNS = ("clear", "unclear", "silent", "crash", "partial write")


def make_campaign(op, backends, n, seed_, counts, examples):
    """A hypothesis test of ``n`` bad calls of ``op`` that records its outcomes."""
    corruptions = [c for c in op_fuzz.CORRUPTIONS if op in c.ops]

    @seed(seed_)
    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(c=st.sampled_from(corruptions), case_seed=st.integers(0, 2**32 - 1))
    def campaign(c, case_seed):
        result, outcomes = op_fuzz.check_case(op, c, case_seed, backends)
        for b, r in result.items():
            counts[(op, b)][r] += 1
            counts[(op, b)]["tried"] += 1
            if r != "clear":
                examples.setdefault(r, (op, b, c.name, case_seed, outcomes[b]))

    return campaign


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-backend", type=int, default=600, help="bad calls per backend")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    args = p.parse_args()
    backends = op_fuzz.available_backends()
    counts: dict[tuple[str, str], collections.Counter] = collections.defaultdict(
        collections.Counter
    )
    examples: dict[str, tuple] = {}
    per_op = -(-args.per_backend // len(op_fuzz.OPS))
    t0 = time.perf_counter()
    for op in op_fuzz.OPS:
        make_campaign(op, backends, per_op, args.seed, counts, examples)()
    elapsed = time.perf_counter() - t0
    head = f"{'op':<18}{'backend':<9}{'tried':>7}" + "".join(f"{c:>15}" for c in COLUMNS)
    print(head)
    print("-" * len(head))
    totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for (op, b), c in counts.items():
        totals[b].update(c)
        print(f"{op:<18}{b:<9}{c['tried']:>7}" + "".join(f"{c[k]:>15}" for k in COLUMNS))
    print("-" * len(head))
    for b, c in totals.items():
        print(f"{'all ops':<18}{b:<9}{c['tried']:>7}" + "".join(f"{c[k]:>15}" for k in COLUMNS))
    print(
        f"\n{elapsed:.0f} s; corruptions: {len(op_fuzz.CORRUPTIONS)}, (op, corruption) pairs: "
        f"{len(op_fuzz.CASES)}"
    )
    for kind, ex in examples.items():
        print(f"example {kind}: {ex}")
    bad = sum(c[k] for c in totals.values() for k in COLUMNS[1:])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
