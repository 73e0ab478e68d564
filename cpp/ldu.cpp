// Truncated LDU factorization on the CPU (docs/method.md §2, §6).
//
// Only W[:, :r] (the panel) and the r pivot rows of W are read. The panel is copied into a
// column-major (d, r) buffer in the working dtype and factored with partial pivoting: below
// kLapackMinRank columns by a right-looking blocked LU (inside a block of kBlock columns,
// contiguous per-column passes: pivot search, scaling, rank-1 updates; across blocks the trailing
// update is one GEMM through ATen/BLAS), from it on by LAPACK's getrf through ATen (the blocked
// LU still imposes a prescribed pivot order that getrf would not pick). Then the r pivot rows are
// solved once against L11. Cost O((d + k) r^2); no (d, d) permutation and no (d, k) temporary.
#include "loldu/loldu.h"
#include "ldu_common.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

namespace loldu {
namespace {

// Columns per block: for r <= kBlock the whole panel is factored without any GEMM call; above
// it each block's trailing update is one BLAS GEMM.
constexpr int64_t kBlock = 64;

// From this rank on the panel is factored by LAPACK's getrf (factor_lapack), below it by the
// blocked kernel. Measured on a 2-core AMD EPYC (fp32, 384..3072 rows, 1 and 2 threads): at
// r < 64 the single-block kernel (no BLAS call) was up to ~5% faster, from r = 64 on getrf was as
// fast or up to ~10% faster at every shape, and at full rank (r = min(d, k)) only getrf reaches
// LAPACK's own speed (the blocked kernel was 1.6-2x slower at 768 x 768).
constexpr int64_t kLapackMinRank = 64;

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

// The bit pattern of max |x_i|: its float is max |x_i|, and it is >= the pattern of +Inf exactly
// when x holds a NaN or an Inf. Integer max reductions vectorize without fast-math flags. The loop
// is a template inlined into one overload per type, because GCC's target_clones does not apply to
// templates: each clone compiles the inlined loop for its own instruction set.
template <typename bits_t, typename real_t>
__attribute__((always_inline)) inline bits_t max_abs_bits_loop(const real_t* x, int64_t n) {
  static_assert(sizeof(bits_t) == sizeof(real_t), "bit pattern and value must have the same size");
  const bits_t magnitude = ~(bits_t(1) << (8 * sizeof(bits_t) - 1));
  bits_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    bits_t b;
    std::memcpy(&b, x + i, sizeof b);
    b &= magnitude;
    m = b > m ? b : m;
  }
  return m;
}
LOLDU_MULTIVERSION uint32_t max_abs_bits(const float* x, int64_t n) { return max_abs_bits_loop<uint32_t>(x, n); }
LOLDU_MULTIVERSION uint64_t max_abs_bits(const double* x, int64_t n) { return max_abs_bits_loop<uint64_t>(x, n); }

// max |x_i| over a contiguous buffer, or NaN when any x_i is NaN or Inf.
template <typename acc_t>
acc_t max_abs_or_nan(const acc_t* x, int64_t n) {
  const auto bits = max_abs_bits(x, n);
  acc_t m;
  std::memcpy(&m, &bits, sizeof m);
  return std::isfinite(m) ? m : std::numeric_limits<acc_t>::quiet_NaN();
}

// Panels of up to this many bytes are factored in a buffer each thread keeps between calls: a fresh
// allocation of a few MB is page-faulted in anew on every call (the allocator hands such blocks back to
// the system when they are freed), which cost ~15% of a full-rank 768 x 768 factorization (2-core AMD
// EPYC, 1 thread: ~850 page faults per call). Larger panels are allocated per call.
constexpr int64_t kKeptWorkspaceBytes = int64_t{16} << 20;

// A buffer of n elements of dtype t, 64-byte aligned (ATen's allocator), so that LAPACK takes the same
// code path every time it factors the same panel.
at::Tensor panel_workspace(int64_t n, at::ScalarType t) {
  const auto opts = at::TensorOptions().dtype(t);
  const int64_t bytes = n * static_cast<int64_t>(c10::elementSize(t));
  if (bytes > kKeptWorkspaceBytes) return at::empty({n}, opts);
  thread_local at::Tensor kept;
  if (!kept.defined() || kept.nbytes() < static_cast<size_t>(bytes)) {
    kept = at::Tensor();  // the smaller one goes first
    kept = at::empty({bytes}, opts.dtype(at::kByte));
  }
  // One call at a time per thread: the previous panel of this thread is dead when the next starts.
  return at::from_blob(kept.data_ptr(), {n}, opts);
}

// The (d, r) panel, column-major, so that the pivot search, the scaling of the multipliers and
// every rank-1 update are contiguous, vectorizable passes over one column.
// The buffer comes from ATen's allocator (64-byte aligned), so that LAPACK sees the same alignment,
// and takes the same code path, every time it factors the same panel.
template <typename acc_t>
struct Panel {
  int64_t d, r;
  at::Tensor buf;              // (d, r) with strides (1, d)
  acc_t* a;                    // buf's data: column j at a[j * d]
  std::vector<int64_t> perm;   // perm[i]: original row of W now at panel row i
  std::vector<int64_t> pos;    // inverse of perm (used when the pivots are prescribed)
  Panel(int64_t d_, int64_t r_)
      : d(d_), r(r_),
        buf(panel_workspace(d_ * r_, c10::CppTypeToScalarType<acc_t>::value).as_strided({d_, r_}, {1, d_})),
        a(buf.data_ptr<acc_t>()), perm(d_), pos(d_) {
    reset_order();
  }
  void reset_order() {
    std::iota(perm.begin(), perm.end(), 0);
    std::iota(pos.begin(), pos.end(), 0);
  }
  acc_t* col(int64_t j) { return a + j * d; }
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

// Square tiles of kTile x kTile elements, each copied through a local buffer, move data between
// the column-major panel and row-major matrices: every tile is read as kTile runs of kTile
// consecutive elements and written as kTile such runs, whichever side is strided. (Element-wise
// loops are 2-5x slower here, the more so when the stride is a multiple of 4 KiB.)
constexpr int64_t kTile = 16;

// Calls f(i0, j0, ni, nj) for the tiles [i0, i0 + ni) x [j0, j0 + nj) of a (rows, cols) block;
// full tiles get ni, nj as compile-time constants (so that the copies unroll). Tile rows run in
// parallel unless the caller already is in a parallel region (a batch runs one matrix per task).
template <typename F>
void for_tiles(int64_t rows, int64_t cols, F&& f) {
  using Full = std::integral_constant<int64_t, kTile>;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, cols * kTile));
  at::parallel_for(0, (rows + kTile - 1) / kTile, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t i0 = b0 * kTile; i0 < std::min(rows, b1 * kTile); i0 += kTile) {
      const int64_t ni = std::min(kTile, rows - i0);
      for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
        const int64_t nj = std::min(kTile, cols - j0);
        if (ni == kTile && nj == kTile) f(i0, j0, Full{}, Full{});
        else f(i0, j0, ni, nj);
      }
    }
  });
}

