// Torch-side entry points of the CUDA kernels (cuda/ops_cuda.cpp); stubs in CPU-only builds.
#pragma once

#include <ATen/ATen.h>

namespace loldu {

// out[j] += sum_i t[i, j] * h[i, j] for contiguous (n, r) t and h; out is fp32 (fp64 for fp64).
void column_dot_cuda(const at::Tensor& t, const at::Tensor& h, at::Tensor& out);

}  // namespace loldu
