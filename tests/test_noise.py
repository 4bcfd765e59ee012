"""Noise generation: Philox known answers, backend agreement, statistics, reproducibility."""

import math

import pytest
import torch

import cimext
from cimext import DeviceModel, ops
from cimext import reference as ref

ODD = [1, 7, 97, 1025]


def test_philox_known_answers():
    # Random123's kat_vectors for philox4x32_10.
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for ctr, key, want in cases:
        got = ref.philox4x32_10(*[torch.tensor([c]) for c in ctr], *key)
        assert [int(g) for g in got] == list(want)


def test_splitmix64():
    assert ref.splitmix64(0) == 0xE220A8397B1DCDAF
    assert ref.stream_seed(1, 0) != ref.stream_seed(0, 1)


def _cpp_normals(stream_seed_of, n, layer_id=0):
    w = torch.zeros(n)
    return torch.ops.cimext.noise(
        w, torch.tensor([stream_seed_of]), layer_id, 1, 1.0, 8, 2, 1.0, [], 0, 0, False, None
    )[0]


@pytest.mark.parametrize("n", ODD + [100_000])
@pytest.mark.parametrize("seed", [0, 12345, 2**64 - 1])
def test_cpp_normals_match_reference(n, seed):
    got = ops.gaussian_noise(torch.zeros(n), 1.0, seed, layer_id=5, scale=1.0)
    want = ref.normals(ref.stream_seed(seed, 5), torch.arange(n))
    assert (got - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("level", [1, 2])
def test_simd_and_scalar_paths_bit_identical(level):
    # Level 1 is AVX2, 2 AVX-512; a processor without them runs a lower level, which must agree
    # all the same. Odd lengths and offsets exercise the heads and tails of the vector blocks.
    w = torch.randn(333, 101)
    x = torch.randn(5, 101)
    dev = DeviceModel(level_sigma=(0.5, 1.5, 1.5, 0.5))

    def run():
        return [
            ops.noise(w, dev, 9),
            ops.gaussian_noise(w, 0.3, 9),
            ops.perturbed_linear(x, w, gaussian=0.1, seeds=[3, 4]),
            *(torch.ops.cimext._philox_normals(7, j0, 1037) for j0 in (0, 1, 2, 3, 2**32 * 4 - 9)),
        ]

    prev = torch.ops.cimext._set_cpu_simd(0)
    try:
        assert torch.ops.cimext._cpu_simd() == 0
        scalar = run()
        torch.ops.cimext._set_cpu_simd(level)
        assert torch.ops.cimext._cpu_simd() <= level
        simd = run()
    finally:
        torch.ops.cimext._set_cpu_simd(prev)
    for a, b in zip(scalar, simd, strict=True):
        assert torch.equal(a, b)


def test_set_cpu_simd_rejects_bad_level():
    with pytest.raises(RuntimeError, match="level"):
        torch.ops.cimext._set_cpu_simd(3)
    with pytest.raises(RuntimeError, match="level"):
        torch.ops.cimext._set_cpu_simd(-1)


SPECS = {
    "gaussian": dict(gaussian=0.05),
    "device": dict(device=DeviceModel()),
    "device_levels": dict(device=DeviceModel(level_sigma=(0.5, 1.5, 1.5, 0.5))),
    "device_verified": dict(device=DeviceModel.verified(0.03)),
    "device_4bit_k1": dict(device=DeviceModel(weight_bits=4, bits_per_device=1, sigma=0.2)),
    "rcg": dict(rcg=(0.1, 0.5)),
}


def _ref_noise(w, seed, layer_id, spec, verify_mask=None):
    with cimext.backend("ref"):
        return _noise_of(w, seed, layer_id, spec, verify_mask)


def _noise_of(w, seed, layer_id, spec, verify_mask=None):
    if "device" in spec:
        return ops.noise(w, spec["device"], seed, layer_id, verify_mask=verify_mask)
    if "rcg" in spec:
        return ops.rcg_noise(w, *spec["rcg"], seed, layer_id)
    return ops.gaussian_noise(w, spec["gaussian"], seed, layer_id)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("shape", [(1,), (7, 97), (1025, 3)])
def test_noise_matches_reference(name, shape):
    w = torch.randn(shape)
    got = _noise_of(w, 77, 3, SPECS[name])
    want = _ref_noise(w, 77, 3, SPECS[name])
    assert got.shape == w.shape and got.dtype == w.dtype
    torch.testing.assert_close(got, want, atol=1e-6 * w.abs().max().item(), rtol=0)


def test_verify_mask_matches_reference():
    w = torch.randn(31, 17)
    mask = torch.rand(31, 17) < 0.4
    dev = DeviceModel(level_sigma=(1.0, 2.0, 2.0, 1.0))
    got = ops.noise(w, dev, 4, 2, verify_mask=mask)
    want = _ref_noise(w, 4, 2, dict(device=dev), mask)
    torch.testing.assert_close(got, want, atol=1e-7, rtol=0)
    # Verified weights are bounded by th_g; at least some unverified ones exceed it.
    bound = dev.th_g() * w.abs().max().item() * (1 + 1e-6)
    assert (got[mask].abs() <= bound).all()


def test_same_seed_same_noise_and_seeds_differ():
    w = torch.randn(64, 64)
    dev = DeviceModel()
    a, b, c = ops.noise(w, dev, 1), ops.noise(w, dev, 1), ops.noise(w, dev, 2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, ops.noise(w, dev, 1, layer_id=1))
    stacked = ops.noise(w, dev, seeds=[1, 2])
    assert torch.equal(stacked[0], a) and torch.equal(stacked[1], c)


def _mean_std_check(x: torch.Tensor, mean: float, std: float):
    n = x.numel()
    x = x.double()
    se_mean = std / math.sqrt(n)
    # Std of the sample std for a normal is about std / sqrt(2n).
    se_std = std / math.sqrt(2 * n)
    assert abs(x.mean().item() - mean) < 4 * se_mean, (x.mean().item(), mean, se_mean)
    assert abs(x.std().item() - std) < 4 * se_std * 1.5, (x.std().item(), std, se_std)


N_STAT = 400_000


def test_statistics_gaussian():
    w = torch.ones(N_STAT)
    _mean_std_check(ops.gaussian_noise(w, 0.07, 11), 0.0, 0.07)


@pytest.mark.parametrize(
    "dev", [DeviceModel(), DeviceModel(weight_bits=6, bits_per_device=3, sigma=0.3)]
)
def test_statistics_device_fast_path(dev):
    w = torch.ones(N_STAT)
    _mean_std_check(ops.noise(w, dev, 3), 0.0, dev.weight_std())


def test_statistics_device_level_sigma():
    # All weights at full scale: q = 255 = 0b11111111, every 2-bit device at level 3.
    dev = DeviceModel(level_sigma=(1.0, 1.0, 1.0, 2.0))
    w = torch.ones(N_STAT)
    _mean_std_check(ops.noise(w, dev, 5), 0.0, 2.0 * dev.weight_std())
    # Zero weights: every device at level 0, multiplier 1.
    w0 = torch.zeros(N_STAT)
    _mean_std_check(ops.noise(w0, dev, 5, scale=1.0), 0.0, dev.weight_std())


def _clamped_normal_std(c: float) -> float:
    """Std of clamp(Z, -c, c) for Z ~ N(0, 1)."""
    phi = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    tail = 0.5 * math.erfc(c / math.sqrt(2))
    var = (1 - 2 * tail) - 2 * c * phi + 2 * c * c * tail
    return math.sqrt(var)


def test_statistics_verified_devices():
    dev = DeviceModel(verify=True, verified_sigma=0.05, th=0.06)
    w = torch.ones(N_STAT)
    got = ops.noise(w, dev, 8)
    dn = _clamped_normal_std(dev.th / dev.verified_sigma) * dev.verified_sigma
    place = math.sqrt(sum(4 ** (2 * d) for d in range(4)))
    _mean_std_check(got, 0.0, dn * place / 255)
    assert got.abs().max().item() <= dev.th_g() * (1 + 1e-6)


def test_statistics_rcg_point_mass():
    sigma_t, th = 0.1, 0.8
    w = torch.ones(N_STAT)
    got = ops.rcg_noise(w, sigma_t, th, 13)
    # The censored value is float32(s * sigma_t) * float32(th), rounded in float32.
    cut32 = torch.tensor(sigma_t, dtype=torch.float32) * torch.tensor(th, dtype=torch.float32)
    cut = cut32.item()
    at_cut = (got == cut32).double().mean().item()
    p = 0.5 * math.erfc(th / math.sqrt(2))  # P(eps > th)
    assert abs(at_cut - p) < 4 * math.sqrt(p * (1 - p) / N_STAT)
    assert got.max().item() <= cut * (1 + 1e-6)
    # Mean of min(Z, c) = -phi(c) + c * P(Z > c).
    phi = math.exp(-th * th / 2) / math.sqrt(2 * math.pi)
    mean = sigma_t * (-phi + th * p)
    assert abs(got.double().mean().item() - mean) < 4 * sigma_t / math.sqrt(N_STAT)


def test_float64_weights():
    w = torch.randn(9, 13, dtype=torch.float64)
    got = ops.noise(w, DeviceModel(), 1)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ops.noise(w.float(), DeviceModel(), 1).double())


