"""bitflip / bitflip_: flip rates, masks, p01 / p10, NaN handling, the same flips on every backend,
opcheck and bad input; cimext.bitflip.inject / sweep / midpoint on a small model."""

import math

import pytest
import torch

import cimext
from cimext import ops
from cimext import reference as ref

BACKENDS = ["cpp", "ref", pytest.param("triton", marks=pytest.mark.interpreter)]
DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
]


def _data(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of t as int64 (unsigned values of the element width)."""
    width, view, *_ = ref.BITFLIP_FORMATS[t.dtype]
    return t.contiguous().view(view).to(torch.int64) & ((1 << width) - 1)


def _changed(a, b) -> torch.Tensor:
    return _bits(a) ^ _bits(b)


def _popcount(x: torch.Tensor) -> int:
    return sum(int(((x >> k) & 1).sum()) for k in range(32))


def _flip(backend, t, p=None, **kw):
    with cimext.backend(backend):
        return ops.bitflip(t, p, **kw)


# --- statistics (C++ kernel: large tensors) -------------------------------------------------------
@pytest.mark.parametrize(("p", "n"), [(1e-6, 1 << 22), (1e-3, 1 << 16), (0.5, 1 << 14)])
def test_flip_rate_within_4_sd(p, n):
    t = torch.zeros(n, dtype=torch.float32)
    out, flips = ops.bitflip(t, p, seed=123)
    bits = n * 32
    assert _popcount(_changed(out, t)) == flips
    assert abs(flips - bits * p) <= 4 * math.sqrt(bits * p * (1 - p)), (flips, bits * p)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flip_rate_per_bit_position(dtype):
    # Every eligible bit position is hit at rate p, not just the total.
    width = ref.BITFLIP_FORMATS[dtype][0]
    t, p = _data((20000,), dtype), 0.05
    out, flips = ops.bitflip(t, p, seed=7)
    diff = _changed(out, t)
    for k in range(width):
        c = int(((diff >> k) & 1).sum())
        assert abs(c - t.numel() * p) <= 4.5 * math.sqrt(t.numel() * p * (1 - p)), (k, c)


def test_asymmetric_rates():
    t = _data((1 << 15,), torch.int32)
    before = _bits(t)
    out, flips = ops.bitflip(t, seed=3, p01=0.02, p10=0.002)
    diff = _changed(out, t)
    ones = _popcount(before)
    zeros = t.numel() * 32 - ones
    up = _popcount(diff & ~before)
    down = _popcount(diff & before)
    assert up + down == flips
    for c, k, p in ((up, zeros, 0.02), (down, ones, 0.002)):
        assert abs(c - k * p) <= 4 * math.sqrt(k * p * (1 - p)), (c, k * p)
    out, _ = ops.bitflip(t, seed=3, p01=0.0, p10=1.0)  # every 1 cleared, every 0 kept
    assert int(_bits(out).sum()) == 0


# --- the same flips on every backend ----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backends_flip_the_same_bits(backend, dtype):
    t = _data((5, 9), dtype, seed=1)
    cases = [dict(p=0.01), dict(p=0.3, mask="all"), dict(p01=0.2, p10=0.05)]
    if dtype.is_floating_point:
        cases.append(dict(p=0.2, mask="exponent", zero_nonfinite=True))
    for kw in cases:
        want, n_want = ref.bitflip(
            t,
            kw.get("p01", kw.get("p")),
            kw.get("p10", kw.get("p")),
            ref.bit_mask(dtype, kw.get("mask", "all")),
            99,
            5,
            kw.get("zero_nonfinite", False),
        )
        got, n_got = _flip(backend, t, seed=99, layer_id=5, **kw)
        assert n_got == int(n_want), kw
        assert torch.equal(_bits(got), _bits(want)), kw


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_equals_copy_and_counts(backend):
    base = _data((9, 11), torch.float16, seed=2)
    want, n = _flip(backend, base, 0.1, seed=5)
    t = base.clone().t()  # non-contiguous: flips follow the tensor's own row-major order
    ref_t, n_t = _flip(backend, t, 0.1, seed=5)
    with cimext.backend(backend):
        flips = ops.bitflip_(t, 0.1, seed=5)
    assert flips == n_t and torch.equal(_bits(t), _bits(ref_t))
    assert n > 0 and _popcount(_changed(want, base)) == n


def test_cpp_matches_reference_large_segments():
    # Many segments of every size class, p small enough for 65536-element segments.
    t = _data((200_003,), torch.float32, seed=4)
    for p in (1e-5, 3e-4, 0.01):
        a, na = ref.bitflip(t, p, p, ref.bit_mask(t.dtype), 11, 0)
        b, nb = ops.bitflip(t, p, seed=11)
        assert nb == int(na) and torch.equal(_bits(a), _bits(b))


# --- semantics --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("dtype", "bits"),
    [
        (torch.float32, "sign"),
        (torch.float32, "exponent"),
        (torch.float16, "mantissa"),
        (torch.bfloat16, "sign+exponent"),
        (torch.int8, "sign"),
        (torch.int16, 0x0F0F),
        (torch.uint8, 0b1010_0001),
    ],
)
def test_only_masked_bits_change(backend, dtype, bits):
    t = _data((5, 31), dtype, seed=3)
    out, flips = _flip(backend, t, 0.4, seed=1, mask=bits)
    mask = ref.bit_mask(dtype, bits)
    diff = _changed(out, t)
    assert flips > 0 and int((diff & ~mask).abs().sum()) == 0
    assert _popcount(diff) == flips


def test_mask_helpers():
    assert ops.bit_mask(torch.float32, "exponent") == 0x7F800000
    assert ops.bit_mask(torch.float32, "mantissa") == 0x007FFFFF
    assert ops.bit_mask(torch.float16, "exponent") == 0x7C00
    assert ops.bit_mask(torch.bfloat16, "mantissa") == 0x7F
    assert ops.bit_mask(torch.bfloat16, "sign+exponent+mantissa") == 0xFFFF
    assert ops.bit_mask(torch.int8, "all") == 0xFF
    assert ops.bit_mask(torch.int32, "sign") == 0x80000000


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_p_zero_is_identity(backend, dtype):
    t = _data((17, 3), dtype)
    out, flips = _flip(backend, t, 0.0, seed=1)
    assert flips == 0 and torch.equal(_bits(out), _bits(t))
    out, flips = _flip(backend, t, 0.5, seed=1, mask=0)
    assert flips == 0 and torch.equal(_bits(out), _bits(t))


def test_seed_and_layer_id_select_streams():
    t = torch.zeros(4096)
    a, _ = ops.bitflip(t, 0.01, seed=1)
    b, _ = ops.bitflip(t, 0.01, seed=1)
    c, _ = ops.bitflip(t, 0.01, seed=2)
    d, _ = ops.bitflip(t, 0.01, seed=1, layer_id=1)
    assert torch.equal(_bits(a), _bits(b))
    assert not torch.equal(_bits(a), _bits(c)) and not torch.equal(_bits(a), _bits(d))
    e, _ = ops.bitflip(t, 0.01, seed=2**64 - 1)  # the whole 64-bit range
    assert not torch.equal(_bits(a), _bits(e))


def test_int8_codes_stay_in_range():
    t = _data((4000,), torch.int8)
    out, flips = ops.bitflip(t, 0.5, seed=2)
    assert out.dtype == torch.int8 and flips > 0
    assert int(out.min()) >= -128 and int(out.max()) <= 127
    u, _ = ops.bitflip(t.view(torch.uint8), 0.5, seed=2)
    assert 0 <= int(u.min()) and int(u.max()) <= 255


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_kept_unless_zeroed(backend):
    t = torch.tensor([1.5, 0.0, -2.0, 1.0] * 4)
    out, flips = _flip(backend, t, seed=4, mask="exponent", p01=1.0, p10=0.0)  # exponent all ones
    assert flips == 4 * (1 + 8 + 7 + 1) and out.isnan()[::4].all()  # zero exponent bits
    assert out.isinf()[1::4].all() and (out[2::4] == -math.inf).all()
    out, flips = _flip(backend, t, seed=4, mask="exponent", p01=1.0, p10=0.0, zero_nonfinite=True)
    assert flips > 0 and torch.equal(out, torch.zeros_like(t))
    h = _data((8, 8), torch.float16, seed=5)
    kept, _ = _flip(backend, h, 0.3, seed=6)
    zeroed, _ = _flip(backend, h, 0.3, seed=6, zero_nonfinite=True)
    assert (~torch.isfinite(kept)).any()
    assert torch.equal(zeroed, torch.where(torch.isfinite(kept), kept, torch.zeros_like(kept)))
    pre = torch.tensor([float("nan"), float("inf"), 1.0])  # untouched NaN / Inf stay
    out, _ = _flip(backend, pre, 0.0, seed=4, zero_nonfinite=True)
    assert out.isnan()[0] and out.isinf()[1]


@pytest.mark.parametrize(
    "ns", ["cimext", pytest.param("cimext_triton", marks=pytest.mark.interpreter)]
)
def test_opcheck(ns):
    if ns == "cimext_triton":
        _flip("triton", torch.zeros(1), 0.0, seed=0)  # registers the namespace
    ops_ns = getattr(torch.ops, ns)
    tensors = [torch.randn(3, 5), torch.randn(4, 6).t(), _data((9,), torch.int16)]
    for t in tensors if ns == "cimext" else tensors[1:2]:  # the interpreter is slow
        # zero_nonfinite: a NaN made by a flip would fail opcheck's eager-vs-traced comparison.
        args = (t, 0.05, 0.1, ref.bit_mask(t.dtype), 3, 1, True)
        torch.library.opcheck(ops_ns.bitflip.default, args)
        torch.library.opcheck(ops_ns.bitflip_.default, (t.clone(),) + args[1:])


# --- bad input ---------------------------------------------------------------------------------------
BAD = [
    ("float64", dict(t=torch.zeros(3, dtype=torch.float64)), TypeError, "dtype must be one of"),
    ("bool", dict(t=torch.zeros(3, dtype=torch.bool)), TypeError, "dtype must be one of"),
    ("not a tensor", dict(t=[1.0, 2.0]), TypeError, "t must be a torch.Tensor"),
    ("p < 0", dict(p=-0.1), ValueError, r"p must be a probability in \[0, 1\]"),
    ("p > 1", dict(p=1.5), ValueError, r"p must be a probability in \[0, 1\]"),
    ("p NaN", dict(p=float("nan")), ValueError, r"p must be a probability"),
    ("p string", dict(p="0.1"), TypeError, "p must be a number"),
    ("p01 NaN", dict(p=None, p01=float("nan"), p10=0.1), ValueError, "p01 must be a probability"),
    ("p10 > 1", dict(p=None, p01=0.1, p10=2.0), ValueError, "p10 must be a probability"),
    ("p missing", dict(p=None, p01=0.1), TypeError, "give p, or both p01 and p10"),
    ("mask name", dict(mask="exponents"), ValueError, "'exponents' is not one of"),
    (
        "mask int8 exponent",
        dict(t=torch.zeros(3, dtype=torch.int8), mask="exponent"),
        ValueError,
        "has no exponent bits",
    ),
    (
        "uint8 sign",
        dict(t=torch.zeros(3, dtype=torch.uint8), mask="sign"),
        ValueError,
        "has no sign bits",
    ),
    (
        "mask too wide",
        dict(t=torch.zeros(3, dtype=torch.float16), mask=0x1FFFF),
        ValueError,
        r"mask must be in \[0, 0xffff\]",
    ),
    ("mask negative", dict(mask=-1), ValueError, "mask must be in"),
    ("mask float", dict(mask=1.5), TypeError, "mask must be an int or a string"),
    ("seed negative", dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*64\)"),
    ("seed float", dict(seed=1.5), TypeError, "seed must be an int"),
    ("layer_id negative", dict(layer_id=-2), ValueError, "layer_id must be in"),
    ("zero_nonfinite", dict(zero_nonfinite="yes"), TypeError, "zero_nonfinite must be a bool"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "change", "exc", "match"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_and_writes_nothing(backend, name, change, exc, match):
    kw = dict(t=torch.ones(3), p=0.5, seed=0)
    kw.update(change)
    t = kw.pop("t")
    p = kw.pop("p")
    before = t.clone() if isinstance(t, torch.Tensor) else None
    with cimext.backend(backend):
        with pytest.raises(exc, match=match):
            ops.bitflip_(t, p, **kw)
        with pytest.raises(exc, match=match):
            ops.bitflip(t, p, **kw)
    if before is not None:
        assert torch.equal(t, before)


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        ((torch.zeros(2, dtype=torch.float64), 0.1, 0.1, 1, 0, 0, False), TypeError, "dtype"),
        ((torch.zeros(2), float("nan"), 0.1, 1, 0, 0, False), ValueError, "p01 must be"),
        ((torch.zeros(2), 0.1, -1.0, 1, 0, 0, False), ValueError, "p10 must be"),
        ((torch.zeros(2, dtype=torch.int8), 0.1, 0.1, 256, 0, 0, False), ValueError, "mask"),
    ],
)
def test_schema_op_checks(args, exc, match):
    # Direct torch.ops calls (no Python wrapper) check their arguments too.
    with pytest.raises(exc, match=match):
        torch.ops.cimext.bitflip(*args)
    with pytest.raises(exc, match=match):
        torch.ops.cimext.bitflip_(*args)


# --- cimext.bitflip: inject, sweep, midpoint, CLI -----------------------------------------------
def _tiny():
    """A fixed two-layer model and data labelled by its own clean predictions (accuracy 1)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(256, 8)
    with torch.no_grad():
        y = model(x).argmax(-1)
    return model, [(x[:128], y[:128]), (x[128:], y[128:])]


def test_inject_reads_through_noisy_memory_and_restores():
    from cimext.bitflip import inject

    model, batches = _tiny()
    x = batches[0][0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clean = model(x)
    with inject(model, 0.0):
        assert torch.equal(model(x), clean)
    with inject(model, 0.0, dtype="float16"):  # the storage format's rounding only
        y16 = model(x)
    ref16 = torch.func.functional_call(
        model, {k: v.half().float() for k, v in before.items()}, (x,)
    )
    assert torch.equal(y16, ref16)
    with inject(model, 1e-2, seed=1) as mem:
        a, b = model(x), model(x)  # every read draws new flips
        assert mem.flips > 0 and mem.reads == 8  # weight and bias of two layers, twice
        assert not torch.equal(a, b)
    with inject(model, 1e-2, seed=1):
        again = model(x)
    assert torch.equal(again.nan_to_num(), a.nan_to_num())  # same seed, same flips
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(model(x), clean)


def test_inject_int8_codes_and_activations():
    from cimext.bitflip import inject

    model, batches = _tiny()
    x = batches[0][0]
    clean = model(x)
    with inject(model, 0.0, dtype="int8"):
        q = model(x)
    assert not torch.equal(q, clean) and torch.allclose(q, clean, atol=0.1)
    with inject(model, 0.5, dtype="int8", seed=3):  # any int8 code: bounded by 127 * scale
        w = model[0].weight
        seen = []
        h = model[0].register_forward_hook(lambda m, a, o: seen.append(m.weight.clone()))
        model(x)
        h.remove()
    amax = float(w.detach().abs().max())
    assert float(seen[0].detach().abs().max()) <= amax * 128 / 127 + 1e-6
    with inject(model, 1e-2, targets="activations", seed=2) as mem:
        y = model(x)
    assert mem.reads == 2 and mem.flips > 0 and not torch.equal(y, clean)


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        (dict(dtype="float64"), ValueError, "dtype must be one of"),
        (dict(dtype="int8", bits="exponent"), ValueError, "has no exponent bits"),
        (dict(bits="exp"), ValueError, "'exp' is not one of"),
        (dict(targets="bias"), ValueError, "targets must be one of"),
        (dict(p=1.5), ValueError, r"p must be a probability in \[0, 1\]"),
        (dict(p=float("nan")), ValueError, "p must be a probability"),
        (dict(seed=-1), ValueError, "seed must be an int"),
    ],
)
def test_inject_bad_input(kw, exc, match):
    from cimext.bitflip import inject

    model, _ = _tiny()
    p = kw.pop("p", 0.1)
    with pytest.raises(exc, match=match):
        with inject(model, p, **kw):
            pass


