// Public C++ API of loldu: the truncated LDU factorization and the fused adapter linear op.
// Everything here works on CPU tensors, and on CUDA tensors when the library is built with CUDA.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace loldu {

// Leading-r components of the LDU factorization W = P L D U (partial pivoting):
//   PL     (..., d, r)  (P L)[:, :r] in the original row order of W
//   D      (..., r)     diag(U)[:r]
//   U      (..., r, k)  unit upper rows Ũ[:r, :]
//   pivots (..., r)     int64 row indices of W chosen as pivots, in order
// W is (d, k) or (B, d, k), any floating dtype; fp16/bf16/fp32 are factorized in fp32 and
// fp64 in fp64, and the factors come back in that working dtype.
struct LduResult {
  at::Tensor PL;
  at::Tensor D;
  at::Tensor U;
  at::Tensor pivots;
};

// pivoting: "partial" (row pivoting, matches torch.linalg.lu) or "none" (Doolittle order).
// Throws c10::Error with a message starting "loldu.ldu:" that names the shape, rank and step.
LduResult ldu(const at::Tensor& W, int64_t rank, const std::string& pivoting = "partial");

// The frozen factors re-derived from W and stored pivots (docs/method.md §2): the same result as
// ldu() whenever `pivots` are the pivots ldu() chose for W, at O((d + k) r^2) cost.
LduResult ldu_from_pivots(const at::Tensor& W, const at::Tensor& pivots);

// y = x W0^T + b + ((x U^T) * c) PL^T without forming ΔW.
//   x (..., k); weight (d, k); bias (d) or undefined; PL (d, r); U (r, k);
//   c (r) shared by every row, or (..., r) one coefficient vector per row of x.
at::Tensor adapter_linear(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& PL,
                          const at::Tensor& U, const at::Tensor& c);

// Gradients of adapter_linear with respect to x and c (W0, b, PL, U are frozen).
// grad_x is an undefined tensor when need_grad_x is false.
std::tuple<at::Tensor, at::Tensor> adapter_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& PL, const at::Tensor& U, const at::Tensor& c, bool need_grad_x);

// ΔW = PL diag(c) U, shape (d, k), computed in fp32 (fp64 for fp64 factors). For merging.
at::Tensor delta_weight(const at::Tensor& PL, const at::Tensor& U, const at::Tensor& c);

// Which build this is: "cpu" or "cuda".
std::string build_flavor();

}  // namespace loldu
