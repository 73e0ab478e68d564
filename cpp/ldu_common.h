// Private pieces shared by the CPU and CUDA factorization: argument checks and error messages.
#pragma once

#include "loldu/loldu.h"

#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace loldu {

enum class PivotMode { Partial, None, Given };

inline PivotMode parse_pivoting(const std::string& p) {
  if (p == "partial") return PivotMode::Partial;
  if (p == "none") return PivotMode::None;
  TORCH_CHECK_VALUE(false, "loldu.ldu: pivoting must be 'partial' or 'none', got '", p, "'");
}

inline at::ScalarType working_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Validates W and rank; returns the shape as text for later messages.
inline std::string check_ldu_args(const at::Tensor& W, int64_t rank) {
  std::ostringstream s;
  s << W.sizes();
  const std::string shape = s.str();
  TORCH_CHECK_VALUE(W.dim() == 2 || W.dim() == 3,
                    "loldu.ldu: W must be (d, k) or a batch (B, d, k), got shape ", shape);
  TORCH_CHECK_VALUE(!W.is_quantized() && at::isFloatingType(W.scalar_type()),
                    "loldu.ldu: W must be fp64, fp32, fp16 or bf16, got ", W.scalar_type(),
                    " of shape ", shape);
  const int64_t d = W.size(-2), k = W.size(-1);
  const int64_t m = d < k ? d : k;
  TORCH_CHECK_VALUE(rank >= 1 && rank <= m, "loldu.ldu: rank must be in [1, min(d, k)] = [1, ", m,
                    "] for W of shape ", shape, ", got rank=", rank);
  return shape;
}

// Names the matrix, shape, rank and failing step in every factorization error.
struct LduContext {
  std::string shape;
  int64_t rank;
  int64_t batch_index;  // -1 when W is a single matrix

  std::string where() const {
    std::ostringstream s;
    s << "W of shape " << shape;
    if (batch_index >= 0) s << " (batch item " << batch_index << ")";
    s << ", rank=" << rank;
    return s.str();
  }
  [[noreturn]] void fail_pivot(int64_t step, double piv, double tol) const {
    TORCH_CHECK_VALUE(false, "loldu.ldu: negligible pivot ", piv, " (tolerance ", tol, ") at step ",
                      step, " of ", rank, " for ", where(),
                      ": the leading columns are rank-deficient; lower the rank");
  }
  [[noreturn]] void fail_nonfinite(const char* what, int64_t row, int64_t col) const {
    TORCH_CHECK_VALUE(false, "loldu.ldu: NaN or Inf in ", what, " at W[", row, ", ", col, "] for ",
                      where());
  }
};

LduResult ldu_dispatch(const at::Tensor& W, int64_t rank, PivotMode mode, const at::Tensor& forced);

// Implemented in cuda/ops_cuda.cpp when built with CUDA, else in ops.cpp as a stub that throws.
LduResult ldu_cuda(const at::Tensor& W3, int64_t r, PivotMode mode, const at::Tensor& forced3,
                   const std::string& shape);

}  // namespace loldu