def test_sweep_and_midpoint_int8_beats_float32():
    from cimext.bitflip import midpoint, sweep

    model, data = _tiny()
    res = sweep(model, data, [0.0, 1e-3, 0.3], seeds=2)
    assert res.clean_accuracy == 1.0 and res.chance == 0.25
    assert res.mean[0] == 1.0 and res.mean[-1] < 0.6
    kw = dict(seeds=2, lo=1e-6, tol=0.25)
    m32 = midpoint(model, data, **kw)
    m8 = midpoint(model, data, dtype="int8", **kw)
    mant = midpoint(model, data, bits="mantissa", **kw)
    assert 1e-6 < m32 < 0.5 and m8 > 10 * m32 and mant > 10 * m32
    with pytest.raises(ValueError, match="lo < hi"):
        midpoint(model, data, lo=0.1, hi=0.01)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--dtypes", "float64"], "--dtypes: 'float64' is not one of"),
        (["--bits", "exponents"], "--bits: mask 'exponents'"),
        (["--dtypes", "int8", "--bits", "exponent"], "no valid dtype / bits pair"),
        (["--ps", "1e-3,2"], r"--ps must be probabilities in \[0, 1\], got 2.0"),
        (["--ps", "1e-3,nan"], r"--ps must be probabilities in \[0, 1\], got nan"),
        (["--ps", "a,b"], "--ps must be comma-separated numbers"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--eval-batch", "0"], "--eval-batch must be >= 1"),
        (["--tol", "0"], "--tol must be > 0"),
        (["--init", "/nonexistent/model.safetensors"], "no such file"),
    ],
)
def test_cli_bad_input_one_line(argv, match, capsys, tmp_path):
    from cimext.cli import main

    rc = main(["bitflip", "--out", str(tmp_path), "--quiet"] + argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("cimext: error:")
    import re

    assert re.search(match, err), err


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, capsys):
    import json

    from cimext.cli import main

    argv = [
        "bitflip",
        "--epochs",
        "1",
        "--dtypes",
        "float32,int8",
        "--bits",
        "all,mantissa",
        "--ps",
        "1e-4,1e-2",
        "--seeds",
        "1",
        "--tol",
        "0.5",
        "--test-samples",
        "200",
        "--quiet",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "midpoint p" in out and "int8/mantissa" in out  # skipped pair reported
    rec = json.loads((tmp_path / "bitflip.json").read_text())
    assert [(r["dtype"], r["bits"]) for r in rec["results"]] == [
        ("float32", "all"),
        ("float32", "mantissa"),
        ("int8", "all"),
    ]
    assert (tmp_path / "bitflip.png").stat().st_size > 0
    assert (tmp_path / "model.safetensors").is_file()
