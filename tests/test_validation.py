"""Argument checks at the Python entry points: flags, seeds, dtypes and edge shapes agree on
every backend (issue 14; the schema-level checks are fuzzed in tests/test_op_fuzz.py)."""

from __future__ import annotations

import math

import op_fuzz
import pytest
import torch

import cimext
from cimext import ops
from cimext.device import DeviceModel

BACKENDS = op_fuzz.available_backends()


def _errors(fn) -> dict[str, tuple[str, str]]:
    out = {}
    for b in BACKENDS:
        with cimext.backend(b):
            with pytest.raises((TypeError, ValueError, RuntimeError)) as e:
                fn()
        out[b] = (type(e.value).__name__, str(e.value))
    return out


def _same_error(fn, *words) -> None:
    errs = _errors(fn)
    assert len(set(errs.values())) == 1, errs
    typ, msg = next(iter(errs.values()))
    assert all(w in msg for w in words), msg


@pytest.mark.parametrize("value", ["no", "False", 0, 1, None, 1.0])
def test_device_model_verify_takes_only_bools(value):
    with pytest.raises(TypeError, match="verify must be a bool"):
        DeviceModel(verify=value)


def test_device_model_level_sigma_refuses_strings():
    with pytest.raises(TypeError, match="level_sigma"):
        DeviceModel(level_sigma="1111")
    with pytest.raises(TypeError, match="level_sigma"):
        DeviceModel(level_sigma=("1", "1", "1", "1"))


@pytest.mark.parametrize("value", ["no", 1, None])
def test_x_stacked_takes_only_bools(value):
    x, w = torch.randn(2, 3, 5), torch.randn(4, 5)
    _same_error(
        lambda: ops.perturbed_linear(x, w, seeds=[1, 2], x_stacked=value), "x_stacked", "bool"
    )


@pytest.mark.parametrize("value", ["no", 1])
def test_layer_flags_take_only_bools(value):
    with pytest.raises(TypeError, match="bias must be a bool"):
        cimext.nn.CiMLinear(3, 4, bias=value)
    with pytest.raises(TypeError, match="bias must be a bool"):
        cimext.nn.CiMConv2d(3, 4, 3, bias=value)
    with pytest.raises(TypeError, match="inplace must be a bool"):
        cimext.convert(torch.nn.Sequential(torch.nn.Linear(3, 4)), inplace=value)


@pytest.mark.parametrize(
    "seed,exc",
    [
        (-1, ValueError),
        (2**64, ValueError),
        (2**64 + 5, ValueError),
        (1.5, TypeError),
        ("3", TypeError),
        (True, TypeError),
        (float("nan"), TypeError),
    ],
)
def test_seeds_outside_range_or_not_integers_are_errors(seed, exc):
    x, w = torch.randn(2, 5), torch.randn(4, 5)
    dev = DeviceModel()
    for b in BACKENDS:
        with cimext.backend(b):
            with pytest.raises(exc, match="seed"):
                ops.perturbed_linear(x, w, device=dev, seed=seed)
            with pytest.raises(exc, match="seed"):
                ops.perturbed_linear(x, w, device=dev, seeds=[3, seed])
            with pytest.raises(exc, match="seed"):
                ops.noise(w, dev, seed)
            with pytest.raises(exc, match="seed"):
                ops.bitflip(w, 0.1, seed=seed)
    model = cimext.convert(torch.nn.Sequential(torch.nn.Linear(5, 4)))
    with pytest.raises(exc, match="seed"):
        with cimext.instance(model, seed):
            pass


