"""hdiag_linear / hdiag_conv2d / curv_backward_linear / curv_backward_conv2d: the C++ kernels
against the reference and a naive formula, opcheck, odd shapes, and one bad input per argument."""

import re

import pytest
import torch
import torch.nn.functional as F

import cimext
from cimext import ops
from cimext import reference as ref

BACKENDS = ["cpp", "ref"]
DTYPES = [torch.float32, torch.float64]


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


def _rand(*shape, dtype=torch.float64, seed=0, positive=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    return (t.abs() if positive else t).to(dtype)


# Linear: leading dims (), (1,), (7,), (3, 5); odd feature counts.
LINEAR_CASES = [((7,), 5, 3), ((1,), 1, 1), ((97,), 33, 10), ((3, 5), 17, 9), ((300,), 129, 65)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,inp,out", LINEAR_CASES)
def test_hdiag_linear_matches_naive(backend, dtype, lead, inp, out):
    x = _rand(*lead, inp, dtype=dtype, seed=1)
    s = _rand(*lead, out, dtype=dtype, seed=2, positive=True)
    naive = torch.einsum("no,ni->oi", s.reshape(-1, out).double(), x.reshape(-1, inp).double() ** 2)
    with cimext.backend(backend):
        got = ops.hdiag_linear(x, s)
    assert got.shape == (out, inp) and got.dtype == dtype
    torch.testing.assert_close(got.double(), naive, **_tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,inp,out", LINEAR_CASES)
def test_curv_backward_linear_matches_naive(backend, dtype, lead, inp, out):
    s = _rand(*lead, out, dtype=dtype, seed=3, positive=True)
    w = _rand(out, inp, dtype=dtype, seed=4)
    naive = (s.double().unsqueeze(-1) * w.double().square()).sum(-2)
    with cimext.backend(backend):
        got = ops.curv_backward_linear(s, w)
    assert got.shape == (*lead, inp)
    torch.testing.assert_close(got.double(), naive, **_tol(dtype))


# (N, C, H, W, O, k, stride, padding, dilation, groups)
CONV_CASES = [
    (2, 3, 7, 5, 4, (3, 3), 1, 1, 1, 1),
    (1, 1, 8, 8, 6, (3, 3), 1, 1, 1, 1),
    (3, 4, 9, 11, 6, (3, 2), (2, 1), (1, 0), 1, 2),
    (2, 2, 10, 10, 3, (5, 5), 1, 2, 1, 1),
    (2, 6, 9, 9, 6, (3, 3), 2, 2, (2, 1), 3),
    (5, 3, 13, 7, 5, (1, 1), 3, 0, 1, 1),
]


def _naive_hdiag_conv(x, s, k, stride, padding, dilation, groups):
    """Σ_n,p s ⊗ unfold(x)² with an explicit unfold, group by group."""
    n, c = x.shape[:2]
    o = s.shape[1]
    cols = F.unfold(x.double(), k, dilation=dilation, padding=padding, stride=stride) ** 2
    cg, og = c // groups, o // groups
    kk = k[0] * k[1]
    out = []
    for g in range(groups):
        cg_cols = cols[:, g * cg * kk : (g + 1) * cg * kk]  # (N, cg·kk, L)
        sg = s.double()[:, g * og : (g + 1) * og].reshape(n, og, -1)
        out.append(torch.einsum("nol,nkl->ok", sg, cg_cols))
    return torch.cat(out).reshape(o, cg, *k)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_hdiag_conv2d_matches_naive(backend, dtype, case):
    n, c, h, w, o, k, stride, padding, dilation, groups = case
    x = _rand(n, c, h, w, dtype=dtype, seed=5)
    y = F.conv2d(
        x, torch.zeros(o, c // groups, *k, dtype=dtype), None, stride, padding, dilation, groups
    )
    s = _rand(*y.shape, dtype=dtype, seed=6, positive=True)
    naive = _naive_hdiag_conv(x, s, k, _pair(stride), _pair(padding), _pair(dilation), groups)
    with cimext.backend(backend):
        got = ops.hdiag_conv2d(x, s, k, stride, padding, dilation, groups)
    assert got.shape == (o, c // groups, *k)
    torch.testing.assert_close(got.double(), naive, **_tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_curv_backward_conv2d_matches_vjp(backend, dtype, case):
    # (W²)ᵀ S is the input gradient of the conv with weight W² at output gradient S.
    n, c, h, w, o, k, stride, padding, dilation, groups = case
    wt = _rand(o, c // groups, *k, dtype=dtype, seed=7)
    xr = torch.zeros(n, c, h, w, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(xr, wt.double().square(), None, stride, padding, dilation, groups)
    s = _rand(*y.shape, dtype=dtype, seed=8, positive=True)
    (want,) = torch.autograd.grad(y, xr, s.double())
    with cimext.backend(backend):
        got = ops.curv_backward_conv2d(s, wt, (h, w), stride, padding, dilation, groups)
    assert got.shape == (n, c, h, w)
    torch.testing.assert_close(got.double(), want, **_tol(dtype))


def test_hdiag_conv2d_large_batch_spans_blocks():
    # More samples than one column block holds (the CPU kernel works in blocks of ~4M elements).
    x = _rand(300, 3, 32, 32, dtype=torch.float32, seed=9)
    s = _rand(300, 8, 32, 32, dtype=torch.float32, seed=10, positive=True)
    got = ops.hdiag_conv2d(x, s, 3, 1, 1)
    want = ref.hdiag_conv2d(x.double(), s.double(), [3, 3], [1, 1], [1, 1], [1, 1], 1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)


def test_empty_batch():
    x, s = torch.zeros(0, 4), torch.zeros(0, 3)
    assert torch.equal(ops.hdiag_linear(x, s), torch.zeros(3, 4))
    xc, sc = torch.zeros(0, 2, 5, 5), torch.zeros(0, 3, 5, 5)
    assert torch.equal(ops.hdiag_conv2d(xc, sc, 3, 1, 1), torch.zeros(3, 2, 3, 3))
    w = torch.ones(3, 2, 3, 3)
    assert ops.curv_backward_conv2d(sc, w, (5, 5), 1, 1).shape == (0, 2, 5, 5)


def _opcheck_cases():
    x = _rand(7, 5, dtype=torch.float32, seed=11)
    s = _rand(7, 3, dtype=torch.float32, seed=12, positive=True)
    w = _rand(3, 5, dtype=torch.float32, seed=13)
    xc = _rand(2, 4, 9, 7, dtype=torch.float32, seed=14)
    sc = _rand(2, 6, 5, 7, dtype=torch.float32, seed=15, positive=True)
    wc = _rand(6, 2, 3, 3, dtype=torch.float32, seed=16)
    conv = ([2, 1], [1, 1], [1, 1], 2)
    return [
        ("hdiag_linear", (x, s)),
        ("curv_backward_linear", (s, w)),
        ("hdiag_conv2d", (xc, sc, [3, 3], *conv)),
        ("curv_backward_conv2d", (sc, wc, [9, 7], *conv)),
    ]


@pytest.mark.parametrize(
    "name,args", _opcheck_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.cimext, name).default, args)


def test_ref_matches_cpp_in_opcheck_cases():
    for name, args in _opcheck_cases():
        got = getattr(torch.ops.cimext, name)(*args)
        want = getattr(ref, name)(*args)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


X, S, W = torch.ones(4, 5), torch.ones(4, 3), torch.ones(3, 5)
XC, SC, WC = torch.ones(2, 4, 6, 6), torch.ones(2, 6, 6, 6), torch.ones(6, 2, 3, 3)

BAD = [
    # (call, exception, message fragment)
    (lambda: ops.hdiag_linear(X.int(), S), TypeError, "x must be float32 or float64"),
    (lambda: ops.hdiag_linear(X, S.double()), TypeError, "s_out dtype"),
    (lambda: ops.hdiag_linear(X, torch.ones(5, 3)), ValueError, "s_out shape"),
    (lambda: ops.hdiag_linear(torch.tensor(1.0), torch.tensor(1.0)), ValueError, "x must have"),
    (lambda: ops.hdiag_linear([1.0], S), TypeError, "x must be a torch.Tensor"),
    (lambda: ops.curv_backward_linear(S, W.half()), TypeError, "weight dtype"),
    (lambda: ops.curv_backward_linear(S, torch.ones(3, 5, 1)), ValueError, "weight must be 2-D"),
    (lambda: ops.curv_backward_linear(torch.ones(4, 2), W), ValueError, "must end in out_features"),
    (lambda: ops.curv_backward_linear(S.long(), W), TypeError, "s_out must be float32"),
    (lambda: ops.hdiag_conv2d(XC, SC, 3, 1, 1, groups=4), ValueError, "groups 4 must divide"),
    (lambda: ops.hdiag_conv2d(XC, SC, 0, 1, 1), ValueError, "kernel_size must be"),
    (lambda: ops.hdiag_conv2d(XC, SC, 3, 0, 1), ValueError, "stride must be"),
    (lambda: ops.hdiag_conv2d(XC, SC, 3, 1, -1), ValueError, "padding must be"),
    (lambda: ops.hdiag_conv2d(XC, SC, 3, 1, 1, dilation=0), ValueError, "dilation must be"),
    (lambda: ops.hdiag_conv2d(XC, SC, 3, 1, 1, groups=0), ValueError, "groups must be"),
    (lambda: ops.hdiag_conv2d(XC, SC, 3, 1, 0), ValueError, "s_out shape"),
    (lambda: ops.hdiag_conv2d(XC[0], SC, 3, 1, 1), ValueError, "x must be (N, C, H, W)"),
    (lambda: ops.hdiag_conv2d(XC, SC[0], 3, 1, 1), ValueError, "s_out must be (N, O, OH, OW)"),
    (lambda: ops.hdiag_conv2d(XC, SC, 7, 1, 0), ValueError, "does not fit"),
    (
        lambda: ops.hdiag_conv2d(XC, SC, (3, 3, 3), 1, 1),
        TypeError,
        "kernel_size must be an int or a pair",
    ),
    (lambda: ops.hdiag_conv2d(XC, SC, 3, 1, 1, groups=1.5), TypeError, "groups must be an int"),
    (lambda: ops.hdiag_conv2d(XC.double(), SC, 3, 1, 1), TypeError, "s_out dtype"),
    (
        lambda: ops.curv_backward_conv2d(SC, WC, (6, 6), 1, 1, groups=4),
        ValueError,
        "groups 4 must divide",
    ),
    (lambda: ops.curv_backward_conv2d(SC, WC, (7, 7), 1, 0), ValueError, "s_out spatial size"),
    (
        lambda: ops.curv_backward_conv2d(SC, WC, (0, 6), 1, 1),
        ValueError,
        "input_size must be positive",
    ),
    (
        lambda: ops.curv_backward_conv2d(SC, WC[:, :, 0], (6, 6), 1, 1),
        ValueError,
        "weight must be (O",
    ),
    (
        lambda: ops.curv_backward_conv2d(SC, torch.ones(5, 2, 3, 3), (6, 6), 1, 1),
        ValueError,
        "s_out has 6 channels",
    ),
    (lambda: ops.curv_backward_conv2d(SC[0], WC, (6, 6), 1, 1), ValueError, "s_out must be (N, O"),
    (lambda: ops.curv_backward_conv2d(SC, WC, (6, 6), 0, 1), ValueError, "stride must be"),
    (
        lambda: ops.curv_backward_conv2d(SC, WC, "6", 1, 1),
        TypeError,
        "input_size must be an int or a pair",
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input(backend, i):
    call, exc, fragment = BAD[i]
    with cimext.backend(backend), pytest.raises(exc, match=re.escape(fragment)):
        call()