// Row i of a unit triangle, columns [j0, j1): out[j] = v[j - j0] strictly on the `upper` side of
// the diagonal (j > i if upper, j < i if not), 1 on it, 0 across it.
template <typename acc_t>
void unit_triangle_row(acc_t* __restrict out, const acc_t* __restrict v, int64_t i, int64_t j0, int64_t j1,
                       bool upper) {
  if (upper ? j0 > i : j1 <= i) {  // the whole segment on the stored side
    for (int64_t j = j0; j < j1; ++j) out[j] = v[j - j0];
  } else if (upper ? j1 <= i : j0 > i) {  // ... or across
    for (int64_t j = j0; j < j1; ++j) out[j] = acc_t(0);
  } else {
    for (int64_t j = j0; j < j1; ++j) out[j] = j == i ? acc_t(1) : ((j > i) == upper ? v[j - j0] : acc_t(0));
  }
}

// Writes rows i < rows of the panel's unit lower (upper = false, columns < r) or unit upper triangle
// (upper = true) row-major, row i to row(i).
template <typename acc_t, typename Row>
void write_unit_triangle(const Panel<acc_t>& P, int64_t rows, bool upper, Row&& row) {
  for_tiles(rows, P.r, [&](int64_t i0, int64_t j0, auto ni, auto nj) {
    acc_t t[kTile][kTile];
    for (int64_t jj = 0; jj < nj; ++jj)
      for (int64_t ii = 0; ii < ni; ++ii) t[ii][jj] = P.a[(j0 + jj) * P.d + i0 + ii];
    for (int64_t ii = 0; ii < ni; ++ii) unit_triangle_row(row(i0 + ii), t[ii], i0 + ii, j0, j0 + nj, upper);
  });
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

// check_panel_scale's test for one matrix: amax = max |W[:, :r]| must not lie in (0, tiny / eps) of
// the working dtype acc (docs/method.md §6). NaN compares false: a NaN panel is reported where it
// is by the kernels, an all-zero one as a plain zero pivot.
void check_panel_floor(double amax, at::ScalarType acc, const LduContext& ctx) {
  const bool f64 = acc == at::kDouble;
  const double eps = f64 ? std::numeric_limits<double>::epsilon() : std::numeric_limits<float>::epsilon();
  const double floor = (f64 ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min()) / eps;
  if (amax > 0 && amax < floor) ctx.fail_tiny(amax, floor, f64 ? "float64" : "float32");
}

// Fills the column-major panel with W[:, :r] (in tiles: W is row-major, the panel column-major) and returns max |panel|, after check_panel_scale's test (check_panel_floor).
template <typename acc_t>
acc_t gather_panel(const at::Tensor& W, Panel<acc_t>& P, const LduContext& ctx) {
  const int64_t d = P.d, r = P.r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "loldu_ldu_gather", [&] {
    const scalar_t* w = W.const_data_ptr<scalar_t>();
    const int64_t s0 = W.stride(0), s1 = W.stride(1);
    for_tiles(d, r, [&](int64_t i0, int64_t j0, auto ni, auto nj) {
      acc_t t[kTile][kTile];
      for (int64_t ii = 0; ii < ni; ++ii)
        for (int64_t jj = 0; jj < nj; ++jj) t[jj][ii] = static_cast<acc_t>(w[(i0 + ii) * s0 + (j0 + jj) * s1]);
      for (int64_t jj = 0; jj < nj; ++jj)
        for (int64_t ii = 0; ii < ni; ++ii) P.a[(j0 + jj) * d + i0 + ii] = t[jj][ii];
    });
  });
  // max |panel| sets the pivot tolerance; it is NaN/Inf exactly when the panel holds one.
  const acc_t amax = max_abs_or_nan(P.a, d * r);
  if (!std::isfinite(amax)) {
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < r; ++j)
        if (!std::isfinite(P.at(i, j))) ctx.fail_nonfinite("panel W[:, :r]", i, j);
  }
  check_panel_floor(static_cast<double>(amax), c10::CppTypeToScalarType<acc_t>::value, ctx);
  return amax;
}

