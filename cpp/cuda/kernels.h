// Launchers of the loldu CUDA kernels. Torch-free on purpose: the .cu files include only this
// header and the CUDA runtime, so any nvcc can compile-check them without a CUDA build of torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace loldu {
namespace cuda {

// Why a factorization stopped, per batch item (code 0: it did not).
struct LduStatus {
  int32_t code;   // 0 ok, 1 negligible pivot, 2 NaN/Inf in the panel, 3 NaN/Inf in a pivot row
  int32_t step;   // failing step for code 1
  int64_t row;    // row of W for codes 2 and 3
  int64_t col;    // column of W for codes 2 and 3
  double value;   // the pivot for code 1
  double tol;     // the pivot tolerance
};

enum PivotModeCode : int { kPartial = 0, kNone = 1, kGiven = 2 };

// Strided view of a batch of (d, k) matrices.
template <typename T>
struct Mat3 {
  const T* data;
  int64_t B, d, k;
  int64_t sb, sd, sk;
};

// Panel LU of W[:, :r] for every batch item: one thread block per matrix. Workspace:
// panel (B, r, d) column-major per item, perm and pos (B, d). forced: (B, r) device pivots or null.
template <typename T, typename A>
cudaError_t ldu_panel(Mat3<T> W, int64_t r, int mode, const int64_t* forced, A* panel, int64_t* perm,
                      int64_t* pos, LduStatus* status, cudaStream_t stream);

// From the factored panel: PL (B, d, r), D (B, r), U (B, r, k) unit upper, pivots (B, r).
template <typename T, typename A>
cudaError_t ldu_outputs(Mat3<T> W, int64_t r, const A* panel, const int64_t* perm, A* PL, A* D, A* U,
                        int64_t* pivots, LduStatus* status, cudaStream_t stream);

// out[j] += sum_i t[i, j] * h[i, j], t and h contiguous (n, r).
template <typename T, typename A>
cudaError_t column_dot(const T* t, const T* h, int64_t n, int64_t r, A* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace loldu