def test_signed_narrow_seed_tensors_are_refused():
    x, w = torch.randn(2, 5), torch.randn(4, 5)
    with pytest.raises(TypeError, match="seeds must be an int64 tensor"):
        ops.perturbed_linear(
            x, w, device=DeviceModel(), seeds=torch.tensor([-1], dtype=torch.int32)
        )
    # Unsigned tensors are taken by value; int64 tensors are seed bit patterns.
    a = ops.perturbed_linear(x, w, device=DeviceModel(), seeds=torch.tensor([7], dtype=torch.uint8))
    b = ops.perturbed_linear(x, w, device=DeviceModel(), seeds=[7])
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_weight_error_names_the_weight(bad):
    x, w = torch.randn(2, 5), torch.randn(4, 5)
    w[1, 2] = bad
    _same_error(
        lambda: ops.perturbed_linear(x, w, device=DeviceModel(), seed=1), "weight", "inf or NaN"
    )
    _same_error(lambda: ops.noise(w, DeviceModel(), 1), "weight", "inf or NaN")
    c = torch.randn(3, 2, 3, 3)
    c[0, 0, 0, 0] = bad
    _same_error(
        lambda: ops.perturbed_conv2d(torch.randn(1, 2, 5, 5), c, device=DeviceModel()),
        "weight",
        "inf or NaN",
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["linear", "conv2d", "noise"])
def test_half_precision_works_on_cpp_as_on_ref(dtype, op):
    torch.manual_seed(0)
    dev = DeviceModel(sigma=0.05)
    if op == "linear":
        x, w, b = torch.randn(3, 7), torch.randn(5, 7), torch.randn(5)
        args = [t.to(dtype) for t in (x, w, b)]
        run = lambda: ops.perturbed_linear(*args, device=dev, seeds=[1, 2])  # noqa: E731
    elif op == "conv2d":
        x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
        args = [t.to(dtype) for t in (x, w)]
        run = lambda: ops.perturbed_conv2d(*args, padding=1, device=dev, seed=3)  # noqa: E731
    else:
        w = torch.randn(6, 5).to(dtype)
        run = lambda: ops.noise(w, dev, 5)  # noqa: E731
    with cimext.backend("ref"):
        expected = run()
    with cimext.backend("cpp"):
        got = run()
    assert got.dtype == dtype
    # cpp computes in float32 and rounds once; ref adds and multiplies in the low precision.
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("x_stacked", [False, True])
def test_zero_in_features(x_stacked):
    w, b = torch.randn(4, 0), torch.randn(4)
    x = torch.randn(*((2,) if x_stacked else ()), 3, 2, 0)
    outs = {}
    for backend in BACKENDS:
        with cimext.backend(backend):
            outs[backend] = ops.perturbed_linear(
                x, w, b, device=DeviceModel(), seeds=[1, 2], x_stacked=x_stacked
            )
    for y in outs.values():
        assert y.shape == (2, 3, 2, 4)
        torch.testing.assert_close(y, b.expand(2, 3, 2, 4))


def test_ref_backend_checks_shapes_like_cpp():
    """The ref gaps of issue 14: x_stacked with a wrong leading size, a 1-D weight, a (1, out)
    bias; and sign_step_ on ref writing the first tensor before failing on the second."""
    w = torch.randn(4, 5)
    _same_error(
        lambda: ops.perturbed_linear(torch.randn(3, 2, 5), w, seeds=[1, 2], x_stacked=True),
        "x.shape[0]",
    )
    _same_error(lambda: ops.perturbed_linear(torch.randn(2, 5), torch.randn(5)), "weight")
    _same_error(lambda: ops.perturbed_linear(torch.randn(2, 5), w, torch.randn(1, 4)), "bias")
    for b in BACKENDS:
        d0, d1 = torch.zeros(3), torch.zeros(2)
        with cimext.backend(b), pytest.raises(ValueError, match="grads\\[1\\]"):
            ops.sign_step_([d0, d1], [torch.ones(3), torch.ones(4)], 0.1, 1.0)
        assert d0.eq(0).all(), b


def test_inference_tensors_are_refused_alike():
    with torch.inference_mode():
        t = torch.randn(8)
        d = torch.zeros(3)
    _same_error(lambda: ops.bitflip_(t, 0.5, seed=1), "inference")
    _same_error(lambda: ops.sign_step_([d], [torch.ones(3)], 0.1, 1.0), "inference")
    # Inside inference mode they may be written, as with ATen's in-place ops.
    for b in BACKENDS:
        with cimext.backend(b), torch.inference_mode():
            ops.sign_step_([d], [torch.ones(3)], 0.1, 1.0)


def test_check_ops_pass_opcheck():
    """The check-only ops are ops too: opcheck-clean (the scale they return is data, not a
    constant baked into a traced graph)."""
    from cimext.ops import _registry

    x, w = torch.randn(3, 5), torch.randn(4, 5)
    noise = dict(
        seeds=torch.tensor([1, 2]),
        layer_id=0,
        kind=2,
        scale=None,
        weight_bits=8,
        bits_per_device=2,
        sigma=0.1,
        level_sigma=[],
        verified_sigma=0.01,
        th=0.06,
        verify=False,
        verify_mask=None,
    )
    lin = _registry.bind(
        "perturbed_linear", x=x, weight=w, bias=None, delta=None, x_stacked=False, **noise
    )
    assert float(torch.ops.cimext._check_perturbed_linear(*lin)) == float(w.abs().max())
    cases = [
        ("_check_perturbed_linear", lin),
        ("_check_noise", _registry.bind("noise", weight=w, **noise)),
        ("_check_sign_step_", ([torch.zeros(3)], [torch.ones(3)], 0.1, [1.0])),
        ("_check_bitflip", (torch.randn(4), 0.1, 0.1, 255, 1, 0, False, True)),
    ]
    for name, args in cases:
        torch.library.opcheck(getattr(torch.ops.cimext, name).default, args)
