"""perturbed_linear: agreement with the reference and plain PyTorch, autograd, opcheck, bad input."""

import pytest
import torch
import torch.nn.functional as F

import cimext
from cimext import DeviceModel, ops

SPECS = {
    "none": {},
    "gaussian": dict(gaussian=0.05),
    "device": dict(device=DeviceModel()),
    "device_levels": dict(device=DeviceModel(level_sigma=(0.5, 1.5, 1.5, 0.5))),
    "device_verified": dict(device=DeviceModel.verified(0.03)),
    "rcg": dict(rcg=(0.1, 0.5)),
}


def _ref(*args, **kw):
    with cimext.backend("ref"):
        return ops.perturbed_linear(*args, **kw)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("batch,inp,out", [(1, 1, 1), (7, 97, 13), (5, 1025, 7), (33, 64, 97)])
def test_matches_reference(name, batch, inp, out):
    g = torch.Generator().manual_seed(batch * inp + out)
    x = torch.randn(batch, inp, generator=g)
    w = torch.randn(out, inp, generator=g)
    b = torch.randn(out, generator=g)
    kw = dict(SPECS[name], seed=2**63 + 5, layer_id=2)
    torch.testing.assert_close(ops.perturbed_linear(x, w, b, **kw), _ref(x, w, b, **kw))


def test_equals_plain_linear_on_materialized_weight():
    x, w, b = torch.randn(16, 40), torch.randn(24, 40), torch.randn(24)
    dev = DeviceModel(sigma=0.3)
    y = ops.perturbed_linear(x, w, b, device=dev, seed=42, layer_id=1)
    torch.testing.assert_close(y, F.linear(x, w + ops.noise(w, dev, 42, 1), b))


@pytest.mark.parametrize("x_stacked", [False, True])
def test_many_instances_and_delta(x_stacked):
    seeds = [0, 1, 2**64 - 1]
    x = torch.randn(3, 4, 9, 50) if x_stacked else torch.randn(4, 9, 50)
    w, b, d = torch.randn(30, 50), torch.randn(30), 0.01 * torch.randn(30, 50)
    kw = dict(device=DeviceModel(), seeds=seeds, delta=d, x_stacked=x_stacked)
    y = ops.perturbed_linear(x, w, b, **kw)
    assert y.shape == (3, 4, 9, 30)
    torch.testing.assert_close(y, _ref(x, w, b, **kw))
    for i, s in enumerate(seeds):
        xi = x[i] if x_stacked else x
        torch.testing.assert_close(
            y[i], ops.perturbed_linear(xi, w, b, device=DeviceModel(), seed=s, delta=d)
        )


def test_delta_only_is_exact_linear():
    x, w, d = torch.randn(6, 11), torch.randn(5, 11), torch.randn(5, 11)
    torch.testing.assert_close(ops.perturbed_linear(x, w, delta=d), F.linear(x, w + d))


def test_verify_mask():
    x, w = torch.randn(8, 20), torch.randn(12, 20)
    mask = torch.rand(12, 20) < 0.5
    dev = DeviceModel(sigma=0.5)
    y = ops.perturbed_linear(x, w, device=dev, seed=3, verify_mask=mask)
    torch.testing.assert_close(y, _ref(x, w, device=dev, seed=3, verify_mask=mask))


def test_noncontiguous_and_empty():
    x = torch.randn(20, 8).t()  # (8, 20), not contiguous
    w = torch.randn(20, 6).t()  # (6, 20)
    dev = DeviceModel()
    torch.testing.assert_close(
        ops.perturbed_linear(x, w, device=dev, seed=1),
        ops.perturbed_linear(x.contiguous(), w.contiguous(), device=dev, seed=1),
    )
    y = ops.perturbed_linear(torch.empty(0, 20), w.contiguous(), torch.zeros(6), device=dev, seed=1)
    assert y.shape == (0, 6)
    y = ops.perturbed_linear(torch.empty(2, 0, 20), w, device=dev, seeds=[1, 2])
    assert y.shape == (2, 2, 0, 6)


def test_float64():
    x, w = torch.randn(5, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    y = ops.perturbed_linear(x, w, device=DeviceModel(), seed=7)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, _ref(x, w, device=DeviceModel(), seed=7))


GRAD_SPECS = ["gaussian", "device", "device_verified", "rcg", "none"]


