// Truncated, blocked LDU factorization on the CPU (docs/method.md §2, §6).
//
// Only W[:, :r] (the panel) and the r pivot rows of W are read. The panel is copied into a
// column-major (d, r) buffer in the working dtype and factored by a right-looking blocked LU with
// partial pivoting: inside a block of kBlock columns, contiguous per-column passes (pivot search,
// scaling, rank-1 updates); across blocks the trailing update is one GEMM (ATen/BLAS). Then the r pivot rows are solved once against L11.
// Cost O((d + k) r^2); no (d, d) permutation and no (d, k) temporary.
#include "loldu/loldu.h"
#include "ldu_common.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

namespace loldu {
namespace {

// Columns per block: for r <= kBlock the whole panel is factored without any GEMM call; above
// it each block's trailing update is one BLAS GEMM.
constexpr int64_t kBlock = 64;

// Hot loops, cloned for AVX-512 / AVX2 / baseline and picked at load time (the extension is
// built without -march flags so that one build runs on any x86-64).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LOLDU_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LOLDU_MULTIVERSION
#endif

// y -= a * x
LOLDU_MULTIVERSION void axpy_neg(float* __restrict y, const float* __restrict x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] -= a * x[i];
}
LOLDU_MULTIVERSION void axpy_neg(double* __restrict y, const double* __restrict x, double a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] -= a * x[i];
}
// y = a * x
LOLDU_MULTIVERSION void scale_to(float* __restrict y, const float* __restrict x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = a * x[i];
}
LOLDU_MULTIVERSION void scale_to(double* __restrict y, const double* __restrict x, double a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = a * x[i];
}

// (One overload per type rather than a template: GCC's target_clones does not apply to templates.)
// The bit pattern of max |x_i|: its float is max |x_i|, and it is >= the pattern of +Inf exactly
// when x holds a NaN or an Inf. Integer max reductions vectorize without fast-math flags.
LOLDU_MULTIVERSION uint32_t max_abs_bits(const float* x, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, x + i, sizeof b);
    b &= 0x7fffffffu;
    m = b > m ? b : m;
  }
  return m;
}
LOLDU_MULTIVERSION uint64_t max_abs_bits(const double* x, int64_t n) {
  uint64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint64_t b;
    std::memcpy(&b, x + i, sizeof b);
    b &= 0x7fffffffffffffffull;
    m = b > m ? b : m;
  }
  return m;
}

// max |x_i| over a contiguous buffer, or NaN when any x_i is NaN or Inf.
template <typename acc_t>
acc_t max_abs_or_nan(const acc_t* x, int64_t n) {
  const auto bits = max_abs_bits(x, n);
  acc_t m;
  std::memcpy(&m, &bits, sizeof m);
  return std::isfinite(m) ? m : std::numeric_limits<acc_t>::quiet_NaN();
}

// The (d, r) panel, column-major, so that the pivot search, the scaling of the multipliers and
// every rank-1 update are contiguous, vectorizable passes over one column.
template <typename acc_t>
struct Panel {
  int64_t d, r;
  std::vector<acc_t> a;        // column j at a[j * d]
  std::vector<int64_t> perm;   // perm[i]: original row of W now at panel row i
  std::vector<int64_t> pos;    // inverse of perm (used when the pivots are prescribed)
  acc_t* col(int64_t j) { return a.data() + j * d; }
  acc_t& at(int64_t i, int64_t j) { return a[j * d + i]; }
};

// Swaps panel rows i and j within columns [c0, c1) (the rest of the row follows in apply_swaps).
template <typename acc_t>
void swap_rows(Panel<acc_t>& P, int64_t i, int64_t j, int64_t c0, int64_t c1) {
  if (i == j) return;
  for (int64_t c = c0; c < c1; ++c) std::swap(P.at(i, c), P.at(j, c));
  std::swap(P.perm[i], P.perm[j]);
  P.pos[P.perm[i]] = i;
  P.pos[P.perm[j]] = j;
}

