"""Triton kernels against cimext.reference (runs in the Triton interpreter on CPU)."""

import pytest
import torch

pytest.importorskip("triton")

from cimext import reference as R  # noqa: E402
from triton_kernels.noise import noise, noise_out  # noqa: E402
from triton_kernels.perturbed_conv2d import perturbed_conv2d  # noqa: E402
from triton_kernels.perturbed_linear import perturbed_linear  # noqa: E402
from triton_kernels.philox import fill_normals, fill_uniforms  # noqa: E402

pytestmark = pytest.mark.interpreter

DEV = "cuda" if torch.cuda.is_available() else "cpu"
M64 = (1 << 64) - 1
LEVELS4 = (0.5, 1.5, 1.5, 0.5)
BASE = dict(
    weight_bits=8,
    bits_per_device=2,
    sigma=0.1,
    level_sigma=(),
    verified_sigma=0.01,
    th=0.06,
    verify=False,
)
# name -> (mode, spec overrides, use a verify mask)
NOISE_CASES = {
    "gaussian": (1, {}, False),
    "device_fast": (2, {}, False),
    "device_levels": (2, dict(level_sigma=LEVELS4), False),
    "device_verify": (2, dict(verify=True), False),
    "device_mask": (2, {}, True),
    "device_mask_levels": (2, dict(level_sigma=LEVELS4, verify=True), True),
    "rcg": (3, dict(sigma=0.05, th=0.5), False),
    "none": (0, {}, False),
}


def as_int64(seed: int) -> int:
    """The int64 bit pattern the schema takes for a 64-bit seed."""
    seed &= M64
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def seed_t(seeds) -> torch.Tensor:
    """The schema's seeds tensor (int64 bit patterns) of 64-bit seeds."""
    return torch.tensor([as_int64(s) for s in seeds], dtype=torch.int64)


def spec_of(overrides: dict) -> dict:
    spec = dict(BASE)
    spec.update(overrides)
    return spec


def noise_args(mode: int, scale: float, spec: dict) -> tuple:
    """The noise arguments of the schemas after seeds and layer_id, minus verify_mask."""
    return (
        mode,
        scale,
        spec["weight_bits"],
        spec["bits_per_device"],
        spec["sigma"],
        spec["level_sigma"],
        spec["verified_sigma"],
        spec["th"],
        spec["verify"],
    )