@pytest.mark.parametrize("name", GRAD_SPECS)
@pytest.mark.parametrize("x_stacked", [False, True])
def test_gradcheck(name, x_stacked):
    S = 2
    x = torch.randn(*((S,) if x_stacked else ()), 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    d = (0.01 * torch.randn(4, 5, dtype=torch.float64)).requires_grad_()
    kw = dict(SPECS[name], seeds=[3, 4], x_stacked=x_stacked, scale=1.0)
    assert torch.autograd.gradcheck(
        lambda x, w, b, d: ops.perturbed_linear(x, w, b, delta=d, **kw), (x, w, b, d)
    )


def test_grad_matches_reference():
    x = torch.randn(6, 10, requires_grad=True)
    w = torch.randn(7, 10, requires_grad=True)
    kw = dict(device=DeviceModel(level_sigma=(1.0, 2.0, 2.0, 1.0)), seeds=[1, 2, 3])
    ops.perturbed_linear(x, w, **kw).square().sum().backward()
    gx, gw = x.grad, w.grad
    x.grad = w.grad = None
    _ref(x, w, **kw).square().sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


def _schema_args(x, w, b, d, stacked, seeds, mode=2, mask=None):
    seeds = torch.tensor(seeds)
    return (x, w, b, d, stacked, seeds, 1, mode, 1.5, 8, 2, 0.1, [], 0.01, 0.06, False, mask)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    x = torch.randn(3, 5, requires_grad=requires_grad)
    w = torch.randn(4, 5, requires_grad=requires_grad)
    b = torch.randn(4, requires_grad=requires_grad)
    d = torch.randn(4, 5, requires_grad=requires_grad)
    op = torch.ops.cimext.perturbed_linear.default
    torch.library.opcheck(op, _schema_args(x, w, b, d, False, [1, -7]))
    xs = torch.randn(2, 3, 5, requires_grad=requires_grad)
    torch.library.opcheck(op, _schema_args(xs, w, None, None, True, [1, 2], mode=3))
    # scale None: the op takes max|W| itself.
    args = list(_schema_args(x, w, b, None, False, [4]))
    args[8] = None
    torch.library.opcheck(op, tuple(args))
    torch.library.opcheck(op, _schema_args(x, w, b, None, False, [5], mask=torch.rand(4, 5) < 0.5))


# --- bad input -----------------------------------------------------------------------------------
X, W = torch.randn(3, 5), torch.randn(4, 5)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: ops.perturbed_linear(X.double(), W, device=DeviceModel()), TypeError, "dtype"),
        (
            lambda: ops.perturbed_linear(X.to(torch.int32), W.to(torch.int32)),
            TypeError,
            "float32",
        ),
        (lambda: ops.perturbed_linear(X.to("meta"), W), ValueError, "weight is on"),
        (lambda: ops.perturbed_linear(torch.randn(3, 6), W), ValueError, "x.shape"),
        (lambda: ops.perturbed_linear(X, W, torch.randn(5)), ValueError, "bias"),
        (lambda: ops.perturbed_linear(X, W, delta=torch.randn(5, 4)), ValueError, "delta"),
        (lambda: ops.perturbed_linear(X, W, seed=2**64), ValueError, "seed"),
        (lambda: ops.perturbed_linear(X, W, seed=-1), ValueError, "seed"),
        (lambda: ops.perturbed_linear(X, W, seed=1.5), TypeError, "seed"),
        (lambda: ops.perturbed_linear(X, W, seeds=[]), ValueError, "seeds"),
        (lambda: ops.perturbed_linear(X, W, seeds=[1, 2**70]), ValueError, r"seeds\[1\]"),
        (lambda: ops.perturbed_linear(X, W, layer_id=-1), ValueError, "layer_id"),
        (lambda: ops.perturbed_linear(X, W, rcg=(-0.1, 1.0)), ValueError, "sigma_t"),
        (lambda: ops.perturbed_linear(X, W, rcg=(0.1, -1.0)), ValueError, "th"),
        (lambda: ops.perturbed_linear(X, W, rcg=(0.1, float("nan"))), ValueError, "th"),
        (lambda: ops.perturbed_linear(X, W, gaussian=-1.0), ValueError, "gaussian"),
        (lambda: ops.perturbed_linear(X, W, device="rram"), TypeError, "DeviceModel"),
        (
            lambda: ops.perturbed_linear(X, W, device=DeviceModel(), rcg=(0.1, 1)),
            ValueError,
            "at most one",
        ),
        (lambda: ops.perturbed_linear(X, W, scale=-1.0), ValueError, "scale"),
        (lambda: ops.perturbed_linear(X, W, x_stacked=True), ValueError, "x_stacked"),
        (
            lambda: ops.perturbed_linear(X, W, seeds=[1, 2], x_stacked=True),
            ValueError,
            "x_stacked",
        ),
        (
            lambda: ops.perturbed_linear(X, W, verify_mask=torch.ones(5, 4, dtype=torch.bool)),
            ValueError,
            "verify_mask",
        ),
        (
            lambda: ops.perturbed_linear(X, W, verify_mask=torch.ones(4, 5)),
            TypeError,
            "verify_mask",
        ),
        (lambda: ops.perturbed_linear(X, torch.randn(2, 4, 5)), ValueError, "2-D"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(weight_bits=8, bits_per_device=3), "divide"),
        (dict(sigma=-0.1), "sigma"),
        (dict(th=-1.0), "th"),
        (dict(level_sigma=(1.0, 2.0)), "level_sigma"),
        (dict(sigma=float("nan")), "sigma"),
        (dict(weight_bits=0), "weight_bits"),
    ],
)
def test_bad_device_model(kw, match):
    with pytest.raises(ValueError, match=match):
        DeviceModel(**kw)


def test_schema_level_checks():
    # The C++ kernel checks its own arguments too (callers may skip the Python wrapper).
    op = torch.ops.cimext.perturbed_linear
    one = torch.tensor([1])
    with pytest.raises(ValueError, match="bits_per_device"):
        op(X, W, None, None, False, one, 0, 2, 1.0, 8, 3, 0.1, [], 0.0, 0.0, False, None)
    with pytest.raises(ValueError, match="sigma"):
        op(X, W, None, None, False, one, 0, 2, 1.0, 8, 2, -0.1, [], 0.0, 0.0, False, None)
    with pytest.raises(ValueError, match="th"):
        op(X, W, None, None, False, one, 0, 3, 1.0, 8, 2, 0.1, [], 0.0, float("nan"), False, None)
    with pytest.raises(ValueError, match="kind"):
        op(X, W, None, None, False, one, 0, 9, 1.0, 8, 2, 0.1, [], 0.0, 0.0, False, None)
