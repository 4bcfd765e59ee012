"""Raw Philox streams: the same stream gives bit-identical uniforms and normals within 1e-6 on
the reference, the C++ backend (AVX2 and scalar paths) and Triton (interpreter on CPU)."""

import pytest
import torch

from cimext import reference as ref
from cimext.ops._spec import check_seed

STREAM = ref.stream_seed(2**64 - 3, 11)
STARTS = [0, 3, 2**32 - 6, 2**40 + 1]  # unaligned starts; counters crossing into the high word


def _cpp(kind: str, j0: int, n: int) -> torch.Tensor:
    op = torch.ops.cimext._philox_normals if kind == "normal" else torch.ops.cimext._philox_uniforms
    return op(check_seed(STREAM), check_seed(j0), n)


def _ref(kind: str, j0: int, n: int) -> torch.Tensor:
    j = torch.arange(n, dtype=torch.int64) + j0
    return ref.normals(STREAM, j) if kind == "normal" else ref.uniforms(STREAM, j)


@pytest.mark.parametrize("j0", STARTS)
@pytest.mark.parametrize("n", [1, 7, 97, 1025])
def test_cpp_uniforms_bit_identical(j0, n):
    assert torch.equal(_cpp("uniform", j0, n), _ref("uniform", j0, n))


@pytest.mark.parametrize("simd", [0, 1, 2])
@pytest.mark.parametrize("j0", STARTS)
def test_cpp_normals_close(j0, simd):
    prev = torch.ops.cimext._set_cpu_simd(simd)
    try:
        got = _cpp("normal", j0, 20_000)
    finally:
        torch.ops.cimext._set_cpu_simd(prev)
    assert (got - _ref("normal", j0, 20_000)).abs().max().item() <= 1e-6


def test_uniforms_in_unit_interval_and_uniform():
    u = _cpp("uniform", 0, 200_000)
    assert u.min().item() >= 0.0 and u.max().item() < 1.0
    assert abs(u.double().mean().item() - 0.5) < 4 * (1 / 12) ** 0.5 / 200_000**0.5


@pytest.mark.interpreter
@pytest.mark.parametrize("j0", STARTS)
def test_triton_matches_cpp(j0):
    from cimext.triton_kernels import philox

    n = 517
    assert torch.equal(philox.fill_uniforms(STREAM, j0, n), _cpp("uniform", j0, n))
    diff = philox.fill_normals(STREAM, j0, n) - _cpp("normal", j0, n)
    assert diff.abs().max().item() <= 1e-6