def assert_rel(out: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    err = (out - ref).abs().max().item()
    assert err <= rel * max(ref.abs().max().item(), 1e-30), (err, ref.abs().max().item())


# ------------------------------------------------------------------------------------------------
# Philox streams
# ------------------------------------------------------------------------------------------------
STREAMS = [0, R.stream_seed(2**64 - 3, 5), R.stream_seed(123, 0)]
J0S = [0, 3, 2**32 - 5, 2**34 + 1, 2**40 + 7]


@pytest.mark.parametrize("stream", STREAMS)
def test_uniforms_bit_identical(stream):
    for j0 in J0S:
        out = fill_uniforms(stream, j0, 45, DEV).cpu()
        ref = R.uniforms(stream, torch.arange(j0, j0 + 45, dtype=torch.int64))
        assert torch.equal(out, ref), j0


@pytest.mark.parametrize("stream", STREAMS)
def test_normals_close(stream):
    for j0 in J0S:
        out = fill_normals(stream, j0, 45, DEV).cpu()
        ref = R.normals(stream, torch.arange(j0, j0 + 45, dtype=torch.int64))
        assert (out - ref).abs().max().item() <= 1e-6, j0


def test_fill_rejects_bad_range():
    with pytest.raises(ValueError):
        fill_normals(1, -1, 4, DEV)
    assert fill_uniforms(1, 5, 0, DEV).numel() == 0


# ------------------------------------------------------------------------------------------------
# noise
# ------------------------------------------------------------------------------------------------
SEEDS = [0, 2**64 - 3, 2**63, 987654321]


@pytest.mark.parametrize("case", list(NOISE_CASES))
def test_noise_matches_reference(case):
    mode, overrides, use_mask = NOISE_CASES[case]
    spec = spec_of(overrides)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(5, 19, generator=gen)
    mask = (torch.rand(5, 19, generator=gen) > 0.5) if use_mask else None
    scale = R.full_scale(w)
    for layer_id in (0, 7, 2**40):
        out = noise(
            w.to(DEV),
            seed_t(SEEDS),
            layer_id,
            *noise_args(mode, scale, spec),
            None if mask is None else mask.to(DEV),
        )
        assert out.shape == (len(SEEDS), 5, 19) and out.dtype == w.dtype
        for k, s in enumerate(SEEDS):
            ref = R.noise(w, s, layer_id, mode=mode, scale=scale, verify_mask=mask, **spec)
            assert (out[k].cpu() - ref).abs().max().item() <= 1e-6, (layer_id, s)
        if mode != 0:
            assert out.abs().max() > 0 and not torch.equal(out[0], out[1])


@pytest.mark.parametrize("bits", [(6, 3), (8, 1), (4, 4)])
def test_noise_device_layouts(bits):
    # D = 2 (one normal per device), D = 8 (randn4x blocks), D = 1 with a 16-level table.
    weight_bits, bits_per_device = bits
    levels = tuple(0.2 + 0.1 * v for v in range(1 << bits_per_device))
    spec = spec_of(
        dict(weight_bits=weight_bits, bits_per_device=bits_per_device, level_sigma=levels)
    )
    w = torch.randn(3, 11, generator=torch.Generator().manual_seed(2))
    mask = torch.arange(33).reshape(3, 11) % 3 == 0
    scale = R.full_scale(w)
    out = noise(w.to(DEV), seed_t(SEEDS[:2]), 3, *noise_args(2, scale, spec), mask.to(DEV))
    for k, s in enumerate(SEEDS[:2]):
        ref = R.noise(w, s, 3, mode=2, scale=scale, verify_mask=mask, **spec)
        assert (out[k].cpu() - ref).abs().max().item() <= 1e-6


def test_noise_quantization_ties():
    # M = 2, K = 1, s = 3: |w| / s * 3 is exact, so 0.5, 1.5, 2.5 are ties (round half to even)
    # and the per-level std tells which level was picked.
    spec = spec_of(dict(weight_bits=2, bits_per_device=1, level_sigma=(0.25, 4.0)))
    w = torch.tensor([0.0, 0.5, 1.5, 2.5, 3.0, -1.5, -2.5, -0.5, 1.0, 7.0])
    out = noise(
        w.to(DEV),
        seed_t([11]),
        0,
        *noise_args(2, 3.0, spec),
        torch.zeros(10, dtype=torch.bool).to(DEV),
    )
    ref = R.noise(w, 11, 0, mode=2, scale=3.0, verify_mask=torch.zeros(10), **spec)
    assert (out[0].cpu() - ref).abs().max().item() <= 1e-6


def test_noise_float16_and_empty():
    spec = spec_of({})
    w = torch.randn(4, 9, generator=torch.Generator().manual_seed(3)).half()
    scale = R.full_scale(w)
    out = noise(w.to(DEV), seed_t([5]), 1, *noise_args(2, scale, spec), None)
    ref = R.noise(w, 5, 1, mode=2, scale=scale, **spec)
    assert out.dtype == torch.float16
    # float32 values within 1e-6 can round to neighbouring float16 values.
    assert (out[0].cpu().float() - ref.float()).abs().max().item() <= 1e-3 * ref.abs().max()
    empty = noise(torch.zeros(0, 3, device=DEV), seed_t([1, 2]), 0, *noise_args(2, 0.0, spec), None)
    assert empty.shape == (2, 0, 3)


def test_noise_rejects_bad_spec():
    w = torch.randn(2, 3, device=DEV)
    with pytest.raises(ValueError, match="bits_per_device"):
        noise(w, seed_t([1]), 0, *noise_args(2, 1.0, spec_of(dict(bits_per_device=3))), None)
    with pytest.raises(ValueError, match="level_sigma"):
        noise(w, seed_t([1]), 0, *noise_args(2, 1.0, spec_of(dict(level_sigma=(1.0,)))), None)
    with pytest.raises(ValueError, match="verify_mask"):
        noise(
            w,
            seed_t([1]),
            0,
            *noise_args(2, 1.0, spec_of({})),
            torch.ones(5, dtype=torch.bool, device=DEV),
        )
    with pytest.raises(TypeError, match="weight"):
        noise(w.int(), seed_t([1]), 0, *noise_args(2, 1.0, spec_of({})), None)


# ------------------------------------------------------------------------------------------------
# perturbed_linear / perturbed_conv2d
# ------------------------------------------------------------------------------------------------
def run_linear(x, w, bias, delta, x_stacked, seeds, layer_id, case, dtype=torch.float32):
    mode, overrides, use_mask = NOISE_CASES[case]
    spec = spec_of(overrides)
    mask = (torch.arange(w.numel()).reshape(w.shape) % 3 == 1) if use_mask else None
    x, w = x.to(dtype), w.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    delta = None if delta is None else delta.to(dtype)
    scale = R.full_scale(w)

    def dev(t):
        return None if t is None else t.to(DEV)

    out = perturbed_linear(
        dev(x),
        dev(w),
        dev(bias),
        dev(delta),
        x_stacked,
        seed_t(seeds),
        layer_id,
        *noise_args(mode, scale, spec),
        dev(mask),
    )
    ref = R.perturbed_linear(
        x,
        w,
        bias,
        seeds=seeds,
        layer_id=layer_id,
        delta=delta,
        x_stacked=x_stacked,
        mode=mode,
        scale=scale,
        verify_mask=mask,
        **spec,
    )
    return out, ref


@pytest.mark.parametrize(
    "m,k,n,n_seeds,with_bias,with_delta,case",
    [
        (1, 7, 97, 3, True, True, "device_fast"),
        (7, 97, 1, 1, False, True, "device_mask"),
        (97, 1, 7, 3, True, False, "rcg"),
        (5, 24, 33, 3, True, True, "gaussian"),  # K % 4 == 0: one randn4x per 4 weights
        (6, 20, 9, 1, False, False, "device_levels"),
        (3, 13, 18, 3, True, True, "device_verify"),
        (4, 9, 5, 3, True, True, "none"),
    ],
)
def test_perturbed_linear(m, k, n, n_seeds, with_bias, with_delta, case):
    gen = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    delta = 0.02 * torch.randn(n, k, generator=gen) if with_delta else None
    seeds = [7, 2**64 - 1, 2**63 + 5][:n_seeds]
    out, ref = run_linear(x, w, bias, delta, False, seeds, 4, case)
    assert out.shape == (n_seeds, m, n)
    assert_rel(out, ref, 1e-4)
    if case != "none":
        clean, _ = run_linear(x, w, bias, delta, False, seeds, 4, "none")
        assert not torch.allclose(out, clean)


@pytest.mark.parametrize("scratch", [1 << 22, 40, 7])
@pytest.mark.parametrize(
    "case,k,x_stacked",
    [
        ("gaussian", 24, False),  # K % 4 == 0: one randn4x per 4 weights
        ("rcg", 13, True),
        ("device_mask_levels", 10, False),
        ("device_fast", 9, True),
    ],
)
def test_perturbed_linear_row_tiles(monkeypatch, scratch, case, k, x_stacked):
    # The row-tile path: W + δ + ΔW of a tile of rows (for a chunk of seeds) into a bounded
    # scratch, then the plain matmul. A scratch of 1 << 22 holds every seed's whole weight, 40
    # elements a few rows of one seed (tiles that start inside a Philox group when K % 4 != 0),
    # 7 elements less than one row (one row per tile).
    import triton_kernels.perturbed_linear as linear_mod

    monkeypatch.setattr(linear_mod, "FORCE_PATH", "rows")
    monkeypatch.setattr(linear_mod, "SCRATCH_ELEMENTS", scratch)
    gen = torch.Generator().manual_seed(k)
    n, m = 11, 6
    x = torch.randn(*((3,) if x_stacked else ()), m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    delta = 0.02 * torch.randn(n, k, generator=gen)
    out, ref = run_linear(x, w, bias, delta, x_stacked, [7, 2**64 - 1, 2**63 + 5], 4, case)
    assert out.shape == (3, m, n)
    assert_rel(out, ref, 1e-4)


@pytest.mark.parametrize("path", ["fused", "rows"])
def test_autotuned_launch(monkeypatch, path):
    # On a GPU the kernels go through triton.autotune; here the interpreter runs that launch code
    # (grid callables, pruning, every surviving configuration once) with a stand-in timer.
    import triton_kernels.perturbed_linear as linear_mod

    timed = []

    def bench(kernel_call, quantiles):
        kernel_call()
        timed.append(1)
        return [float(len(timed))] * len(quantiles)  # the first configuration "wins"

    for tuned in (linear_mod._perturbed_mm_tuned, linear_mod._perturbed_rows_tuned):
        monkeypatch.setattr(tuned, "_do_bench", bench)
        monkeypatch.setattr(tuned, "cache", {})
    monkeypatch.setattr(linear_mod, "autotuned", lambda device: True)
    monkeypatch.setattr(linear_mod, "FORCE_PATH", path)
    gen = torch.Generator().manual_seed(11)
    # M = 40 and N = 200 leave two matmul configurations (BLOCK_M 64; BLOCK_N 64 or 128).
    x, w = torch.randn(40, 64, generator=gen), torch.randn(200, 64, generator=gen)
    bias = torch.randn(200, generator=gen)
    out, ref = run_linear(x, w, bias, None, False, [5, 6], 1, "device_fast")
    assert_rel(out, ref, 1e-4)
    assert timed, "the autotuner benchmarked no configuration"


def test_prune_keeps_fitting_configs():
    import triton_kernels.perturbed_linear as linear_mod

    configs = linear_mod._mm_configs()
    small = linear_mod._prune_mm(configs, dict(m_bucket=8, N=10, K=12))
    assert [c.kwargs["BLOCK_M"] for c in small] == [16]
    big = linear_mod._prune_mm(configs, dict(m_bucket=4096, N=4096, K=4096))
    assert {c.kwargs["BLOCK_M"] for c in big} == {64, 128}
    assert len(big) == len([c for c in configs if c.kwargs["BLOCK_M"] >= 64])
    mid = linear_mod._prune_mm(configs, dict(m_bucket=32, N=4096, K=4096))
    assert {c.kwargs["BLOCK_M"] for c in mid} == {32}
    narrow = linear_mod._prune_mm(configs, dict(m_bucket=64, N=16, K=4096))
    assert {c.kwargs["BLOCK_N"] for c in narrow} == {64}


def test_force_path_rejects_unknown(monkeypatch):
    import triton_kernels.perturbed_linear as linear_mod

    monkeypatch.setattr(linear_mod, "FORCE_PATH", "bogus")
    with pytest.raises(ValueError, match="FORCE_PATH"):
        run_linear(torch.randn(2, 4), torch.randn(3, 4), None, None, False, [1], 0, "gaussian")


def test_perturbed_linear_stacked_batched_noncontiguous():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 12, 5, generator=gen).transpose(-1, -2)  # (S, 2, 5, 12), strided
    w = torch.randn(12, 10, generator=gen).t()  # (10, 12), non-contiguous
    bias = torch.randn(10, generator=gen)
    out, ref = run_linear(x, w, bias, None, True, [1, 2, 3], 0, "device_fast")
    assert out.shape == (3, 2, 5, 10)
    assert_rel(out, ref, 1e-4)
    out, ref = run_linear(x[0], w, bias, None, False, [1, 2, 3], 0, "rcg")
    assert out.shape == (3, 2, 5, 10)
    assert_rel(out, ref, 1e-4)


# float64 runs the fallback; its float32 noise differs from the reference by ~1e-7.
@pytest.mark.parametrize("dtype,rel", [(torch.float16, 5e-3), (torch.float64, 1e-6)])
def test_perturbed_linear_dtypes(dtype, rel):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 17, generator=gen)
    w = torch.randn(11, 17, generator=gen)
    bias = torch.randn(11, generator=gen)
    delta = 0.01 * torch.randn(11, 17, generator=gen)
    out, ref = run_linear(x, w, bias, delta, False, [3, 4], 2, "device_verify", dtype)
    assert_rel(out, ref, rel)


