"""Every backend gives the same results through the public API (Triton runs in its interpreter
on CPU), and backend selection behaves."""

import pytest
import torch

import cimext
from cimext import DeviceModel, ops

SPECS = [
    dict(device=DeviceModel()),
    dict(device=DeviceModel(level_sigma=(0.5, 1.5, 1.5, 0.5))),
    dict(rcg=(0.1, 0.5)),
]


def _run(name, fn):
    with cimext.backend(name):
        return fn()


@pytest.mark.interpreter
@pytest.mark.parametrize("spec", SPECS, ids=["device", "levels", "rcg"])
def test_noise_triton_matches_cpp(spec):
    w = torch.randn(7, 97)
    if "device" in spec:
        fn = lambda: ops.noise(w, spec["device"], seeds=[3, 2**64 - 1], layer_id=4)  # noqa: E731
    else:
        fn = lambda: ops.rcg_noise(w, *spec["rcg"], seeds=[3, 2**64 - 1], layer_id=4)  # noqa: E731
    torch.testing.assert_close(_run("triton", fn), _run("cpp", fn), atol=1e-6, rtol=0)


@pytest.mark.interpreter
@pytest.mark.parametrize("spec", SPECS, ids=["device", "levels", "rcg"])
def test_perturbed_linear_triton_matches_cpp_with_grad(spec):
    x0, w0, b0 = torch.randn(5, 33), torch.randn(7, 33), torch.randn(7)
    results = {}
    for name in ("cpp", "triton"):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        y = _run(name, lambda: ops.perturbed_linear(x, w, b, seeds=[1, 2], **spec))  # noqa: B023
        y.square().sum().backward()
        results[name] = (y.detach(), x.grad, w.grad, b.grad)
    for a, b in zip(results["cpp"], results["triton"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.interpreter
def test_perturbed_conv2d_triton_matches_cpp():
    x, w = torch.randn(2, 4, 6, 6), torch.randn(6, 2, 3, 3)
    fn = lambda: ops.perturbed_conv2d(x, w, None, 2, 1, 1, 2, device=DeviceModel(), seed=5)  # noqa: E731
    torch.testing.assert_close(_run("triton", fn), _run("cpp", fn), rtol=1e-4, atol=1e-4)


@pytest.mark.interpreter
def test_opcheck_triton_namespace():
    ops.noise(torch.ones(2, 2), DeviceModel(), 0)  # ensure registered
    with cimext.backend("triton"):
        ops.noise(torch.ones(2, 2), DeviceModel(), 0)
    x, w = torch.randn(3, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    one = torch.tensor([1])
    args = (x, w, None, None, False, one, 0, 2, 1.0, 8, 2, 0.1, [], 0.01, 0.06, False, None)
    torch.library.opcheck(torch.ops.cimext_triton.perturbed_linear.default, args)


def test_set_backend_and_context():
    assert cimext.get_backend() == "auto"
    with cimext.backend("ref"):
        assert cimext.get_backend() == "ref"
    assert cimext.get_backend() == "auto"
    cimext.set_backend("cpp")
    try:
        assert cimext.get_backend() == "cpp"
    finally:
        cimext.set_backend("auto")
    with pytest.raises(ValueError, match="backend"):
        cimext.set_backend("cuda")
