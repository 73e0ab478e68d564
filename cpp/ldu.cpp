// Truncated, blocked LDU factorization on the CPU (LOLDU.md, facts 1 and 2).
//
// Only W[:, :r] (the panel) and the r pivot rows of W are read. The panel is copied into a
// row-major (d, r) buffer in the working dtype and factored by a right-looking blocked LU with
// partial pivoting: inside a block of kBlock columns one fused pass per column scales the
// multipliers, applies the rank-1 update and finds the next column's pivot; across blocks the
// trailing update is one GEMM (ATen/BLAS). Then the r pivot rows are solved once against L11.
// Cost O((d + k) r^2); no (d, d) permutation and no (d, k) temporary.
#include "loldu/loldu.h"
#include "ldu_common.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace loldu {
namespace {

// Columns per block: a block row segment (kBlock working scalars) stays within two cache lines
// for fp32, and for r <= kBlock the whole panel is factored without any GEMM call.
constexpr int64_t kBlock = 32;

template <typename acc_t>
struct Panel {
  int64_t d, r;
  std::vector<acc_t> a;        // (d, r) row-major
  std::vector<int64_t> perm;   // perm[i]: original row of W now at panel row i
  std::vector<int64_t> pos;    // inverse of perm (used when the pivots are prescribed)
  acc_t* row(int64_t i) { return a.data() + i * r; }
};

template <typename acc_t>
void swap_rows(Panel<acc_t>& P, int64_t i, int64_t j) {
  if (i == j) return;
  std::swap_ranges(P.row(i), P.row(i) + P.r, P.row(j));
  std::swap(P.perm[i], P.perm[j]);
  P.pos[P.perm[i]] = i;
  P.pos[P.perm[j]] = j;
}

// Factor columns [j0, j1) of the panel, rows j0..d, with the rank-1 updates restricted to
// columns < j1 (the rest is left to the blocked trailing update).
template <typename acc_t>
void factor_block(Panel<acc_t>& P, int64_t j0, int64_t j1, PivotMode mode, const int64_t* forced,
                  acc_t tol, const LduContext& ctx) {
  const int64_t d = P.d;
  // Pivot candidate for column j0 (later columns get theirs from the fused pass).
  auto argmax_col = [&](int64_t j) {
    int64_t best = j;
    acc_t bv = std::abs(P.row(j)[j]);
    for (int64_t i = j + 1; i < d; ++i) {
      acc_t v = std::abs(P.row(i)[j]);
      if (v > bv) { bv = v; best = i; }
    }
    return best;
  };
  int64_t next_pivot = mode == PivotMode::Partial ? argmax_col(j0) : j0;
  for (int64_t j = j0; j < j1; ++j) {
    int64_t p = j;
    if (mode == PivotMode::Partial) p = next_pivot;
    else if (mode == PivotMode::Given) p = P.pos[forced[j]];
    swap_rows(P, j, p);
    const acc_t piv = P.row(j)[j];
    if (!(std::abs(piv) > tol)) ctx.fail_pivot(j, static_cast<double>(piv), static_cast<double>(tol));
    const acc_t inv = acc_t(1) / piv;
    const acc_t* urow = P.row(j);
    const int64_t c0 = j + 1;
    acc_t bv = -1;
    int64_t best = j + 1;
    for (int64_t i = j + 1; i < d; ++i) {
      acc_t* ri = P.row(i);
      const acc_t l = ri[j] * inv;
      ri[j] = l;
      for (int64_t c = c0; c < j1; ++c) ri[c] -= l * urow[c];
      if (c0 < j1) {
        acc_t v = std::abs(ri[c0]);
        if (v > bv) { bv = v; best = i; }
      }
    }
    next_pivot = best;
  }
}

template <typename acc_t>
void factor_one(const at::Tensor& W, int64_t r, PivotMode mode, const int64_t* forced, acc_t* PL,
                acc_t* D, acc_t* U, int64_t* pivots, const LduContext& ctx) {
  const int64_t d = W.size(0), k = W.size(1);
  Panel<acc_t> P{d, r, std::vector<acc_t>(d * r), std::vector<int64_t>(d), std::vector<int64_t>(d)};
  std::iota(P.perm.begin(), P.perm.end(), 0);
  std::iota(P.pos.begin(), P.pos.end(), 0);

  // Gather the panel W[:, :r], checking it is finite and measuring it for the pivot tolerance.
  acc_t amax = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "loldu_ldu_gather", [&] {
    const scalar_t* w = W.const_data_ptr<scalar_t>();
    const int64_t s0 = W.stride(0), s1 = W.stride(1);
    for (int64_t i = 0; i < d; ++i) {
      acc_t* dst = P.row(i);
      const scalar_t* src = w + i * s0;
      for (int64_t j = 0; j < r; ++j) {
        acc_t v = static_cast<acc_t>(src[j * s1]);
        if (!std::isfinite(v)) ctx.fail_nonfinite("panel W[:, :r]", i, j);
        amax = std::max(amax, std::abs(v));
        dst[j] = v;
      }
    }
  });
  const acc_t tol = static_cast<acc_t>(d) * std::numeric_limits<acc_t>::epsilon() * amax;

