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

// The adapted linear layer y = x W^T + b, W = W0 + PL diag(c) U, in one of two exact forms
// (docs/method.md §3, §4, §7):
//   "delta"  y = x W0^T + b + ((x U^T) * c) PL^T: rank-r passes over (n, d) and (n, k), no (d, k) temporary;
//   "dense"  W built once per call (d, k), y = x W^T + b: one GEMM each way plus the build;
//   "auto"   the cheaper of the two for this call by the cost model (adapter_dense_min_rows).
//   x (..., k); weight (d, k); bias (d) or undefined; PL (d, r); U (r, k);
//   c (r) shared by every row, or (..., r) one coefficient vector per row of x (always delta: the
//   dense form would need one W per row).
// "auto" counts a backward for x or c when grad mode is on and x or c requires grad.
at::Tensor adapter_linear(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& PL,
                          const at::Tensor& U, const at::Tensor& c, c10::string_view form = "auto");

// The form ("delta" or "dense") adapter_linear runs for these arguments; throws on a bad form.
std::string resolve_adapter_form(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& PL,
                                 const at::Tensor& c, c10::string_view form);

// The forward of a resolved form, with what its backward reuses: t = x U^T (n, r) for "delta",
// the dense weight W (d, k) for "dense".
std::tuple<at::Tensor, at::Tensor> adapter_linear_forward(const at::Tensor& x, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const at::Tensor& PL, const at::Tensor& U,
                                                          const at::Tensor& c, c10::string_view form);

// Gradients of adapter_linear with respect to x and c (W0, b, PL, U are frozen), in the form the
// forward ran; `saved` is what adapter_linear_forward returned (recomputed when absent).
// grad_x (grad_c) is an undefined tensor when need_grad_x (need_grad_c) is false.
std::tuple<at::Tensor, at::Tensor> adapter_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& PL, const at::Tensor& U, const at::Tensor& c, bool need_grad_x,
    bool need_grad_c = true, c10::string_view form = "delta",
    const std::optional<at::Tensor>& saved = std::nullopt);

// The cost model behind "auto" (docs/method.md §7): the smallest number of rows n = x.numel() / k
// from which the dense form is the cheaper one for a (d, k) layer at rank r, given which
// gradients the backward computes (none: a forward only); int64 max when never.
int64_t adapter_dense_min_rows(int64_t d, int64_t k, int64_t r, at::ScalarType dtype, c10::DeviceType device,
                               bool need_grad_x, bool need_grad_c);

// "delta" or "dense": which form "auto" runs for n rows.
std::string adapter_form(int64_t n, int64_t d, int64_t k, int64_t r, at::ScalarType dtype, c10::DeviceType device,
                         bool need_grad_x, bool need_grad_c);

// ΔW = PL diag(c) U, shape (d, k), computed in fp32 (fp64 for fp64 factors). For merging.
at::Tensor delta_weight(const at::Tensor& PL, const at::Tensor& U, const at::Tensor& c);

// Which build this is: "cpu" or "cuda".
std::string build_flavor();

}  // namespace loldu

// Adapter files (read, write) and merging them into weight maps without Python (docs/cpp.md).
#include <loldu/adapter_file.h>
#include <loldu/merge.h>
#include <loldu/sha256.h>