def test_perturbed_linear_rejects_mismatch():
    w = torch.randn(4, 3, device=DEV)
    args = (seed_t([1]), 0, *noise_args(2, 1.0, spec_of({})), None)
    with pytest.raises(ValueError, match="x"):
        perturbed_linear(torch.randn(2, 5, device=DEV), w, None, None, False, *args)
    with pytest.raises(ValueError, match="delta"):
        perturbed_linear(
            torch.randn(2, 3, device=DEV), w, None, torch.zeros(3, 4, device=DEV), False, *args
        )
    with pytest.raises(TypeError, match="x"):
        perturbed_linear(torch.randn(2, 3, device=DEV).double(), w, None, None, False, *args)


def run_conv(x, w, bias, delta, conv, x_stacked, seeds, case, dtype=torch.float32):
    mode, overrides, use_mask = NOISE_CASES[case]
    spec = spec_of(overrides)
    mask = (torch.arange(w.numel()).reshape(w.shape) % 4 == 0) if use_mask else None
    x, w = x.to(dtype), w.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    delta = None if delta is None else delta.to(dtype)
    stride, padding, dilation, groups = conv
    scale = R.full_scale(w)

    def dev(t):
        return None if t is None else t.to(DEV)

    out = perturbed_conv2d(
        dev(x),
        dev(w),
        dev(bias),
        dev(delta),
        stride,
        padding,
        dilation,
        groups,
        x_stacked,
        seed_t(seeds),
        9,
        *noise_args(mode, scale, spec),
        dev(mask),
    )
    ref = R.perturbed_conv2d(
        x,
        w,
        bias,
        stride,
        padding,
        dilation,
        groups,
        seeds=seeds,
        layer_id=9,
        delta=delta,
        x_stacked=x_stacked,
        mode=mode,
        scale=scale,
        verify_mask=mask,
        **spec,
    )
    return out, ref