// The blocked kernel (mode Partial, None or Given) on a gathered panel.
template <typename acc_t>
void factor_blocked(Panel<acc_t>& P, PivotMode mode, const int64_t* forced, acc_t tol, const LduContext& ctx) {
  const int64_t d = P.d, r = P.r;
  const at::Tensor& panel = P.buf;
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
}

// The panel factored in place by LAPACK's getrf through ATen (at::linalg_lu_factor_ex): partial
// pivoting with LAPACK's tie-breaking, the pivots torch.linalg.lu chooses. getrf does not stop at
// a tiny pivot: the first step j with |U_jj| <= tol is reported as the blocked kernel would
// (columns 0..j of an LU depend only on columns 0..j of the panel, so the steps before j are
// unaffected), and a panel that overflowed anyway is refused, so no NaN or Inf leaves.
// Mode None or Given: the same call on the same panel, accepted when the pivots getrf chose are
// the prescribed ones (no swap; or the given pivots). Pivots that ldu() returned are, so
// ldu_from_pivots(W, ldu(W, r).pivots) repeats ldu's very computation (same panel, same aligned
// buffer, same batch and so the same threading) and gives its factors bit for bit. Otherwise it
// returns false and the caller runs the blocked kernel, which imposes any order.
template <typename acc_t>
bool factor_lapack(Panel<acc_t>& P, PivotMode mode, const int64_t* forced, acc_t tol, const LduContext& ctx) {
  const int64_t r = P.r;
  at::Tensor ipiv = at::empty({r}, at::kInt), info = at::empty({}, at::kInt);
  at::linalg_lu_factor_ex_out(P.buf, ipiv, info, P.buf, /*pivot=*/true, /*check_errors=*/false);
  const int* ip = ipiv.const_data_ptr<int>();  // 1-based: row j swapped with row ip[j] - 1, in turn
  for (int64_t j = 0; j < r; ++j) std::swap(P.perm[j], P.perm[ip[j] - 1]);
  if (mode != PivotMode::Partial) {
    for (int64_t j = 0; j < r; ++j)
      if (P.perm[j] != (mode == PivotMode::Given ? forced[j] : j)) return false;
  }
  const double limit = 1.0 / std::numeric_limits<acc_t>::epsilon();
  for (int64_t j = 0; j < r; ++j) {
    const acc_t piv = P.at(j, j);
    if (!std::isfinite(piv)) ctx.fail_growth("U", std::numeric_limits<double>::infinity(), limit);
    if (!(std::abs(piv) > tol)) ctx.fail_pivot(j, static_cast<double>(piv), static_cast<double>(tol));
  }
  return true;  // a panel that overflowed anyway is refused as it is written out (check_lapack_panel)
}