// Applies a block's row swaps (j0 + s <-> swaps[s]) to the columns outside [j0, j1), one column
// at a time so that every swap stays inside one contiguous column (LAPACK's laswp, column-major).
template <typename acc_t>
void apply_swaps(Panel<acc_t>& P, int64_t j0, int64_t j1, const std::vector<int64_t>& swaps) {
  auto one = [&](int64_t c) {
    acc_t* col = P.col(c);
    for (size_t s = 0; s < swaps.size(); ++s) std::swap(col[j0 + static_cast<int64_t>(s)], col[swaps[s]]);
  };
  for (int64_t c = 0; c < j0; ++c) one(c);
  for (int64_t c = j1; c < P.r; ++c) one(c);
}

// Calls f(i, j) for i < rows, j < cols in 32 x 32 tiles: reading the column-major panel while
// writing row-major outputs then stays within a few cache lines at a time.
template <typename F>
void for_tiles(int64_t rows, int64_t cols, F&& f) {
  constexpr int64_t T = 32;
  for (int64_t i0 = 0; i0 < rows; i0 += T)
    for (int64_t j0 = 0; j0 < cols; j0 += T)
      for (int64_t i = i0; i < std::min(rows, i0 + T); ++i)
        for (int64_t j = j0; j < std::min(cols, j0 + T); ++j) f(i, j);
}

// First index of the largest magnitude in x[i0, n) (ties to the smaller index, as LAPACK).
// The panel is finite here, so comparing magnitude bit patterns compares magnitudes.
template <typename acc_t>
int64_t argmax_abs(const acc_t* x, int64_t i0, int64_t n) {
  const auto best = max_abs_bits(x + i0, n - i0);
  for (int64_t i = i0; i < n; ++i) {
    decltype(max_abs_bits(x, 0)) b;
    std::memcpy(&b, x + i, sizeof b);
    if ((b << 1) == (best << 1)) return i;
  }
  return i0;
}

// Factor columns [j0, j1) of the panel, rows j0..d, with the rank-1 updates restricted to
// columns < j1 (the rest is left to the blocked trailing update).
template <typename acc_t>
void factor_block(Panel<acc_t>& P, int64_t j0, int64_t j1, PivotMode mode, const int64_t* forced,
                  acc_t tol, const LduContext& ctx) {
  const int64_t d = P.d;
  std::vector<int64_t> swaps;
  swaps.reserve(j1 - j0);
  for (int64_t j = j0; j < j1; ++j) {
    int64_t p = j;
    if (mode == PivotMode::Partial) p = argmax_abs(P.col(j), j, d);
    else if (mode == PivotMode::Given) p = P.pos[forced[j]];
    swap_rows(P, j, p, j0, j1);
    swaps.push_back(p);
    acc_t* __restrict cj = P.col(j);
    const acc_t piv = cj[j];
    if (!(std::abs(piv) > tol)) ctx.fail_pivot(j, static_cast<double>(piv), static_cast<double>(tol));
    const acc_t inv = acc_t(1) / piv;
    for (int64_t i = j + 1; i < d; ++i) cj[i] *= inv;
    for (int64_t c = j + 1; c < j1; ++c) {
      acc_t* cc = P.col(c);
      axpy_neg(cc + j + 1, cj + j + 1, cc[j], d - j - 1);
    }
  }
  apply_swaps(P, j0, j1, swaps);
}