@pytest.mark.parametrize(
    "conv,c_in,c_out,ksize,x_stacked,with_bias,with_delta,case",
    [
        (([2, 2], [1, 1], [2, 2], 2), 4, 6, 3, False, True, True, "device_mask"),
        (([1, 1], [1, 1], [1, 1], 1), 3, 5, 3, True, False, True, "device_fast"),
        (([2, 1], [0, 1], [1, 2], 3), 3, 3, 2, False, True, False, "rcg"),  # depthwise, K = 4
        (([1, 1], [0, 0], [1, 1], 2), 4, 4, 1, True, True, True, "device_levels"),
    ],
)
def test_perturbed_conv2d(conv, c_in, c_out, ksize, x_stacked, with_bias, with_delta, case):
    gen = torch.Generator().manual_seed(c_in * 100 + c_out * 10 + ksize)
    seeds = [2**64 - 9, 4, 2**63]
    groups = conv[3]
    x_shape = (len(seeds), 2, c_in, 7, 6) if x_stacked else (2, c_in, 7, 6)
    x = torch.randn(*x_shape, generator=gen)
    w = torch.randn(c_out, c_in // groups, ksize, ksize, generator=gen)
    bias = torch.randn(c_out, generator=gen) if with_bias else None
    delta = 0.02 * torch.randn(*w.shape, generator=gen) if with_delta else None
    out, ref = run_conv(x, w, bias, delta, conv, x_stacked, seeds, case)
    assert out.shape[:3] == (len(seeds), 2, c_out)
    assert_rel(out, ref, 1e-4)
    clean, _ = run_conv(x, w, bias, delta, conv, x_stacked, seeds, "none")
    assert not torch.allclose(out, clean)


@pytest.mark.parametrize("dtype,rel", [(torch.float16, 5e-3), (torch.float64, 1e-6)])
def test_perturbed_conv2d_dtypes(dtype, rel):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1, 4, 5, 5, generator=gen)
    w = torch.randn(4, 2, 3, 3, generator=gen)
    bias = torch.randn(4, generator=gen)
    out, ref = run_conv(
        x, w, bias, None, ([1, 1], [1, 1], [1, 1], 2), False, [1, 2], "gaussian", dtype
    )
    assert_rel(out, ref, rel)


