// What csrc/cuda/perturbed_linear.cu and perturbed_conv2d.cu share (defined in noise.cu): the
// operand checks, the row-tile launcher, and the plan that bounds the scratch they fill.
//
// Neither op ever holds a full W + δ + ΔW per instance: they cut the work into tiles of weight rows
// (for a chunk of instances when whole weights are small) of at most scratch_elements() elements,
// fill one reused scratch with a tile (one perturbed_range kernel launch), and hand it to
// cuBLAS / cuDNN before the next tile is written (stream order keeps the next launch behind the
// GEMM that reads the scratch).
#pragma once
#include <ATen/ATen.h>

#include <cstdlib>

#include "../kernels/noise.h"

namespace cimext::cuda {

// out[c] = W + δ + ΔW_c of flat elements i0 .. i0 + n - 1 for the first `count` of `streams`
// (stream seeds), on the current CUDA stream. w, delta (may be undefined) and mask (may be
// undefined) are the whole contiguous weight; out is contiguous with count * n elements.
void perturbed_range_cuda(const NoiseParams& p, const uint64_t* streams, int64_t count,
                          const at::Tensor& w, const at::Tensor& delta, const at::Tensor& mask,
                          int64_t i0, int64_t n, at::Tensor& out);

// Instances per perturbed_range launch (their stream seeds travel in the kernel parameters).
constexpr int64_t kMaxChunk = 64;

// The scratch bound in elements: 4M (16 MiB of float32) unless CIMEXT_CUDA_SCRATCH_ELEMENTS
// says otherwise (tests use it to force many small tiles).
inline int64_t scratch_elements() {
  const char* env = std::getenv("CIMEXT_CUDA_SCRATCH_ELEMENTS");
  const int64_t v = env != nullptr ? std::atoll(env) : 0;
  return v > 0 ? v : (int64_t{1} << 22);
}

// A weight of `rows` rows of `row_elems` elements for S instances: tiles of `tile_rows` rows (a
// multiple of `unit`, or all rows) for chunks of `chunk` instances; chunk > 1 only when whole
// weights fit, and then tile_rows == rows.
struct TilePlan {
  int64_t tile_rows;
  int64_t chunk;
};
inline TilePlan plan_tiles(int64_t rows, int64_t row_elems, int64_t S, int64_t unit) {
  const int64_t bound = scratch_elements();
  const int64_t whole = rows * row_elems;
  if (whole <= bound) {
    int64_t chunk = whole > 0 ? bound / whole : S;
    chunk = std::max<int64_t>(1, std::min({chunk, S, kMaxChunk}));
    return {rows, chunk};
  }
  int64_t tile = std::max<int64_t>(1, bound / std::max<int64_t>(1, row_elems)) / unit * unit;
  tile = std::min(rows, std::max(unit, tile));
  return {tile, 1};
}

}  // namespace cimext::cuda
