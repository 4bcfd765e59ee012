"""sign_step_: every backend equals the reference bit for bit (number and per-element bounds), the
step's semantics, opcheck, torch.compile, and bad input that raises before anything is written."""

import os

import pytest
import torch

import cimext
from cimext import ops
from cimext import reference as ref

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["cpp", "ref", pytest.param("triton", marks=pytest.mark.interpreter)]
# Odd sizes, several shapes in one call; one tensor spans several CPU chunks (16384 elements).
SHAPES = [(1,), (7,), (97,), (1025,), (3, 5, 7), (16, 3, 3, 3), (70001,)]


def _case(dtype, shapes=SHAPES, seed=0):
    """Deltas partly outside their bounds, grads with exact zeros, one bound per tensor."""
    g = torch.Generator().manual_seed(seed)
    deltas = [(0.1 * torch.randn(s, generator=g)).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    for t in grads:
        t[torch.rand(t.shape, generator=g) < 0.2] = 0.0
    grads = [t.to(dtype) for t in grads]
    bounds = [0.05 + 0.01 * i for i in range(len(shapes))]
    return deltas, grads, bounds


def _step(backend, *args):
    with cimext.backend(backend):
        ops.sign_step_(*args)


def _ref(deltas, grads, eta, bounds):
    out = [d.clone() for d in deltas]
    ref.sign_step_(out, grads, eta, bounds)
    return out


def _assert_equal(got, want, backend=None):
    """Bit for bit, except for bfloat16 from the Triton interpreter, which truncates where GPUs
    (and the reference) round to nearest: there the results may differ by one bfloat16 ulp."""
    for a, b in zip(got, want, strict=True):
        if backend == "triton" and INTERPRETED and b.dtype == torch.bfloat16:
            torch.testing.assert_close(a, b, rtol=2**-7, atol=0, equal_nan=True)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(backend, dtype):
    deltas, grads, bounds = _case(dtype)
    want = _ref(deltas, grads, 0.0123, bounds)
    _step(backend, deltas, grads, 0.0123, bounds)
    _assert_equal(deltas, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_matches_reference(backend, dtype):
    deltas, grads, bounds = _case(dtype, shapes=[(7,), (1025,)], seed=1)
    want = _ref(deltas, grads, 0.0123, bounds)
    _step(backend, deltas, grads, 0.0123, bounds)
    _assert_equal(deltas, want, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_equals_naive_loop(dtype):
    # What the benchmark's baseline computes, for the dtypes where ATen rounds nothing early.
    deltas, grads, bounds = _case(dtype, seed=2)
    naive = [d.clone() for d in deltas]
    for d, g, b in zip(naive, grads, bounds, strict=True):
        d.sub_(0.0123 * g.sign()).clamp_(-b, b)
    _assert_equal(_ref(deltas, grads, 0.0123, bounds), naive)


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_and_sign_of_zero(backend):
    d = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.9375, -0.9375, float("nan")])
    g = torch.tensor([2.0, -3.0, 0.0, -0.0, -1.0, 1.0, 1.0])
    _step(backend, [d], [g], 0.125, 1.0)
    want = torch.tensor([0.375, 0.625, 0.5, 0.5, 1.0, -1.0, float("nan")])
    torch.testing.assert_close(d, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_grad_counts_as_zero(backend):
    # torch.sign(nan) is 0: a NaN gradient leaves the delta (projected) where it was.
    d = torch.tensor([0.25, 3.0])
    _step(backend, [d], [torch.tensor([float("nan"), float("nan")])], 0.125, 1.0)
    torch.testing.assert_close(d, torch.tensor([0.25, 1.0]), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_result_within_bounds(backend, dtype):
    deltas, grads, bounds = _case(dtype, seed=3)
    deltas = [10 * d for d in deltas]  # start far outside the bounds
    for eta in (0.0, 1e-3, 0.04, 5.0):
        _step(backend, deltas, grads, eta, bounds)
        for d, b in zip(deltas, bounds, strict=True):
            assert d.abs().max().item() <= torch.tensor(b, dtype=dtype).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_eta_zero_is_projection(backend):
    deltas, grads, bounds = _case(torch.float32, seed=4)
    want = [d.clamp(-b, b) for d, b in zip(deltas, bounds, strict=True)]
    _step(backend, deltas, grads, 0.0, bounds)
    _assert_equal(deltas, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_bound_zeroes(backend):
    deltas, grads, _ = _case(torch.float32, shapes=[(33,), (5, 5)], seed=5)
    _step(backend, deltas, grads, 0.5, 0.0)
    for d in deltas:
        assert not d.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_delta_is_updated(backend):
    base = 0.1 * torch.randn(9, 97)
    d = base.t()  # (97, 9), not contiguous: a view into base
    g = torch.randn(9, 97)[:, ::1].t()
    g2 = torch.randn(40)[::2]  # strided grad with a contiguous delta
    d2 = torch.randn(20)
    want = _ref([d, d2], [g, g2], 0.03, [0.08, 0.5])
    _step(backend, [d, d2], [g, g2], 0.03, [0.08, 0.5])
    _assert_equal([d, d2], want)
    torch.testing.assert_close(base, want[0].t(), rtol=0, atol=0)  # written through the view
    assert not d.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_bound_many_tensors_and_empty(backend):
    g = torch.Generator().manual_seed(6)
    shapes = [(int(torch.randint(0, 300, (1,), generator=g)),) for _ in range(70)]  # > 32: tables
    deltas = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    want = _ref(deltas, grads, 0.25, [0.75] * len(shapes))
    _step(backend, deltas, grads, 0.25, 0.75)
    _assert_equal(deltas, want)
    _step(backend, [], [], 0.25, [])  # nothing to do
    _step(backend, [torch.empty(0, 3)], [torch.empty(0, 3)], 0.25, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bumps_version_for_autograd(backend):
    x = torch.randn(5, requires_grad=True)
    y = x * 2.0
    loss = (y * y).sum()  # saves y for backward
    v = y._version
    _step(backend, [y], [torch.randn(5)], 0.1, 1.0)
    assert y._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode(backend):
    with torch.inference_mode():
        d, g = torch.full((3,), 0.5), torch.tensor([1.0, 0.0, -1.0])
        _step(backend, [d], [g], 0.25, 1.0)
    torch.testing.assert_close(d, torch.tensor([0.25, 0.5, 0.75]))
    if backend == "cpp":  # an inference delta outside inference mode: refused, nothing written
        with pytest.raises(RuntimeError, match="inference tensor"):
            _step(backend, [d], [torch.ones(3)], 0.25, 1.0)
        torch.testing.assert_close(d, torch.tensor([0.25, 0.5, 0.75]))


def test_works_on_leaf_parameters():
    # F-LWC keeps each delta as a leaf that requires grad; the step runs outside autograd.
    p = torch.nn.Parameter(torch.zeros(4))
    (p * torch.tensor([1.0, -1.0, 0.0, 2.0])).sum().backward()
    ops.sign_step_([p], [p.grad], 0.5, 0.25)
    torch.testing.assert_close(p.detach(), torch.tensor([-0.25, 0.25, 0.0, -0.25]))
    assert p.requires_grad and p.grad_fn is None


@pytest.mark.parametrize(
    "ns", ["cimext", pytest.param("cimext_triton", marks=pytest.mark.interpreter)]
)
def test_opcheck(ns):
    if ns == "cimext_triton":
        _step("triton", [torch.zeros(1)], [torch.zeros(1)], 0.0, 0.0)  # registers the namespace
    deltas, grads, bounds = _case(torch.float32, shapes=[(3, 4), (7,), (1, 1, 5)])
    op = getattr(torch.ops, ns).sign_step_.default
    torch.library.opcheck(op, (deltas, grads, 0.01, bounds))
    torch.library.opcheck(op, ([deltas[0].t()], [grads[0].t()], 0.0, [0.1]))


# --- per-element bounds ---------------------------------------------------------------------------
def _tensor_bounds(deltas, seed=9):
    """Every other delta gets a per-element bound with exact zeros; the rest keep a number."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, d in enumerate(deltas):
        if i % 2:
            out.append(0.05 + 0.01 * i)
        else:
            b = 0.1 * torch.rand(d.shape, generator=g)
            b[torch.rand(d.shape, generator=g) < 0.2] = 0.0
            out.append(b.to(d.dtype))
    return out


def _ref_mixed(deltas, grads, eta, bounds):
    out = [d.clone() for d in deltas]
    numbers = [0.0 if isinstance(b, torch.Tensor) else b for b in bounds]
    tensors = [b if isinstance(b, torch.Tensor) else None for b in bounds]
    ref.sign_step_(out, grads, eta, numbers, tensors)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_tensor_bounds_match_reference(backend, dtype):
    shapes = SHAPES if dtype in (torch.float32, torch.float64) else [(7,), (1025,), (3, 5, 7)]
    deltas, grads, _ = _case(dtype, shapes=shapes, seed=10)
    bounds = _tensor_bounds(deltas)
    want = _ref_mixed(deltas, grads, 0.0123, bounds)
    _step(backend, deltas, grads, 0.0123, bounds)
    _assert_equal(deltas, want, backend)
    for d, b in zip(deltas, bounds, strict=True):
        if isinstance(b, torch.Tensor):
            assert bool((d.abs() <= b).all())
            assert not d[b == 0].any()  # a zero bound pins the element at 0


def test_tensor_bound_semantics():
    # reference = the naive formula with a tensor clamp; a bound equal everywhere = the number
    deltas, grads, bounds = _case(torch.float64, shapes=[(5, 7)], seed=11)
    b = torch.full((5, 7), bounds[0], dtype=torch.float64)
    naive = deltas[0].clone().sub_(0.02 * grads[0].sign()).clamp_(-b, b)
    assert torch.equal(_ref_mixed(deltas, grads, 0.02, [b])[0], naive)
    assert torch.equal(_ref(deltas, grads, 0.02, bounds)[0], naive)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_bounds_noncontiguous(backend):
    d = (0.1 * torch.randn(9, 97)).t()
    g = torch.randn(97, 9)
    b = (0.05 * torch.rand(9, 97)).t()  # strided bound
    want = _ref_mixed([d], [g], 0.03, [b])
    _step(backend, [d], [g], 0.03, [b])
    _assert_equal([d], want)


@pytest.mark.parametrize(
    "ns", ["cimext", pytest.param("cimext_triton", marks=pytest.mark.interpreter)]
)
def test_opcheck_tensor_bounds(ns):
    if ns == "cimext_triton":
        _step("triton", [torch.zeros(1)], [torch.zeros(1)], 0.0, 0.0)  # registers the namespace
    deltas, grads, bounds = _case(torch.float32, shapes=[(3, 4), (7,)])
    op = getattr(torch.ops, ns).sign_step_.default
    torch.library.opcheck(op, (deltas, grads, 0.01, bounds, [0.1 * torch.rand(3, 4), None]))


def test_compiles_fullgraph():
    deltas, grads, _ = _case(torch.float32, shapes=[(3, 4), (7,)])
    bt = 0.05 * torch.rand(3, 4)
    want = _ref_mixed(deltas, grads, 0.01, [bt, 0.05])

    @torch.compile(fullgraph=True, backend="aot_eager")  # functionalizes the in-place op
    def step(ds, gs, b):
        torch.ops.cimext.sign_step_(ds, gs, 0.01, [0.0, 0.05], [b, None])

    step(deltas, grads, bt)
    _assert_equal(deltas, want)


def _raw_tensor_bounds(ns):
    def call(deltas, grads, eta, bounds):
        numbers = [0.0 if isinstance(b, torch.Tensor) else b for b in bounds]
        tensors = [b if isinstance(b, torch.Tensor) else None for b in bounds]
        getattr(torch.ops, ns).sign_step_(deltas, grads, eta, numbers, tensors)

    return call


BAD_TENSOR_BOUNDS = {
    "bound shape": (lambda d: [0.5, torch.rand(3, 2)], ValueError, r"bound_tensors\[1\] shape"),
    "negative entry": (
        lambda d: [0.5, torch.tensor([[0.1, -0.1, 0.1], [0.1, 0.1, 0.1]])],
        ValueError,
        r"bound_tensors\[1\] must be finite and >= 0",
    ),
    "nan entry": (
        lambda d: [0.5, torch.tensor([[0.1, float("nan"), 0.1], [0.1, 0.1, 0.1]])],
        ValueError,
        r"bound_tensors\[1\] must be finite",
    ),
    "inf entry": (
        lambda d: [0.5, torch.full((2, 3), float("inf"))],
        ValueError,
        r"bound_tensors\[1\] must be finite",
    ),
    "bound is a delta": (
        lambda d: [0.5, d[1].abs_()],
        ValueError,
        r"shares memory with deltas\[1\]",
    ),
}


@pytest.mark.parametrize(
    "caller",
    ["ops-cpp", "ops-ref", "ops-triton", "raw-cimext", "raw-cimext_triton"],
)
@pytest.mark.parametrize("case", list(BAD_TENSOR_BOUNDS))
def test_bad_tensor_bounds_write_nothing(caller, case):
    make_bounds, exc, match = BAD_TENSOR_BOUNDS[case]
    deltas, grads, eta, _ = _good()
    bounds = make_bounds(deltas)
    before = [d.clone() for d in deltas]
    if caller.endswith("triton"):
        _step("triton", [torch.zeros(1)], [torch.zeros(1)], 0.0, 0.0)  # registers the namespace
    if caller.startswith("raw"):
        call = _raw_tensor_bounds(caller.split("-")[1])
    else:
        call = CALLERS[caller]
    with pytest.raises(exc, match=match):
        call(deltas, grads, eta, bounds)
    _assert_equal(deltas, before)


@pytest.mark.parametrize("ns", ["cimext", "cimext_triton"])
def test_raw_bound_tensor_list_checks(ns):
    _step("triton", [torch.zeros(1)], [torch.zeros(1)], 0.0, 0.0)  # registers the namespace
    op = getattr(torch.ops, ns).sign_step_
    d, g = [torch.zeros(4)], [torch.ones(4)]
    with pytest.raises(ValueError, match="bound_tensors needs one entry"):
        op(d, g, 0.1, [0.5], [None, None])
    with pytest.raises(TypeError, match=r"bound_tensors\[0\] dtype"):
        op(d, g, 0.1, [0.5], [torch.ones(4, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"bound_tensors\[0\] is on meta"):
        op(d, g, 0.1, [0.5], [torch.ones(4, device="meta")])
    assert not d[0].any()


# --- bad input -----------------------------------------------------------------------------------
def _good():
    """Two valid pairs; the bad cases spoil the second so the first would be written first."""
    return [torch.randn(4), torch.randn(2, 3)], [torch.randn(4), torch.randn(2, 3)], 0.1, [0.5, 0.5]


def _overlapping():
    base = torch.randn(10)
    return [base[:4], base[2:8].view(2, 3)]


def _spoil(deltas=None, grads=None, eta=None, bounds=None):
    def make():
        d, g, e, b = _good()
        if deltas is not None:
            d = deltas(d)
        if grads is not None:
            g = grads(g)
        return d, g, e if eta is None else eta, b if bounds is None else bounds

    return make


BAD = {
    "fewer grads": (_spoil(grads=lambda g: g[:1]), ValueError, "2 deltas, 1 grads and 2 bounds"),
    "fewer bounds": (_spoil(bounds=[0.5]), ValueError, "2 deltas, 2 grads and 1 bounds"),
    "grad shape": (
        _spoil(grads=lambda g: [g[0], torch.randn(3, 2)]),
        ValueError,
        r"grads\[1\] shape",
    ),
    "grad dtype": (_spoil(grads=lambda g: [g[0], g[1].double()]), TypeError, r"grads\[1\] dtype"),
    "int delta": (
        _spoil(
            deltas=lambda d: [d[0], d[1].to(torch.int32)],
            grads=lambda g: [g[0], g[1].to(torch.int32)],
        ),
        TypeError,
        r"deltas\[1\] must be float32",
    ),
    "negative eta": (_spoil(eta=-0.1), ValueError, "eta"),
    "nan eta": (_spoil(eta=float("nan")), ValueError, "eta"),
    "inf eta": (_spoil(eta=float("inf")), ValueError, "eta"),
    "negative bound": (_spoil(bounds=[0.5, -0.5]), ValueError, r"bounds\[1\]"),
    "nan bound": (_spoil(bounds=[0.5, float("nan")]), ValueError, r"bounds\[1\]"),
    "meta grad": (
        _spoil(grads=lambda g: [g[0], g[1].to("meta")]),
        ValueError,
        r"grads\[1\] is on meta",
    ),
    "overlapping deltas": (
        _spoil(deltas=lambda d: _overlapping()),
        ValueError,
        r"deltas\[0\] and deltas\[1\] overlap",
    ),
    "same delta twice": (
        _spoil(deltas=lambda d: [d[1], d[1]], grads=lambda g: [g[1], g[1]]),
        ValueError,
        "overlap",
    ),
    "expanded delta": (
        _spoil(deltas=lambda d: [d[0], torch.randn(1, 1).expand(2, 3)]),
        ValueError,
        "share memory",
    ),
}


def _raw(ns):
    def call(deltas, grads, eta, bounds):
        getattr(torch.ops, ns).sign_step_(deltas, grads, eta, bounds)

    return call


CALLERS = {
    "ops-cpp": lambda *a: _step("cpp", *a),
    "ops-ref": lambda *a: _step("ref", *a),
    "ops-triton": lambda *a: _step("triton", *a),
    "raw-cimext": _raw("cimext"),
    "raw-cimext_triton": _raw("cimext_triton"),
}


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_writes_nothing(caller, case):
    make, exc, match = BAD[case]
    deltas, grads, eta, bounds = make()
    before = [d.clone() for d in deltas if d.device.type != "meta"]
    if caller == "raw-cimext_triton":
        _step("triton", [torch.zeros(1)], [torch.zeros(1)], 0.0, 0.0)  # registers the namespace
    # The C++ checks raise the same types (TORCH_CHECK_VALUE / _TYPE) as the Python ones.
    with pytest.raises(exc, match=match):
        CALLERS[caller](deltas, grads, eta, bounds)
    _assert_equal([d for d in deltas if d.device.type != "meta"], before)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: ops.sign_step_(torch.zeros(3), [torch.zeros(3)], 0.1, 1.0), TypeError, "list"),
        (lambda: ops.sign_step_([torch.zeros(3)], [[0.0] * 3], 0.1, 1.0), TypeError, r"grads\[0\]"),
        (lambda: ops.sign_step_([torch.zeros(3)], [torch.zeros(3)], "0.1", 1.0), TypeError, "eta"),
        (lambda: ops.sign_step_([torch.zeros(3)], [torch.zeros(3)], 0.1, "1"), TypeError, "bounds"),
        (
            lambda: ops.sign_step_([torch.zeros(3)], [torch.zeros(3)], 0.1, -1.0),
            ValueError,
            "bounds",
        ),
        (
            lambda: ops.sign_step_([torch.zeros(3)], [torch.zeros(3)], 0.1, [1.0, 2.0]),
            ValueError,
            "bounds",
        ),
    ],
)
def test_bad_python_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --- CUDA ------------------------------------------------------------------------------------------
def _check_device(device, large=True):
    """Both compiled backends on ``device`` against the CPU reference: every dtype, odd sizes and
    empty tensors, more tensors than one CUDA launch table holds (32), a non-contiguous delta and
    (``large``) one tensor of many blocks."""
    g = torch.Generator().manual_seed(8)
    sizes = torch.randint(0, 5000, (40,), generator=g).tolist()
    shapes = SHAPES + [(n,) for n in sizes] + ([(3, 1 << 20)] if large else [])
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        deltas, grads, bounds = _case(dtype, shapes=shapes, seed=7)
        want = _ref(deltas, grads, 0.0123, bounds)
        for backend in ("cpp", "triton"):
            dev = [d.to(device, copy=True) for d in deltas]
            dev[4] = dev[4].transpose(0, 2).contiguous().transpose(0, 2)  # same shape, strided
            assert not dev[4].is_contiguous()
            _step(backend, dev, [t.to(device) for t in grads], 0.0123, bounds)
            _assert_equal([d.cpu() for d in dev], want, backend)
        # per-element bounds on every other tensor
        deltas, grads, _ = _case(dtype, shapes=shapes, seed=12)
        bounds = _tensor_bounds(deltas)
        want = _ref_mixed(deltas, grads, 0.0123, bounds)
        for backend in ("cpp", "triton"):
            dev = [d.to(device, copy=True) for d in deltas]
            dev_bounds = [b.to(device) if isinstance(b, torch.Tensor) else b for b in bounds]
            _step(backend, dev, [t.to(device) for t in grads], 0.0123, dev_bounds)
            _assert_equal([d.cpu() for d in dev], want, backend)
    d, gr = torch.randn(5, device=device), torch.randn(5, device=device)
    torch.library.opcheck(torch.ops.cimext.sign_step_.default, ([d], [gr], 0.1, [0.5]))
    b = torch.rand(5, device=device)
    torch.library.opcheck(torch.ops.cimext.sign_step_.default, ([d], [gr], 0.1, [0.0], [b]))


@pytest.mark.interpreter
def test_cpu_many_tensors_match_reference():
    # The CUDA test's checks on CPU (Triton interpreted): every dtype, 47 tensors, a strided one.
    _check_device("cpu", large=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_reference():
    # One test, so that a machine without a GPU reports one skip.
    _check_device("cuda")
    d, g = torch.randn(5, device="cuda"), torch.randn(5, device="cuda")
    with pytest.raises(ValueError, match=r"grads\[0\] is on cpu"):
        ops.sign_step_([d], [g.cpu()], 0.1, 0.5)