@pytest.mark.parametrize("x_stacked", [False, True])
def test_perturbed_conv2d_row_tiles(monkeypatch, x_stacked):
    # im2col rows are many (N * H * W), so on a GPU groups == 1 convolutions take the row-tile
    # path; 30 scratch elements cut the (6, 27) weight into tiles of one row.
    import triton_kernels.perturbed_linear as linear_mod

    monkeypatch.setattr(linear_mod, "FORCE_PATH", "rows")
    monkeypatch.setattr(linear_mod, "SCRATCH_ELEMENTS", 30)
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(*((2,) if x_stacked else ()), 2, 3, 7, 6, generator=gen)
    w = torch.randn(6, 3, 3, 3, generator=gen)
    bias = torch.randn(6, generator=gen)
    delta = 0.01 * torch.randn(6, 3, 3, 3, generator=gen)
    conv = ([2, 1], [1, 0], [1, 1], 1)
    out, ref = run_conv(x, w, bias, delta, conv, x_stacked, [3, 2**64 - 2], "device_levels")
    assert_rel(out, ref, 1e-4)


def test_seed_chunking(monkeypatch):
    # CUDA caps grid axes 1 and 2 at 65535; the launchers split seeds into chunks below that.
    import triton_kernels.noise as noise_mod
    import triton_kernels.perturbed_linear as linear_mod

    monkeypatch.setattr(noise_mod, "MAX_GRID_YZ", 2)
    monkeypatch.setattr(linear_mod, "MAX_GRID_YZ", 4)
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(4, 10, generator=gen)
    spec = spec_of({})
    scale = R.full_scale(w)
    seeds = [1, 2, 3, 2**64 - 1, 5]
    out = noise(w.to(DEV), seed_t(seeds), 0, *noise_args(2, scale, spec), None)
    for k, s in enumerate(seeds):
        ref = R.noise(w, s, 0, mode=2, scale=scale, **spec)
        assert (out[k].cpu() - ref).abs().max().item() <= 1e-6
    x = torch.randn(len(seeds), 1, 4, 6, 6, generator=gen)
    wc = torch.randn(4, 2, 3, 3, generator=gen)
    out, ref = run_conv(x, wc, None, None, ([1, 1], [0, 0], [1, 1], 2), True, seeds, "gaussian")
    assert_rel(out, ref, 1e-4)