// The factored panel of one matrix (partial pivoting by getrf from kLapackMinRank columns on, else
// the blocked kernel); maxima[0] = max |W[:, :r]|. Returns whether getrf factored it.
template <typename acc_t>
bool factor_panel(const at::Tensor& W, Panel<acc_t>& P, PivotMode mode, const int64_t* forced, acc_t* maxima,
                  const LduContext& ctx) {
  maxima[0] = gather_panel(W, P, ctx);
  const acc_t tol = static_cast<acc_t>(P.d) * std::numeric_limits<acc_t>::epsilon() * maxima[0];
  if (P.r >= kLapackMinRank && factor_lapack(P, mode, forced, tol, ctx)) return true;
  if (P.r >= kLapackMinRank) {  // getrf refused the prescribed order: start again from W
    P.reset_order();
    gather_panel(W, P, ctx);
  }
  factor_blocked(P, mode, forced, tol, ctx);
  return false;
}

// B (r, k - r) = L11^{-1} W[I, r:], the pivot rows' tails solved against the panel's unit lower
// triangle; maxima[1] = max |W[I, r:]| (0 when r = k). Undefined when r = k.
template <typename acc_t>
at::Tensor solve_pivot_rows(const at::Tensor& W, Panel<acc_t>& P, acc_t* maxima, const LduContext& ctx) {
  const int64_t r = P.r, kr = W.size(1) - r;
  maxima[1] = 0;
  if (kr <= 0) return at::Tensor();
  at::Tensor B = at::empty({r, kr}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
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
  maxima[1] = max_abs_or_nan(b, r * kr);
  if (std::isnan(maxima[1])) {
    for (int64_t i = 0; i < r; ++i)
      for (int64_t c = 0; c < kr; ++c)
        if (!std::isfinite(b[i * kr + c])) ctx.fail_nonfinite("pivot row", P.perm[i], r + c);
  }
  if (r <= kBlock) {
    for (int64_t i = 1; i < r; ++i) {
      for (int64_t p = 0; p < i; ++p) axpy_neg(b + i * kr, b + p * kr, P.at(i, p), kr);
    }
  } else {
    // In place: a row-major B is a transposed column-major one, which ATen solves without a copy.
    auto L11 = P.buf.narrow(0, 0, r);
    at::linalg_solve_triangular_out(B, L11, B, /*upper=*/false, /*left=*/true, /*unitriangular=*/true);
  }
  return B;
}

// Running max of |v| as a bit pattern (see max_abs_bits: NaN and Inf order above every finite value).
template <typename bits_t, typename acc_t>
inline void max_bits(bits_t& m, acc_t v) {
  bits_t b;
  std::memcpy(&b, &v, sizeof b);
  b &= ~(bits_t(1) << (8 * sizeof(bits_t) - 1));
  m = b > m ? b : m;
}

template <typename acc_t, typename bits_t>
acc_t bits_value(bits_t m) {
  acc_t v;
  std::memcpy(&v, &m, sizeof v);
  return std::isfinite(v) ? v : std::numeric_limits<acc_t>::quiet_NaN();
}

// The panel written out in one tiled pass: each (kTile x kTile) tile is read once from the column-major
// panel and its entries go where they belong, with max |L| (strictly lower part) and max |U_ij / D_i|
// (strictly upper part) measured on the way. Either (ldu) PL rows at perm[i] (unit lower) and U rows
// (unit upper, the panel's entries divided by D), or (packed) the panel's rows as they are into LU
// (row stride k). Returns {max |PL|, max |U|} over the panel's part (>= 1: the unit diagonal).
template <typename acc_t>
std::pair<acc_t, acc_t> write_panel(const Panel<acc_t>& P, const acc_t* D, acc_t* PL, acc_t* U, int64_t k,
                                    bool packed) {
  using bits_t = decltype(max_abs_bits(P.a, 0));
  const int64_t d = P.d, r = P.r;
  // One slot per tile row: every tile row is written by one task.
  std::vector<bits_t> lower((d + kTile - 1) / kTile, 0), upper((d + kTile - 1) / kTile, 0);
  for_tiles(d, r, [&](int64_t i0, int64_t j0, auto ni, auto nj) {
    acc_t t[kTile][kTile];
    for (int64_t jj = 0; jj < nj; ++jj)
      for (int64_t ii = 0; ii < ni; ++ii) t[ii][jj] = P.a[(j0 + jj) * P.d + i0 + ii];
    bits_t& lo = lower[i0 / kTile];
    bits_t& up = upper[i0 / kTile];
    for (int64_t ii = 0; ii < ni; ++ii) {
      const int64_t i = i0 + ii;
      acc_t* __restrict v = t[ii];
      acc_t* __restrict pl = packed ? nullptr : PL + P.perm[i] * r + j0;
      acc_t* __restrict u = packed || i < r ? U + i * k + j0 : nullptr;
      // Off the diagonal (most tiles) a segment is all on one side: straight loops of the tile's
      // (compile-time) width.
      if (j0 + nj <= i) {
        for (int64_t jj = 0; jj < nj; ++jj) max_bits(lo, v[jj]);
        if (packed) {
          for (int64_t jj = 0; jj < nj; ++jj) u[jj] = v[jj];
        } else {
          for (int64_t jj = 0; jj < nj; ++jj) pl[jj] = v[jj];
          if (u) for (int64_t jj = 0; jj < nj; ++jj) u[jj] = acc_t(0);
        }
        continue;
      }
      if (j0 > i) {
        const acc_t piv = D[i];
        if (packed) {
          for (int64_t jj = 0; jj < nj; ++jj) u[jj] = v[jj];
          for (int64_t jj = 0; jj < nj; ++jj) max_bits(up, v[jj] / piv);
        } else {
          for (int64_t jj = 0; jj < nj; ++jj) pl[jj] = acc_t(0);
          for (int64_t jj = 0; jj < nj; ++jj) u[jj] = v[jj] / piv;
          for (int64_t jj = 0; jj < nj; ++jj) max_bits(up, u[jj]);
        }
        continue;
      }
      for (int64_t jj = 0; jj < std::min<int64_t>(nj, i - j0); ++jj) max_bits(lo, v[jj]);
      if (packed) {
        for (int64_t jj = 0; jj < nj; ++jj) u[jj] = v[jj];
        for (int64_t jj = std::max<int64_t>(0, i - j0); jj < nj; ++jj) max_bits(up, v[jj] / D[i]);
        continue;
      }
      unit_triangle_row(PL + P.perm[i] * r, v, i, j0, j0 + nj, /*upper=*/false);
      if (i >= r) continue;
      for (int64_t jj = std::max<int64_t>(0, i + 1 - j0); jj < nj; ++jj) {
        v[jj] /= D[i];
        max_bits(up, v[jj]);
      }
      unit_triangle_row(U + i * k, v, i, j0, j0 + nj, /*upper=*/true);
    }
  });
  bits_t lo = 0, up = 0;
  for (size_t s = 0; s < lower.size(); ++s) {
    lo = std::max(lo, lower[s]);
    up = std::max(up, upper[s]);
  }
  return {std::max(acc_t(1), bits_value<acc_t>(lo)), std::max(acc_t(1), bits_value<acc_t>(up))};
}

// max(a, b), NaN when either is NaN.
template <typename acc_t>
acc_t nan_max(acc_t a, acc_t b) {
  return std::isnan(a) || std::isnan(b) ? std::numeric_limits<acc_t>::quiet_NaN() : std::max(a, b);
}

// getrf's panel must be finite (a panel that overflowed is refused, so no NaN or Inf leaves): its
// maxima, measured while writing it out, are NaN otherwise.
template <typename acc_t>
void check_lapack_panel(bool lapack, std::pair<acc_t, acc_t> m, const LduContext& ctx) {
  if (lapack && (std::isnan(m.first) || std::isnan(m.second)))
    ctx.fail_growth("U", std::numeric_limits<double>::infinity(), 1.0 / std::numeric_limits<acc_t>::epsilon());
}

// One matrix: PL, D, U, pivots, and in maxima what check_factors reads, measured here while the
// data are in cache: max |W[:, :r]|, max |W[I, r:]| (0 when r = k), max |U|, max |PL| (NaN where
// a factor holds a NaN or an Inf).
template <typename acc_t>
void factor_one(const at::Tensor& W, int64_t r, PivotMode mode, const int64_t* forced, acc_t* PL,
                acc_t* D, acc_t* U, int64_t* pivots, acc_t* maxima, const LduContext& ctx) {
  const int64_t d = W.size(0), k = W.size(1);
  Panel<acc_t> P(d, r);
  const bool lapack = factor_panel(W, P, mode, forced, maxima, ctx);
  for (int64_t i = 0; i < r; ++i) {
    D[i] = P.at(i, i);
    pivots[i] = P.perm[i];
  }
  // Pivot rows: U[:, r:] = D^{-1} L11^{-1} W[I, r:]; U11 comes from the panel.
  at::Tensor B = solve_pivot_rows(W, P, maxima, ctx);
  acc_t tails = 0;
  for (int64_t i = 0; B.defined() && i < r; ++i) {
    acc_t* row = U + i * k + r;
    scale_to(row, B.const_data_ptr<acc_t>() + i * (k - r), acc_t(1) / D[i], k - r);
    tails = nan_max(tails, max_abs_or_nan(row, k - r));
  }
  const auto m = write_panel(P, D, PL, U, k, /*packed=*/false);
  check_lapack_panel(lapack, m, ctx);
  maxima[2] = nan_max(m.second, tails);
  maxima[3] = m.first;
}

// One matrix at full rank m = min(d, k), packed: LU (d, k) row-major with the panel's rows (L below
// the diagonal, U on and above it) and U's columns from m on (L11^{-1} W[I, m:], not scaled by D),
// perm (d) the whole row order, D (m); maxima as factor_one's, for the factors Ũ = U / D and P L.
template <typename acc_t>
void factor_packed(const at::Tensor& W, acc_t* LU, int64_t* perm, acc_t* D, acc_t* maxima, const LduContext& ctx) {
  const int64_t d = W.size(0), k = W.size(1), m = std::min(d, k);
  Panel<acc_t> P(d, m);
  const bool lapack = factor_panel(W, P, PivotMode::Partial, nullptr, maxima, ctx);
  for (int64_t i = 0; i < m; ++i) D[i] = P.at(i, i);
  std::copy(P.perm.begin(), P.perm.end(), perm);
  at::Tensor B = solve_pivot_rows(W, P, maxima, ctx);
  acc_t tails = 0;
  for (int64_t i = 0; B.defined() && i < m; ++i) {
    const acc_t* b = B.const_data_ptr<acc_t>() + i * (k - m);
    std::copy(b, b + (k - m), LU + i * k + m);
    tails = nan_max(tails, max_abs_or_nan(b, k - m) / std::abs(D[i]));
  }
  const auto mx = write_panel(P, D, static_cast<acc_t*>(nullptr), LU, k, /*packed=*/true);
  check_lapack_panel(lapack, mx, ctx);
  maxima[2] = nan_max(mx.second, tails);
  maxima[3] = mx.first;
}

LduResult ldu_cpu(const at::Tensor& W3, int64_t r, PivotMode mode, const at::Tensor& forced3,
                  const std::string& shape, FactorMaxima& maxima) {
  const int64_t B = W3.size(0), d = W3.size(1), k = W3.size(2);
  const auto acc = working_dtype(W3.scalar_type());
  auto opts = W3.options().dtype(acc);
  LduResult out{at::empty({B, d, r}, opts), at::empty({B, r}, opts), at::empty({B, r, k}, opts),
                at::empty({B, r}, opts.dtype(at::kLong))};
  at::Tensor M = at::empty({B, 4}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "loldu_ldu_cpu", [&] {
    // One matrix per task: batches of same-shape layers spread over the cores.
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        LduContext ctx{shape, r, B > 1 ? b : -1};
        const int64_t* forced = forced3.defined() ? forced3[b].const_data_ptr<int64_t>() : nullptr;
        factor_one<scalar_t>(W3[b], r, mode, forced, out.PL[b].data_ptr<scalar_t>(),
                             out.D[b].data_ptr<scalar_t>(), out.U[b].data_ptr<scalar_t>(),
                             out.pivots[b].data_ptr<int64_t>(), M[b].data_ptr<scalar_t>(), ctx);
      }
    });
  });
  maxima = FactorMaxima{M.select(1, 0), M.select(1, 1), M.select(1, 2), M.select(1, 3)};
  return out;
}