template <typename acc_t>
void factor_one(const at::Tensor& W, int64_t r, PivotMode mode, const int64_t* forced, acc_t* PL,
                acc_t* D, acc_t* U, int64_t* pivots, const LduContext& ctx) {
  const int64_t d = W.size(0), k = W.size(1);
  Panel<acc_t> P{d, r, std::vector<acc_t>(d * r), std::vector<int64_t>(d), std::vector<int64_t>(d)};
  std::iota(P.perm.begin(), P.perm.end(), 0);
  std::iota(P.pos.begin(), P.pos.end(), 0);

  // Gather the panel W[:, :r] (tiled: W is row-major, the panel column-major).
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "loldu_ldu_gather", [&] {
    const scalar_t* w = W.const_data_ptr<scalar_t>();
    const int64_t s0 = W.stride(0), s1 = W.stride(1);
    for_tiles(d, r, [&](int64_t i, int64_t j) { P.a[j * d + i] = static_cast<acc_t>(w[i * s0 + j * s1]); });
  });
  at::Tensor panel = at::from_blob(P.a.data(), {d, r}, {1, d}, at::TensorOptions().dtype(acc_type));
  // max |panel| sets the pivot tolerance; it is NaN/Inf exactly when the panel holds one.
  const acc_t amax = max_abs_or_nan(P.a.data(), d * r);
  if (!std::isfinite(amax)) {
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < r; ++j)
        if (!std::isfinite(P.at(i, j))) ctx.fail_nonfinite("panel W[:, :r]", i, j);
  }
  const acc_t tol = static_cast<acc_t>(d) * std::numeric_limits<acc_t>::epsilon() * amax;

  // Right-looking blocked LU over the r panel columns.
  for (int64_t j0 = 0; j0 < r; j0 += kBlock) {
    const int64_t j1 = std::min(r, j0 + kBlock);
    factor_block(P, j0, j1, mode, forced, tol, ctx);
    if (j1 < r) {
      // U12 = L11^{-1} A12 for this block's rows (one TRSM), then A22 -= L21 U12 (one GEMM).
      auto A12 = panel.narrow(0, j0, j1 - j0).narrow(1, j1, r - j1);
      auto L11 = panel.narrow(0, j0, j1 - j0).narrow(1, j0, j1 - j0);
      A12.copy_(at::linalg_solve_triangular(L11, A12, /*upper=*/false, /*left=*/true, /*unitriangular=*/true));
      if (j1 < d) {
        auto A22 = panel.narrow(0, j1, d - j1).narrow(1, j1, r - j1);
        A22.addmm_(panel.narrow(0, j1, d - j1).narrow(1, j0, j1 - j0),
                   panel.narrow(0, j0, j1 - j0).narrow(1, j1, r - j1), /*beta=*/1, /*alpha=*/-1);
      }
    }
  }

  // Outputs from the panel: D, the pivots, PL in the original row order.
  for (int64_t i = 0; i < r; ++i) {
    D[i] = P.at(i, i);
    pivots[i] = P.perm[i];
  }
  for_tiles(d, r, [&](int64_t i, int64_t j) {
    PL[P.perm[i] * r + j] = j < i ? P.at(i, j) : (j == i ? acc_t(1) : acc_t(0));
  });

  // Pivot rows: U[:, r:] = D^{-1} L11^{-1} W[I, r:]; the U11 part is already in the panel.
  const int64_t kr = k - r;
  if (kr > 0) {
    at::Tensor B = at::empty({r, kr}, at::TensorOptions().dtype(acc_type));
    acc_t* b = B.data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "loldu_ldu_rows", [&] {
      const scalar_t* w = W.const_data_ptr<scalar_t>();
      const int64_t s0 = W.stride(0), s1 = W.stride(1);
      for (int64_t i = 0; i < r; ++i) {
        const scalar_t* src = w + P.perm[i] * s0 + r * s1;
        acc_t* __restrict dst = b + i * kr;
        for (int64_t c = 0; c < kr; ++c) dst[c] = static_cast<acc_t>(src[c * s1]);
      }
    });
    if (std::isnan(max_abs_or_nan(b, r * kr))) {
      for (int64_t i = 0; i < r; ++i)
        for (int64_t c = 0; c < kr; ++c)
          if (!std::isfinite(b[i * kr + c])) ctx.fail_nonfinite("pivot row", P.perm[i], r + c);
    }
    if (r <= kBlock) {
      for (int64_t i = 1; i < r; ++i) {
        for (int64_t p = 0; p < i; ++p) axpy_neg(b + i * kr, b + p * kr, P.at(i, p), kr);
      }
    } else {
      auto L11 = panel.narrow(0, 0, r);
      B = at::linalg_solve_triangular(L11, B, /*upper=*/false, /*left=*/true, /*unitriangular=*/true).contiguous();
      b = B.data_ptr<acc_t>();
    }
    for (int64_t i = 0; i < r; ++i) {
      scale_to(U + i * k + r, b + i * kr, acc_t(1) / D[i], kr);
    }
  }
  for_tiles(r, r, [&](int64_t i, int64_t c) {
    U[i * k + c] = c < i ? acc_t(0) : (c == i ? acc_t(1) : P.at(i, c) / D[i]);
  });
}