def test_noise_out_launcher_writes_into_out_and_checks_it_first():
    w = torch.randn(5, 7, device=DEV)
    args = (seed_t([3, 4]), 2, *noise_args(2, None, spec_of({})), None)
    want = noise(w, *args)
    out = torch.full((7, 5, 2), float("nan"), device=DEV).permute(2, 1, 0)  # strided (2, 5, 7)
    noise_out(w, *args, out)
    assert torch.equal(out, want)
    bad = [
        (torch.zeros(3, 5, 7, device=DEV), ValueError, "shape"),
        (torch.zeros(2, 5, 7, device=DEV, dtype=torch.float64), TypeError, "dtype"),
        (torch.zeros(2, 5, 7, device="meta"), ValueError, "out is on"),
    ]
    for o, exc, match in bad:
        before = o.clone() if o.device.type != "meta" else None
        with pytest.raises(exc, match=match):
            noise_out(w, *args, o)
        if before is not None:
            assert torch.equal(o, before)
    with pytest.raises(ValueError, match="overlap"):
        noise_out(w, seed_t([1]), *args[1:], w.unsqueeze(0))
    with pytest.raises(TypeError, match="seeds must be an int64 tensor"):
        noise(w, torch.tensor([1], dtype=torch.int32), *args[1:])