// (LU, perm, D) of every matrix of W3 (B, d, k), with the maxima check_factors reads.
std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_cpu(const at::Tensor& W3, const std::string& shape,
                                                          FactorMaxima& maxima) {
  const int64_t B = W3.size(0), d = W3.size(1), k = W3.size(2), m = std::min(d, k);
  auto opts = W3.options().dtype(working_dtype(W3.scalar_type()));
  at::Tensor LU = at::empty({B, d, k}, opts), perm = at::empty({B, d}, opts.dtype(at::kLong));
  at::Tensor D = at::empty({B, m}, opts), M = at::empty({B, 4}, opts);
  AT_DISPATCH_FLOATING_TYPES(LU.scalar_type(), "loldu_lu_packed_cpu", [&] {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        factor_packed<scalar_t>(W3[b], LU[b].data_ptr<scalar_t>(), perm[b].data_ptr<int64_t>(),
                                D[b].data_ptr<scalar_t>(), M[b].data_ptr<scalar_t>(),
                                LduContext{shape, m, B > 1 ? b : -1});
      }
    });
  });
  maxima = FactorMaxima{M.select(1, 0), M.select(1, 1), M.select(1, 2), M.select(1, 3)};
  return {LU, perm, D};
}

// max |x| over dims, NaN where x holds a NaN. From 64 columns on, max(max x, -min x): two passes
// and no |x| temporary of x's size. Narrower, ATen's strided reductions are slow (a (d, 16) view
// of a wider W reduces ~7x slower than a contiguous copy), and the |x| temporary is small.
at::Tensor abs_max(const at::Tensor& x, at::IntArrayRef dims) {
  if (x.size(-1) < 64) return x.abs().amax(dims);
  return at::maximum(x.amax(dims), x.amin(dims).neg());
}

}  // namespace

