// Private pieces shared by the CPU and CUDA factorization: argument checks and error messages.
#pragma once

#include "loldu/loldu.h"

#include <c10/util/Exception.h>

#include <functional>
#include <optional>
#include <sstream>
#include <tuple>
#include <string>

// Hot loops, cloned for AVX-512 / AVX2 / baseline and picked at load time (the extension is
// built without -march flags so that one build runs on any x86-64).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LOLDU_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LOLDU_MULTIVERSION
#endif

namespace loldu {

enum class PivotMode { Partial, None, Given };

inline PivotMode parse_pivoting(const std::string& p) {
  if (p == "partial") return PivotMode::Partial;
  if (p == "none") return PivotMode::None;
  TORCH_CHECK_VALUE(false, "loldu.ldu: pivoting must be 'partial' or 'none', got '", p, "'");
}

// A dtype as Python spells it ("torch.float32"), so messages read the same from either language.
inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return "torch.float64";
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
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
  TORCH_CHECK_VALUE(!W.is_quantized() && is_supported_float(W.scalar_type()),
                    "loldu.ldu: W must be fp64, fp32, fp16 or bf16, got ", py_dtype(W.scalar_type()),
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
  [[noreturn]] void fail_tiny(double amax, double floor, const char* dtype) const {
    TORCH_CHECK_VALUE(false, "loldu.ldu: the leading columns W[:, :r] are too small to factorize in ", dtype,
                      ": max |W[:, :r]| = ", amax, " is below ", floor,
                      " (the smallest normal number / machine epsilon; pivots would be subnormal) for ",
                      where(), ". Rescale the weight or lower the rank");
  }
  [[noreturn]] void fail_scale(int64_t step, double piv, double scale, double tol) const {
    TORCH_CHECK_VALUE(false, "loldu.ldu: negligible pivot ", piv, " at step ", step, " of ", rank,
                      " against the weight's scale ", scale,
                      " (max |W| over the leading r columns and the pivot rows; tolerance ", tol, ") for ",
                      where(), ": the leading columns are (nearly) rank-deficient or scaled far below the "
                      "rest of the weight, so the factors would be absurdly large; lower the rank");
  }
  [[noreturn]] void fail_growth(const char* factor, double value, double limit) const {
    TORCH_CHECK_VALUE(false, "loldu.ldu: the factor ", factor, " grows to max |", factor, "| = ", value,
                      " (limit ", limit, " = 1 / machine epsilon) for ", where(),
                      ": the leading block is too ill-conditioned to train; lower the rank",
                      " or use pivoting='partial'");
  }
};

// Whole-weight checks around the factorization, shared by every device (ATen reductions):
// check_panel_scale before it (a panel in the subnormal range cannot be factorized accurately),
// check_factors after it (pivots judged against the scale of W[:, :r] and of the pivot rows, which
// span every column, and the factors' growth bounded), so no non-finite or absurdly scaled factor
// is ever returned.
// The maxima check_factors reads, (B,) each in the working dtype: max |W3[b, :, :r]| (panel),
// max |W3[b, I, r:]| over the pivot rows' tails (tails), max |U[b]|, max |PL[b]| (NaN where a
// factor holds a NaN or an Inf). A kernel that measured them while the data were in cache hands
// them over; the undefined ones are computed with ATen.
// A kernel that returns packed factors (lu_packed) hands over, in `factors`, how to unpack them, which
// check_factors does only to word an error.
struct FactorMaxima {
  at::Tensor panel, tails, U, PL;
  std::function<LduResult()> factors = {};
};
// check_panel_scale also reads max |W3[b, :, :r]|: a caller that has it (B,) passes it.
void check_panel_scale(const at::Tensor& W3, int64_t r, const std::string& shape,
                       const at::Tensor& panel_max = at::Tensor());
void check_factors(const at::Tensor& W3, const LduResult& out, int64_t r, const std::string& shape,
                   const FactorMaxima& maxima = {});

LduResult ldu_dispatch(const at::Tensor& W, int64_t rank, PivotMode mode, const at::Tensor& forced);

// The full-rank factorization packed as LAPACK's getrf leaves it (docs/method.md): LU (..., d, k) with L
// strictly below the diagonal and U = diag(D) Ũ on and above it, perm (..., d) with W[perm] = L U, D (..., m);
// in the working dtype; pivots as ldu(W, min(d, k)) on the CPU; refused on ldu's grounds.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lu_packed(const at::Tensor& W);

// The full-rank layer on the packed LU (lu_linear.cpp): (y, u = x U^T) and (grad_x, grad_c), an empty
// tensor standing for a gradient not asked for.
std::tuple<at::Tensor, at::Tensor> lu_linear_forward(const at::Tensor& x, const at::Tensor& LU, const at::Tensor& perm,
                                                     const at::Tensor& D, const at::Tensor& c,
                                                     const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor> lu_linear_backward(const at::Tensor& grad_y, const at::Tensor& u,
                                                      const at::Tensor& LU, const at::Tensor& perm,
                                                      const at::Tensor& D, const at::Tensor& c, bool need_grad_x,
                                                      bool need_grad_c);

// grad_c[j] = sum_i t[i, j] h[i, j] over (n, r) t and h, accumulated in fp32 (fp64 for fp64): one pass.
at::Tensor column_dot(const at::Tensor& t, const at::Tensor& h);

// Implemented in cuda/ops_cuda.cpp when built with CUDA, else in ops.cpp as a stub that throws.
LduResult ldu_cuda(const at::Tensor& W3, int64_t r, PivotMode mode, const at::Tensor& forced3,
                   const std::string& shape);

// o (n, w) = X (n, w) op(T) for a (w, w) diagonal block T of a packed LU by one cuBLAS trmm; kind 0:
// X T^T (T upper), 1: X T^T (T unit lower), 2: X T (T unit lower), 3: X T (T upper). Returns false,
// computing nothing, where it does not apply (not fp32/fp64, rows not unit-stride, a build without
// cuBLAS headers, or a CPU-only build: the stub in ops.cpp); the caller then runs ATen's GEMMs.
bool lu_trmm_cuda(const at::Tensor& o, const at::Tensor& X, const at::Tensor& T, int kind);

}  // namespace loldu