  // Right-looking blocked LU over the r panel columns.
  at::Tensor panel_view = at::from_blob(P.a.data(), {d, r}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  for (int64_t j0 = 0; j0 < r; j0 += kBlock) {
    const int64_t j1 = std::min(r, j0 + kBlock);
    factor_block(P, j0, j1, mode, forced, tol, ctx);
    if (j1 < r) {
      // U12 = L11^{-1} A12 for this block's rows, then A22 -= L21 U12 (one GEMM).
      for (int64_t i = j0; i < j1; ++i) {
        acc_t* ri = P.row(i);
        for (int64_t p = j0; p < i; ++p) {
          const acc_t l = ri[p];
          const acc_t* rp = P.row(p);
          for (int64_t c = j1; c < r; ++c) ri[c] -= l * rp[c];
        }
      }
      if (j1 < d) {
        auto A22 = panel_view.narrow(0, j1, d - j1).narrow(1, j1, r - j1);
        auto L21 = panel_view.narrow(0, j1, d - j1).narrow(1, j0, j1 - j0);
        auto U12 = panel_view.narrow(0, j0, j1 - j0).narrow(1, j1, r - j1);
        A22.addmm_(L21, U12, /*beta=*/1, /*alpha=*/-1);
      }
    }
  }

  // Outputs from the panel: D, the U11 block, PL in the original row order, the pivots.
  for (int64_t i = 0; i < r; ++i) {
    D[i] = P.row(i)[i];
    pivots[i] = P.perm[i];
  }
  for (int64_t i = 0; i < d; ++i) {
    const acc_t* src = P.row(i);
    acc_t* dst = PL + P.perm[i] * r;
    for (int64_t j = 0; j < r; ++j) dst[j] = j < i ? src[j] : (j == i ? acc_t(1) : acc_t(0));
  }

  // Pivot rows: U[:, r:] = D^{-1} L11^{-1} W[I, r:]; the U11 part is already in the panel.
  const int64_t kr = k - r;
  if (kr > 0) {
    at::Tensor B = at::empty({r, kr}, panel_view.options());
    acc_t* b = B.data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "loldu_ldu_rows", [&] {
      const scalar_t* w = W.const_data_ptr<scalar_t>();
      const int64_t s0 = W.stride(0), s1 = W.stride(1);
      for (int64_t i = 0; i < r; ++i) {
        const scalar_t* src = w + P.perm[i] * s0 + r * s1;
        acc_t* dst = b + i * kr;
        for (int64_t c = 0; c < kr; ++c) {
          acc_t v = static_cast<acc_t>(src[c * s1]);
          if (!std::isfinite(v)) ctx.fail_nonfinite("pivot row", P.perm[i], r + c);
          dst[c] = v;
        }
      }
    });
    if (r <= kBlock) {
      for (int64_t i = 1; i < r; ++i) {
        acc_t* bi = b + i * kr;
        const acc_t* li = P.row(i);
        for (int64_t p = 0; p < i; ++p) {
          const acc_t l = li[p];
          const acc_t* bp = b + p * kr;
          for (int64_t c = 0; c < kr; ++c) bi[c] -= l * bp[c];
        }
      }
    } else {
      auto L11 = panel_view.narrow(0, 0, r);
      B = at::linalg_solve_triangular(L11, B, /*upper=*/false, /*left=*/true, /*unitriangular=*/true).contiguous();
      b = B.data_ptr<acc_t>();
    }
    for (int64_t i = 0; i < r; ++i) {
      const acc_t inv = acc_t(1) / D[i];
      const acc_t* src = b + i * kr;
      acc_t* dst = U + i * k + r;
      for (int64_t c = 0; c < kr; ++c) dst[c] = src[c] * inv;
    }
  }
  for (int64_t i = 0; i < r; ++i) {
    const acc_t inv = acc_t(1) / D[i];
    const acc_t* src = P.row(i);
    acc_t* dst = U + i * k;
    for (int64_t c = 0; c < r; ++c) dst[c] = c < i ? acc_t(0) : (c == i ? acc_t(1) : src[c] * inv);
  }
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

LduResult ldu_dispatch(const at::Tensor& W, int64_t rank, PivotMode mode, const at::Tensor& forced) {
  const std::string shape = check_ldu_args(W, rank);
  const bool batched = W.dim() == 3;
  at::Tensor W3 = batched ? W : W.unsqueeze(0);
  at::Tensor F3;
  if (forced.defined()) F3 = (batched ? forced : forced.unsqueeze(0)).contiguous();
  LduResult out;
  if (W.is_cuda()) {
    out = ldu_cuda(W3, rank, mode, F3, shape);
  } else {
    TORCH_CHECK(W.is_cpu(), "loldu.ldu: unsupported device ", W.device(), " for W of shape ", shape);
    out = ldu_cpu(W3, rank, mode, F3, shape);
  }
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