def test_noncontiguous_weight():
    w = torch.randn(13, 9).t()
    torch.testing.assert_close(
        ops.noise(w, DeviceModel(), 1), ops.noise(w.contiguous(), DeviceModel(), 1)
    )


def test_empty_weight():
    assert ops.noise(torch.empty(0, 5), DeviceModel(), 1).shape == (0, 5)


def test_opcheck_noise():
    w = torch.randn(7, 5)
    args = (w, torch.tensor([1, -2]), 0, 2, 1.5, 8, 2, 0.1, [], 0.01, 0.06, False, None)
    torch.library.opcheck(torch.ops.cimext.noise.default, args)
    mask = torch.rand(7, 5) < 0.5
    ls = [1.0, 2.0, 2.0, 1.0]
    args = (w, torch.tensor([3]), 1, 2, None, 8, 2, 0.1, ls, 0.01, 0.06, False, mask)
    torch.library.opcheck(torch.ops.cimext.noise.default, args)


# --- out= (every backend) ------------------------------------------------------------------------
BACKENDS = ["cpp", pytest.param("triton", marks=pytest.mark.interpreter), "ref"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_out_matches_fresh(backend):
    w = torch.randn(7, 97)
    dev = DeviceModel(level_sigma=(0.5, 1.5, 1.5, 0.5))
    with cimext.backend(backend):
        want = ops.noise(w, dev, seeds=[3, 2**64 - 1], layer_id=4)
        out = torch.full((2, 7, 97), float("nan"))
        got = ops.noise(w, dev, seeds=[3, 2**64 - 1], layer_id=4, out=out)
        assert got is out
        assert torch.equal(out, want)
        # One seed: out has the weight's shape; a strided out (a slice of a buffer) works too.
        one = torch.full((97, 7), float("nan")).t()
        assert ops.rcg_noise(w, 0.1, 1.0, 5, out=one) is one
        assert torch.equal(one, ops.rcg_noise(w, 0.1, 1.0, 5))
        version = out._version
        ops.gaussian_noise(w, 0.2, seeds=[1, 2], out=out)
        assert out._version > version
        assert torch.equal(out, ops.gaussian_noise(w, 0.2, seeds=[1, 2]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "make_out, exc, match",
    [
        (lambda: torch.zeros(3, 7, 5), ValueError, "shape"),
        (lambda: torch.zeros(7, 5), ValueError, "shape"),  # seeds given: (S, *weight.shape)
        (lambda: torch.zeros(2, 7, 5, dtype=torch.float64), TypeError, "dtype"),
        (lambda: torch.zeros(2, 7, 5, device="meta"), ValueError, "out is on meta"),
        (lambda: [0.0], TypeError, "out must be a torch.Tensor"),
        (lambda: torch.zeros(2, 7, 5, requires_grad=True), RuntimeError, "out requires grad"),
    ],
)
def test_noise_out_bad_input_writes_nothing(backend, make_out, exc, match):
    w = torch.randn(7, 5)
    out = make_out()
    before = out.clone() if isinstance(out, torch.Tensor) and out.device.type == "cpu" else None
    with cimext.backend(backend), pytest.raises(exc, match=match):
        ops.noise(w, DeviceModel(), seeds=[1, 2], out=out)
    if before is not None:
        assert torch.equal(out.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_out_overlapping_weight_is_refused(backend):
    w = torch.randn(7, 5)
    before = w.clone()
    with cimext.backend(backend), pytest.raises(ValueError, match="overlap"):
        ops.noise(w, DeviceModel(), 1, out=w)
    assert torch.equal(w, before)


def test_noise_out_schema_level_checks():
    # The C++ op checks `out` itself (callers may skip the Python wrapper), before writing.
    w, seeds = torch.randn(4, 3), torch.tensor([1, 2])
    args = (w, seeds, 0, 2, None, 8, 2, 0.1, [], 0.01, 0.06, False, None)
    out = torch.zeros(3, 4, 3)
    with pytest.raises(ValueError, match="out must have shape"):
        torch.ops.cimext.noise_out(*args, out)
    assert not out.any()
    with pytest.raises(TypeError, match="out dtype"):
        torch.ops.cimext.noise_out(*args, torch.zeros(2, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="overlap"):
        torch.ops.cimext.noise_out(w, seeds[:1], *args[2:], w.unsqueeze(0))
    out = torch.zeros(2, 4, 3)
    torch.ops.cimext.noise_out(*args, out)
    assert torch.equal(out, torch.ops.cimext.noise(*args))
    torch.library.opcheck(torch.ops.cimext.noise_out.default, (*args, torch.zeros(2, 4, 3)))


def test_seeds_as_tensor_and_scale_from_the_op():
    w = torch.randn(6, 5)
    dev = DeviceModel()
    want = ops.noise(w, dev, seeds=[7, 2**64 - 1])
    bits = torch.tensor([7, -1])  # int64 bit patterns of 7 and 2**64 - 1
    assert torch.equal(ops.noise(w, dev, seeds=bits), want)
    assert torch.equal(ops.noise(w, dev, torch.tensor(7)), want[0])
    # scale=None (the default) is max|W|; giving it explicitly changes nothing.
    assert torch.equal(ops.noise(w, dev, 7, scale=ref.full_scale(w)), want[0])
    with pytest.raises(TypeError, match="seeds must be an int64 tensor"):
        ops.noise(w, dev, seeds=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="seeds must hold at least one seed"):
        ops.noise(w, dev, seeds=torch.tensor([], dtype=torch.int64))
    with pytest.raises(ValueError, match="seed must be a single seed"):
        ops.noise(w, dev, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="seeds must be an int64 tensor"):
        seeds = torch.tensor([1], dtype=torch.int32)
        torch.ops.cimext.noise(w, seeds, 0, 2, None, 8, 2, 0.1, [], 0.0, 0.0, False, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_out_in_inference_mode(backend):
    # A normal weight and an out made in inference mode (an inference tensor): allowed there.
    w = torch.randn(4, 6)
    with cimext.backend(backend), torch.inference_mode():
        out = torch.empty(2, 4, 6)
        ops.noise(w, DeviceModel(), seeds=[1, 2], out=out)
        assert torch.equal(out, ops.noise(w, DeviceModel(), seeds=[1, 2]))
    with cimext.backend(backend), pytest.raises(RuntimeError, match="inference"):
        ops.noise(w, DeviceModel(), seeds=[1, 2], out=out)  # outside it: refused
