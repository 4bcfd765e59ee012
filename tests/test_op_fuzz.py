"""Property-based fuzzing of the ops' argument checks over every CPU backend (tests/op_fuzz.py).

Every generated bad call must raise on cpp, ref and triton (interpreted) the same exception type
with the same message, naming the op and the argument, and leave the tensors an in-place op
writes unchanged. CIMEXT_FUZZ_EXAMPLES sets the examples per op (default 12, inside the fast
subset's budget); scripts/op_fuzz_table.py runs the large campaign and prints the table.
"""

from __future__ import annotations

import os

import op_fuzz
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("CIMEXT_FUZZ_EXAMPLES", "12"))
BACKENDS = op_fuzz.available_backends()


@pytest.mark.parametrize("op", op_fuzz.OPS)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
@given(data=st.data())
def test_bad_argument_same_clear_error_on_every_backend(op, data):
    corruption = data.draw(
        st.sampled_from([c for c in op_fuzz.CORRUPTIONS if op in c.ops]), label="corruption"
    )
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    result, outcomes = op_fuzz.check_case(op, corruption, seed, BACKENDS)
    assert set(result.values()) == {"clear"}, (corruption.name, seed, result, outcomes)


@pytest.mark.parametrize("op,corruption", op_fuzz.CASES, ids=lambda v: getattr(v, "name", v))
def test_every_corruption_once(op, corruption):
    """Each (op, corruption) pair at least once, whatever hypothesis draws above."""
    result, outcomes = op_fuzz.check_case(op, corruption, 12345, BACKENDS)
    assert set(result.values()) == {"clear"}, (result, outcomes)


def test_valid_calls_pass_on_every_backend():
    """The generator's base calls are valid (so a corruption is what makes a case bad)."""
    import random

    from cimext.ops import _registry

    for op in op_fuzz.OPS:
        for seed in range(3):
            for backend in BACKENDS:
                a = op_fuzz.base_call(op, random.Random(seed))
                _registry.schema_op(op, backend)(*_registry.bind(op, **a))


def test_classifier_sees_silent_calls_and_partial_writes(monkeypatch):
    """The suite can fail: a valid call is "silent", and a backend that writes before it raises
    is a "partial write"."""
    from cimext.ops import _registry

    valid = op_fuzz.Corruption("none", ("sign_step_",), ("deltas",), lambda r, a: None)
    result, _ = op_fuzz.check_case("sign_step_", valid, 1, ["cpp", "ref"])
    assert set(result.values()) == {"silent"}

    def writes_then_raises(deltas, grads, eta, bounds, bound_tensors=None):
        deltas[0].add_(1.0)
        raise ValueError("sign_step_: deltas[1] is bad")

    monkeypatch.setitem(_registry._ref_impls, "sign_step_", writes_then_raises)
    bad = op_fuzz.Corruption("none", ("sign_step_",), ("deltas",), lambda r, a: None)
    result, outcomes = op_fuzz.check_case("sign_step_", bad, 1, ["ref"])
    assert result == {"ref": "partial write"}, outcomes
