"""perturbed_conv2d: agreement with the reference and plain PyTorch, autograd, opcheck, bad input."""

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

GEOMETRIES = [
    # (N, C_in, H, W, C_out, k, stride, padding, dilation, groups)
    (1, 1, 1, 1, 1, 1, 1, 0, 1, 1),
    (2, 3, 7, 9, 5, 3, 1, 1, 1, 1),
    (3, 4, 11, 8, 6, 3, 2, 1, 2, 2),
    (1, 6, 13, 13, 9, 2, (2, 1), (0, 1), 1, 3),
]


def _ref(*args, **kw):
    with cimext.backend("ref"):
        return ops.perturbed_conv2d(*args, **kw)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("geo", GEOMETRIES)
def test_matches_reference(name, geo):
    n, cin, h, wd, cout, k, s, p, d, g = geo
    x = torch.randn(n, cin, h, wd)
    w = torch.randn(cout, cin // g, k, k)
    b = torch.randn(cout)
    kw = dict(SPECS[name], seeds=[4, 2**64 - 2], layer_id=7)
    y = ops.perturbed_conv2d(x, w, b, s, p, d, g, **kw)
    torch.testing.assert_close(y, _ref(x, w, b, s, p, d, g, **kw))


def test_equals_plain_conv_on_materialized_weight():
    x, w, b = torch.randn(2, 3, 10, 10), torch.randn(4, 3, 3, 3), torch.randn(4)
    dev = DeviceModel(sigma=0.3)
    y = ops.perturbed_conv2d(x, w, b, 1, 1, device=dev, seed=9, layer_id=3)
    torch.testing.assert_close(y, F.conv2d(x, w + ops.noise(w, dev, 9, 3), b, 1, 1))


def test_stacked_input_and_delta():
    x = torch.randn(3, 2, 4, 8, 8)
    w, d = torch.randn(5, 4, 3, 3), 0.01 * torch.randn(5, 4, 3, 3)
    kw = dict(device=DeviceModel(), seeds=[1, 2, 3], delta=d, x_stacked=True)
    y = ops.perturbed_conv2d(x, w, None, 1, 1, **kw)
    assert y.shape == (3, 2, 5, 8, 8)
    torch.testing.assert_close(y, _ref(x, w, None, 1, 1, **kw))


def test_noncontiguous_and_empty_batch():
    x = torch.randn(8, 8, 3, 2).permute(3, 2, 0, 1)  # (2, 3, 8, 8), channels-last-like strides
    w = torch.randn(4, 3, 3, 3)
    y = ops.perturbed_conv2d(x, w, device=DeviceModel(), seed=1)
    torch.testing.assert_close(
        y, ops.perturbed_conv2d(x.contiguous(), w, device=DeviceModel(), seed=1)
    )
    assert ops.perturbed_conv2d(torch.empty(0, 3, 8, 8), w, device=DeviceModel(), seed=1).shape == (
        0,
        4,
        6,
        6,
    )


@pytest.mark.parametrize("name", ["gaussian", "device", "rcg"])
@pytest.mark.parametrize("x_stacked", [False, True])
def test_gradcheck(name, x_stacked):
    shape = (2, 1, 2, 5, 5) if x_stacked else (1, 2, 5, 5)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    d = (0.01 * torch.randn(3, 2, 3, 3, dtype=torch.float64)).requires_grad_()
    kw = dict(SPECS[name], seeds=[1, 2], x_stacked=x_stacked, scale=1.0)
    assert torch.autograd.gradcheck(
        lambda x, w, b, d: ops.perturbed_conv2d(x, w, b, 2, 1, delta=d, **kw), (x, w, b, d)
    )


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    x = torch.randn(2, 4, 6, 6, requires_grad=requires_grad)
    w = torch.randn(6, 2, 3, 3, requires_grad=requires_grad)
    b = torch.randn(6, requires_grad=requires_grad)
    op = torch.ops.cimext.perturbed_conv2d.default
    noise = (1, 2, 1.0, 8, 2, 0.1, [], 0.01, 0.06, False, None)
    seeds = torch.tensor([3, -4])
    torch.library.opcheck(op, (x, w, b, None, [1, 1], [1, 1], [1, 1], 2, False, seeds) + noise)
    xs = torch.randn(2, 1, 4, 6, 6, requires_grad=requires_grad)
    torch.library.opcheck(
        op, (xs, w, None, w.detach() * 0.01, [2, 1], [0, 1], [1, 2], 2, True, seeds.abs()) + noise
    )


X, W = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: ops.perturbed_conv2d(X.double(), W), TypeError, "dtype"),
        (lambda: ops.perturbed_conv2d(X.to("meta"), W), ValueError, "weight is on"),
        (lambda: ops.perturbed_conv2d(torch.randn(1, 2, 8, 8), W), ValueError, "channels"),
        (lambda: ops.perturbed_conv2d(X, torch.randn(4, 3, 3)), ValueError, "4-D"),
        (lambda: ops.perturbed_conv2d(X, W, torch.randn(3)), ValueError, "bias"),
        (lambda: ops.perturbed_conv2d(X, W, delta=torch.randn(4, 3, 1, 1)), ValueError, "delta"),
        (lambda: ops.perturbed_conv2d(X, W, stride=0), ValueError, "stride"),
        (lambda: ops.perturbed_conv2d(X, W, padding=-1), ValueError, "padding"),
        (lambda: ops.perturbed_conv2d(X, W, padding="same"), ValueError, "padding"),
        (lambda: ops.perturbed_conv2d(X, W, dilation=0), ValueError, "dilation"),
        (lambda: ops.perturbed_conv2d(X, W, groups=0), ValueError, "groups"),
        (lambda: ops.perturbed_conv2d(X, W, seed=2**64), ValueError, "seed"),
        (lambda: ops.perturbed_conv2d(X, W, rcg=(0.1, -1)), ValueError, "th"),
        (lambda: ops.perturbed_conv2d(X, W, seeds=[1, 2], x_stacked=True), ValueError, "5-D"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