void check_panel_scale(const at::Tensor& W3, int64_t r, const std::string& shape, const at::Tensor& panel_max) {
  at::Tensor amax = (panel_max.defined() ? panel_max : abs_max(W3.narrow(2, 0, r), {1, 2})).to(at::kDouble).cpu();
  const double* a = amax.const_data_ptr<double>();
  for (int64_t b = 0; b < amax.size(0); ++b)
    check_panel_floor(a[b], working_dtype(W3.scalar_type()), LduContext{shape, r, W3.size(0) > 1 ? b : -1});
}

void check_factors(const at::Tensor& W3, const LduResult& out, int64_t r, const std::string& shape,
                   const FactorMaxima& maxima) {
  const int64_t B = W3.size(0), d = W3.size(1), k = W3.size(2);
  const auto acc = out.D.scalar_type();
  const double eps = acc == at::kDouble ? std::numeric_limits<double>::epsilon()
                                        : std::numeric_limits<float>::epsilon();
  const double limit = 1.0 / eps;
  // max |W[I, :]| = max(max |W[I, :r]|, max |W[I, r:]|), and W[I, :r] lies in the panel: only the
  // pivot rows' tails are gathered (index_select per matrix, far faster on the CPU than a gather).
  auto scale = maxima.panel.defined() ? maxima.panel : abs_max(W3.narrow(2, 0, r), {1, 2});
  if (maxima.tails.defined()) {
    scale = at::maximum(scale, maxima.tails);
  } else if (k > r) {
    std::vector<at::Tensor> tails;
    for (int64_t b = 0; b < B; ++b)
      tails.push_back(abs_max(W3[b].narrow(1, r, k - r).index_select(0, out.pivots[b]), {0, 1}));
    scale = at::maximum(scale, at::stack(tails));
  }
  scale = scale.to(acc);
  auto tol = scale * (static_cast<double>(d) * eps);  // d * eps first: scale * d may overflow fp32
  auto pivot_ok = (out.D.abs() > tol.unsqueeze(1)).all(1);
  auto u_max = maxima.U.defined() ? maxima.U : abs_max(out.U, {1, 2});
  auto pl_max = maxima.PL.defined() ? maxima.PL : abs_max(out.PL, {1, 2});
  auto growth_ok = at::logical_and(u_max <= limit, pl_max <= limit);  // false for NaN too
  if (at::logical_and(pivot_ok, growth_ok).all().item<bool>()) return;
  // A measured maximum is NaN for an Inf too: the error is worded from ATen's own reductions.
  if (maxima.U.defined() || maxima.PL.defined())
    return check_factors(W3, out.U.defined() ? out : maxima.factors(), r, shape, {maxima.panel});
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
  LduResult out;
  FactorMaxima maxima;
  if (W.is_cuda()) {
    maxima.panel = abs_max(W3.narrow(2, 0, rank), {1, 2});  // read once for both checks
    check_panel_scale(W3, rank, shape, maxima.panel);
    out = ldu_cuda(W3, rank, mode, F3, shape);
  } else {
    TORCH_CHECK(W.is_cpu(), "loldu.ldu: unsupported device ", W.device(), " for W of shape ", shape);
    // The CPU kernel applies check_panel_scale's test to each panel as it gathers it, and measures
    // the maxima check_factors reads while the data are in cache (a batch is far larger than it).
    out = ldu_cpu(W3, rank, mode, F3, shape, maxima);
  }
  check_factors(W3, out, rank, shape, maxima);
  if (!batched) out = LduResult{out.PL[0], out.D[0], out.U[0], out.pivots[0]};
  return out;
}