LduResult ldu_cpu(const at::Tensor& W3, int64_t r, PivotMode mode, const at::Tensor& forced3,
                  const std::string& shape) {
  const int64_t B = W3.size(0), d = W3.size(1), k = W3.size(2);
  const auto acc = working_dtype(W3.scalar_type());
  auto opts = W3.options().dtype(acc);
  LduResult out{at::empty({B, d, r}, opts), at::empty({B, r}, opts), at::empty({B, r, k}, opts),
                at::empty({B, r}, opts.dtype(at::kLong))};
  AT_DISPATCH_FLOATING_TYPES(acc, "loldu_ldu_cpu", [&] {
    // One matrix per task: batches of same-shape layers spread over the cores.
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        LduContext ctx{shape, r, B > 1 ? b : -1};
        const int64_t* forced = forced3.defined() ? forced3[b].const_data_ptr<int64_t>() : nullptr;
        factor_one<scalar_t>(W3[b], r, mode, forced, out.PL[b].data_ptr<scalar_t>(),
                             out.D[b].data_ptr<scalar_t>(), out.U[b].data_ptr<scalar_t>(),
                             out.pivots[b].data_ptr<int64_t>(), ctx);
      }
    });
  });
  return out;
}

}  // namespace

void check_panel_scale(const at::Tensor& W3, int64_t r, const std::string& shape) {
  const auto acc = working_dtype(W3.scalar_type());
  const double eps = acc == at::kDouble ? std::numeric_limits<double>::epsilon()
                                        : std::numeric_limits<float>::epsilon();
  const double tiny = acc == at::kDouble ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
  const double floor = tiny / eps;
  // NaN compares false here: a NaN panel is left to the kernels, which report where it is; so is
  // an all-zero panel (a plain zero pivot).
  at::Tensor amax = W3.narrow(2, 0, r).abs().amax({1, 2}).to(at::kDouble).cpu();
  const double* a = amax.const_data_ptr<double>();
  for (int64_t b = 0; b < amax.size(0); ++b) {
    if (a[b] > 0 && a[b] < floor) {
      LduContext{shape, r, W3.size(0) > 1 ? b : -1}.fail_tiny(a[b], floor, acc == at::kDouble ? "float64" : "float32");
    }
  }
}

