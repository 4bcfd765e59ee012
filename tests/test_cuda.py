"""CUDA backends: the CUDA kernels and the compiled Triton kernels agree with the reference and
the CPU kernels. Skipped without a GPU (CI has none; run them where one is available)."""

import pytest
import torch

import cimext
from cimext import DeviceModel, ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SPECS = [
    dict(device=DeviceModel()),
    dict(device=DeviceModel(level_sigma=(0.5, 1.5, 1.5, 0.5))),
    dict(device=DeviceModel.verified(0.03)),
    dict(rcg=(0.1, 0.5)),
    dict(gaussian=0.05),
]
BACKENDS = ["cpp", "triton"]


def _on(backend, fn):
    with cimext.backend(backend):
        return fn()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", range(len(SPECS)))
@pytest.mark.parametrize("shape", [(1, 1), (7, 97), (97, 1025)])
def test_noise_matches_cpu(backend, spec, shape):
    spec = SPECS[spec]
    w = torch.randn(shape)
    if "device" in spec:
        fn = lambda t: ops.noise(t, spec["device"], seeds=[1, 2**64 - 1], layer_id=3)  # noqa: E731
    elif "rcg" in spec:
        fn = lambda t: ops.rcg_noise(t, *spec["rcg"], seeds=[1, 2**64 - 1], layer_id=3)  # noqa: E731
    else:
        fn = lambda t: ops.gaussian_noise(t, spec["gaussian"], seeds=[1, 2**64 - 1])  # noqa: E731
    cpu = fn(w)
    gpu = _on(backend, lambda: fn(w.cuda())).cpu()
    torch.testing.assert_close(gpu, cpu, atol=2e-6 * w.abs().max().item(), rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", range(len(SPECS)))
@pytest.mark.parametrize("x_stacked", [False, True])
def test_perturbed_linear_matches_cpu(backend, spec, x_stacked):
    spec = SPECS[spec]
    x = torch.randn(3, 33, 97) if x_stacked else torch.randn(33, 97)
    w, b, d = torch.randn(65, 97), torch.randn(65), 0.01 * torch.randn(65, 97)
    kw = dict(spec, seeds=[4, 5, 6], delta=d, x_stacked=x_stacked)
    cpu = ops.perturbed_linear(x, w, b, **kw)
    kw["delta"] = d.cuda()
    gpu = _on(backend, lambda: ops.perturbed_linear(x.cuda(), w.cuda(), b.cuda(), **kw)).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_perturbed_conv2d_matches_cpu_with_grad(backend):
    x0, w0 = torch.randn(2, 4, 9, 9), torch.randn(6, 2, 3, 3)
    kw = dict(device=DeviceModel(), seeds=[1, 2])
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    y = ops.perturbed_conv2d(x, w, None, 2, 1, 1, 2, **kw)
    y.square().sum().backward()
    xg, wg = x0.cuda().requires_grad_(), w0.cuda().requires_grad_()
    yg = _on(backend, lambda: ops.perturbed_conv2d(xg, wg, None, 2, 1, 1, 2, **kw))
    yg.square().sum().backward()
    torch.testing.assert_close(yg.detach().cpu(), y.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xg.grad.cpu(), x.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(wg.grad.cpu(), w.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_cuda(backend):
    x = torch.randn(3, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    with cimext.backend(backend):
        assert torch.autograd.gradcheck(
            lambda x, w: ops.perturbed_linear(x, w, device=DeviceModel(), seeds=[1, 2], scale=1.0),
            (x, w),
        )


def test_opcheck_cuda():
    x = torch.randn(3, 5, device="cuda", requires_grad=True)
    w = torch.randn(4, 5, device="cuda", requires_grad=True)
    seeds = torch.tensor([1, -7])
    args = (x, w, None, None, False, seeds, 1, 2, 1.5, 8, 2, 0.1, [], 0.01, 0.06, False, None)
    torch.library.opcheck(torch.ops.cimext.perturbed_linear.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_out_on_cuda(backend):
    w = torch.randn(7, 97, device="cuda")
    dev = DeviceModel(level_sigma=(0.5, 1.5, 1.5, 0.5))
    with cimext.backend(backend):
        want = ops.noise(w, dev, seeds=[3, 4])
        out = torch.full((2, 7, 97), float("nan"), device="cuda")
        assert ops.noise(w, dev, seeds=[3, 4], out=out) is out
        assert torch.equal(out, want)
        for bad, exc in (
            (torch.zeros(2, 7, 97), ValueError),  # on the CPU
            (torch.zeros(2, 7, 97, device="cuda", dtype=torch.float64), TypeError),
            (torch.zeros(3, 7, 97, device="cuda"), ValueError),
        ):
            with pytest.raises(exc, match="out"):
                ops.noise(w, dev, seeds=[3, 4], out=bad)
    # The CUDA op checks out itself (callers may skip the wrapper), before writing.
    args = (w, torch.tensor([1, 2]), 0, 2, None, 8, 2, 0.1, [], 0.01, 0.06, False, None)
    bad = torch.zeros(3, 7, 97, device="cuda")
    with pytest.raises(RuntimeError, match="out must have shape"):
        torch.ops.cimext.noise_out(*args, bad)
    assert not bad.any()


def test_compiled_model_on_cuda():
    """torch.compile (inductor) of a converted model on the GPU: instance and sampling."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    m = cimext.convert(net.cuda(), device=DeviceModel())
    x = torch.randn(5, 16, device="cuda")
    compiled = torch.compile(m, fullgraph=True)
    with cimext.instance(m, 3):
        torch.testing.assert_close(compiled(x), m(x))
    with cimext.sampling(m):
        compiled(x).sum().backward()
        compiled(x).sum().backward()


# ------------------------------------------------------------------------------------------------
# Tiles: the CUDA ops fill a bounded scratch (CIMEXT_CUDA_SCRATCH_ELEMENTS) with row tiles of
# W + δ + ΔW, or with whole small weights for a chunk of instances; the Triton row-tile path does
# the same (triton_kernels.perturbed_linear.SCRATCH_ELEMENTS). Small bounds force many tiles.
# ------------------------------------------------------------------------------------------------
def _small_scratch(monkeypatch, backend, elements):
    if backend == "cpp":
        monkeypatch.setenv("CIMEXT_CUDA_SCRATCH_ELEMENTS", str(elements))
    else:
        import triton_kernels.perturbed_linear as linear_mod

        monkeypatch.setattr(linear_mod, "SCRATCH_ELEMENTS", elements)
        monkeypatch.setattr(linear_mod, "FORCE_PATH", "rows")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("elements", [30, 500, 1 << 22])  # a row per tile, row tiles, chunks
@pytest.mark.parametrize("x_stacked", [False, True])
@pytest.mark.parametrize("spec", [0, 2, 3])
def test_perturbed_linear_tiles_match_cpu(monkeypatch, backend, elements, x_stacked, spec):
    spec = SPECS[spec]
    S = 5
    x = torch.randn(S, 2, 7, 29) if x_stacked else torch.randn(2, 7, 29)
    w, b, d = torch.randn(33, 29), torch.randn(33), 0.01 * torch.randn(33, 29)
    kw = dict(spec, seeds=[4, 5, 6, 2**64 - 1, 9], delta=d, x_stacked=x_stacked)
    cpu = ops.perturbed_linear(x, w, b, **kw)
    _small_scratch(monkeypatch, backend, elements)
    kw["delta"] = d.cuda()
    gpu = _on(backend, lambda: ops.perturbed_linear(x.cuda(), w.cuda(), b.cuda(), **kw)).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("elements", [20, 200, 1 << 22])  # a group / channels per tile, chunks
@pytest.mark.parametrize("groups,x_stacked", [(1, False), (1, True), (2, False), (2, True)])
def test_perturbed_conv2d_tiles_match_cpu(monkeypatch, backend, elements, groups, x_stacked):
    S = 3
    x = torch.randn(S, 2, 4, 8, 7) if x_stacked else torch.randn(2, 4, 8, 7)
    w, b = torch.randn(6, 4 // groups, 3, 3), torch.randn(6)
    d = 0.01 * torch.randn(6, 4 // groups, 3, 3)
    kw = dict(device=DeviceModel(), seeds=[1, 2, 2**63], delta=d, x_stacked=x_stacked)
    cpu = ops.perturbed_conv2d(x, w, b, 1, 1, 1, groups, **kw)
    _small_scratch(monkeypatch, backend, elements)
    kw["delta"] = d.cuda()
    gpu = _on(
        backend, lambda: ops.perturbed_conv2d(x.cuda(), w.cuda(), b.cuda(), 1, 1, 1, groups, **kw)
    ).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [5, 300])  # fused Triton path, row-tile path
def test_perturbed_linear_bfloat16(backend, m):
    # bfloat16 has no CPU kernel: compare with cuBLAS on W + ΔW built by ops.noise (same rounding:
    # W + bf16(ΔW) in bfloat16); the difference is accumulation order only.
    x = torch.randn(m, 96, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(40, 96, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(40, device="cuda", dtype=torch.bfloat16)
    dev = DeviceModel()
    got = _on(backend, lambda: ops.perturbed_linear(x, w, b, device=dev, seeds=[3, 4], scale=2.0))
    dw = ops.noise(w, dev, seeds=[3, 4], scale=2.0)
    want = torch.stack([torch.nn.functional.linear(x, w + dw[i], b) for i in range(2)])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=5e-2)
