// Argument checks of bitflip / bitflip_, shared by the CPU and CUDA implementations.
#pragma once
#include <ATen/ATen.h>

#include "../kernels/bitflip.h"

namespace cimext::cpu {

// Bits per element of a bitflip dtype (float32, float16, bfloat16, int8, uint8, int16, int32),
// 0 for any other dtype.
int bitflip_width(at::ScalarType t);

// Throws (naming the argument) unless t's dtype is supported, mask fits its width, p01 and p10
// are in [0, 1] and layer_id >= 0; then fills params (all but the stream) and returns whether
// any bit can flip. Reads no tensor data.
bool check_bitflip(const at::Tensor& t, double p01, double p10, int64_t mask, int64_t layer_id,
                   bool zero_nonfinite, BitflipParams* params);

}  // namespace cimext::cpu