namespace {

// Full-rank factors (P L, Ũ = triu(LU) / D) of packed ones (B, d, k): for check_factors' messages.
LduResult unpack(const at::Tensor& LU, const at::Tensor& perm, const at::Tensor& D) {
  const int64_t d = LU.size(1), k = LU.size(2), m = std::min(d, k);
  at::Tensor L = LU.narrow(2, 0, m).tril(-1);
  L.diagonal(0, 1, 2).fill_(1);
  at::Tensor PL = at::empty_like(L).scatter_(1, perm.unsqueeze(2).expand({-1, -1, m}), L);
  at::Tensor U = LU.narrow(1, 0, m).triu() / D.unsqueeze(2);
  return {PL, D, U, perm.narrow(1, 0, m).contiguous()};
}

// lu_factor on any device (ATen's getrf: LAPACK, cuSOLVER or MAGMA), perm from its interchanges.
std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_aten(const at::Tensor& W3) {
  const int64_t B = W3.size(0), d = W3.size(1), k = W3.size(2), m = std::min(d, k);
  auto [LU, ipiv, info] = at::linalg_lu_factor_ex(W3.to(working_dtype(W3.scalar_type())), true, false);
  at::Tensor piv = ipiv.to(at::kCPU, at::kLong).contiguous();
  at::Tensor perm = at::arange(d, piv.options()).repeat({B, 1});
  for (int64_t b = 0; b < B; ++b) {
    int64_t* p = perm[b].data_ptr<int64_t>();
    const int64_t* q = piv[b].const_data_ptr<int64_t>();
    for (int64_t j = 0; j < m; ++j) std::swap(p[j], p[q[j] - 1]);
  }
  return {LU.contiguous(), perm.to(W3.device()), LU.diagonal(0, 1, 2).contiguous()};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lu_packed(const at::Tensor& W) {
  TORCH_CHECK_VALUE(W.dim() == 2 || W.dim() == 3, "loldu.ldu: W must be (d, k) or a batch (B, d, k), got shape ",
                    W.sizes());
  const int64_t m = std::min(W.size(-2), W.size(-1));
  const std::string shape = check_ldu_args(W, m);
  at::Tensor W3 = W.dim() == 3 ? W : W.unsqueeze(0);
  FactorMaxima maxima;
  at::Tensor LU, perm, D;
  if (W.is_cpu()) {
    std::tie(LU, perm, D) = packed_cpu(W3, shape, maxima);
  } else {
    maxima.panel = abs_max(W3, {1, 2});  // at full rank every entry is in the panel or a pivot row
    TORCH_CHECK_VALUE(at::isfinite(maxima.panel).all().item<bool>(), "loldu.ldu: NaN or Inf in W of shape ", shape);
    check_panel_scale(W3, m, shape, maxima.panel);
    std::tie(LU, perm, D) = packed_aten(W3);
  }
  maxima.factors = [&] { return unpack(LU, perm, D); };
  LduResult view{at::Tensor(), D, at::Tensor(), perm.narrow(1, 0, m)};
  if (!maxima.U.defined()) view = unpack(LU, perm, D);
  check_factors(W3, view, m, shape, maxima);
  if (W.dim() == 2) return {LU[0], perm[0], D[0]};
  return {LU, perm, D};
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