void check_factors(const at::Tensor& W3, const LduResult& out, int64_t r, const std::string& shape) {
  const int64_t B = W3.size(0), d = W3.size(1), k = W3.size(2);
  const auto acc = out.D.scalar_type();
  const double eps = acc == at::kDouble ? std::numeric_limits<double>::epsilon()
                                        : std::numeric_limits<float>::epsilon();
  const double limit = 1.0 / eps;
  auto idx = out.pivots.unsqueeze(2).expand({B, r, k});
  auto rows = at::gather(W3, 1, idx);
  auto scale = at::maximum(W3.narrow(2, 0, r).abs().amax({1, 2}), rows.abs().amax({1, 2})).to(acc);
  auto tol = scale * static_cast<double>(d) * eps;
  auto pivot_ok = (out.D.abs() > tol.unsqueeze(1)).all(1);
  auto u_max = out.U.abs().amax({1, 2}), pl_max = out.PL.abs().amax({1, 2});
  auto growth_ok = at::logical_and(u_max <= limit, pl_max <= limit);  // false for NaN too
  if (at::logical_and(pivot_ok, growth_ok).all().item<bool>()) return;
  auto D = out.D.to(at::kDouble).cpu(), sc = scale.to(at::kDouble).cpu(), tl = tol.to(at::kDouble).cpu();
  auto um = u_max.to(at::kDouble).cpu(), pm = pl_max.to(at::kDouble).cpu();
  for (int64_t b = 0; b < B; ++b) {
    LduContext ctx{shape, r, B > 1 ? b : -1};
    for (int64_t j = 0; j < r; ++j) {
      const double piv = D[b][j].item<double>(), t = tl[b].item<double>();
      if (!(std::abs(piv) > t)) ctx.fail_scale(j, piv, sc[b].item<double>(), t);
    }
    if (!(um[b].item<double>() <= limit)) ctx.fail_growth("U", um[b].item<double>(), limit);
    if (!(pm[b].item<double>() <= limit)) ctx.fail_growth("PL", pm[b].item<double>(), limit);
  }
  TORCH_CHECK(false, "loldu.ldu: factor check failed for W of shape ", shape);  // not reached
}

LduResult ldu_dispatch(const at::Tensor& W, int64_t rank, PivotMode mode, const at::Tensor& forced) {
  const std::string shape = check_ldu_args(W, rank);
  const bool batched = W.dim() == 3;
  at::Tensor W3 = batched ? W : W.unsqueeze(0);
  at::Tensor F3;
  if (forced.defined()) F3 = (batched ? forced : forced.unsqueeze(0)).contiguous();
  check_panel_scale(W3, rank, shape);
  LduResult out;
  if (W.is_cuda()) {
    out = ldu_cuda(W3, rank, mode, F3, shape);
  } else {
    TORCH_CHECK(W.is_cpu(), "loldu.ldu: unsupported device ", W.device(), " for W of shape ", shape);
    out = ldu_cpu(W3, rank, mode, F3, shape);
  }
  check_factors(W3, out, rank, shape);
  if (!batched) out = LduResult{out.PL[0], out.D[0], out.U[0], out.pivots[0]};
  return out;
}

LduResult ldu(const at::Tensor& W, int64_t rank, const std::string& pivoting) {
  return ldu_dispatch(W, rank, parse_pivoting(pivoting), at::Tensor());
}

LduResult ldu_from_pivots(const at::Tensor& W, const at::Tensor& pivots) {
  TORCH_CHECK(pivots.scalar_type() == at::kLong && pivots.dim() == W.dim() - 1 && pivots.dim() >= 1,
              "loldu.ldu_from_pivots: pivots must be int64 of shape (..., r) for W of shape ",
              W.sizes(), ", got ", pivots.scalar_type(), " ", pivots.sizes());
  const int64_t r = pivots.size(-1);
  check_ldu_args(W, r);
  TORCH_CHECK(W.dim() == 2 || pivots.size(0) == W.size(0), "loldu.ldu_from_pivots: batch of pivots ",
              pivots.sizes(), " does not match W ", W.sizes());
  at::Tensor p = pivots.to(W.device());
  const int64_t d = W.size(-2);
  TORCH_CHECK(p.numel() == 0 || (p.min().item<int64_t>() >= 0 && p.max().item<int64_t>() < d),
              "loldu.ldu_from_pivots: pivot index out of range [0, ", d, ") for W of shape ", W.sizes());
  auto sorted = std::get<0>(p.sort(-1));
  TORCH_CHECK(r < 2 || (sorted.narrow(-1, 1, r - 1) != sorted.narrow(-1, 0, r - 1)).all().item<bool>(),
              "loldu.ldu_from_pivots: repeated pivot index for W of shape ", W.sizes());
  return ldu_dispatch(W, r, PivotMode::Given, p.cpu());
}

}  // namespace loldu
