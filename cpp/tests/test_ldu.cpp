// The C++ factorization against at::linalg_lu (the oracle), and its error paths.
#include <loldu/loldu.h>

#include <ATen/ATen.h>

#include "check.h"

namespace {

// Leading-r components of the full LU, computed the expensive way.
struct Oracle {
  at::Tensor PL, D, U, pivots;
};

Oracle oracle(const at::Tensor& W, int64_t r) {
  auto [P, L, U] = at::linalg_lu(W);
  auto D = U.diagonal().narrow(0, 0, r);
  return {at::mm(P, L).narrow(1, 0, r), D, U.narrow(0, 0, r) / D.unsqueeze(1),
          P.argmax(0).narrow(0, 0, r)};
}

double max_rel(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>() / std::max(1.0, b.abs().max().item<double>());
}

// got against at::linalg_lu of W: same pivots, each factor within tol of the oracle's relative to
// its largest entry. In fp32 a full-rank leading block can be ill-conditioned, and then no fp32
// algorithm is within 1e-5 of another: there the error against the fp64 truth may not exceed 8x
// the error of at::linalg_lu's own fp32 result against that truth (as tests/test_ldu.py states).
void check_factors_match(const loldu::LduResult& got, const at::Tensor& W, int64_t r, double tol) {
  const int64_t d = W.size(0), k = W.size(1);
  auto want = oracle(W, r);
  LOLDU_CHECK(got.PL.sizes() == at::IntArrayRef({d, r}) && got.U.sizes() == at::IntArrayRef({r, k}));
  LOLDU_CHECK(got.pivots.equal(want.pivots));
  const at::Tensor mine[] = {got.PL, got.D, got.U}, lapack[] = {want.PL, want.D, want.U};
  for (int i = 0; i < 3; ++i) {
    if (max_rel(mine[i], lapack[i]) < tol) continue;
    LOLDU_CHECK(W.scalar_type() == at::kFloat);
    if (W.scalar_type() != at::kFloat) continue;
    auto exact = oracle(W.to(at::kDouble), r);
    const at::Tensor truth = i == 0 ? exact.PL : (i == 1 ? exact.D : exact.U);
    const double ours = (mine[i].to(at::kDouble) - truth).abs().max().item<double>();
    const double theirs = (lapack[i].to(at::kDouble) - truth).abs().max().item<double>();
    LOLDU_CHECK(ours <= 8 * theirs);
  }
  LOLDU_CHECK(at::isfinite(got.PL).all().item<bool>() && at::isfinite(got.U).all().item<bool>());
}

void check_against_oracle(int64_t d, int64_t k, int64_t r, at::ScalarType dt, double tol) {
  at::Tensor W = at::randn({d, k}, at::TensorOptions().dtype(dt));
  auto got = loldu::ldu(W, r);
  check_factors_match(got, W, r, tol);
  // ldu_from_pivots reproduces the same factors from W and the pivots alone.
  auto again = loldu::ldu_from_pivots(W, got.pivots);
  LOLDU_CHECK(again.PL.equal(got.PL) && again.U.equal(got.U) && again.D.equal(got.D));
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (auto [d, k, r] : {std::tuple<int64_t, int64_t, int64_t>{64, 64, 1}, {97, 40, 33}, {40, 97, 40},
                         {300, 200, 64}, {128, 256, 16}}) {
    check_against_oracle(d, k, r, at::kDouble, 1e-12);
    check_against_oracle(d, k, r, at::kFloat, 1e-5);
  }
  // Full rank, r = min(d, k): from r = 64 on the panel goes to LAPACK's getrf. Square and tall:
  // the panel is all of W, the very computation of at::linalg_lu; wide: a small shape, where the
  // two getrf calls (on the (d, d) panel and on W) did not disagree on a pivot in 1000 random
  // matrices. ldu_from_pivots with ldu's pivots repeats ldu's getrf call: bit for bit the same.
  for (auto [d, k] : {std::pair<int64_t, int64_t>{256, 256}, {384, 200}, {160, 400}}) {
    check_against_oracle(d, k, std::min(d, k), at::kDouble, 1e-9);
    check_against_oracle(d, k, std::min(d, k), at::kFloat, 1e-5);
  }
  // A batch one matrix at a time (at::linalg_lu on a CPU batch calls getrf from several threads at
  // once, which in torch 2.13 + MKL returned wrong pivots on a 2-core machine).
  for (auto dt : {at::kDouble, at::kFloat}) {
    at::Tensor Wf = at::randn({3, 160, 160}, at::TensorOptions().dtype(dt));
    auto full = loldu::ldu(Wf, 160);
    for (int64_t b = 0; b < 3; ++b) {
      check_factors_match({full.PL[b], full.D[b], full.U[b], full.pivots[b]}, Wf[b], 160,
                          dt == at::kDouble ? 1e-9 : 1e-5);
    }
    auto again = loldu::ldu_from_pivots(Wf, full.pivots);
    LOLDU_CHECK(again.PL.equal(full.PL) && again.U.equal(full.U) && again.D.equal(full.D));
  }

  // A batch of matrices gives the same factors as one at a time, bit for bit: r = 7 < 64 (one
  // block) runs no BLAS call, so every matrix goes through the very same per-matrix loops.
  at::Tensor Wb = at::randn({3, 50, 30}, at::kDouble);
  auto batch = loldu::ldu(Wb, 7);
  for (int64_t b = 0; b < 3; ++b) LOLDU_CHECK(batch.U[b].equal(loldu::ldu(Wb[b], 7).U));

  // Bad input: errors that name the shape and rank, never NaN in an output.
  auto msg = loldu_test::error_of([] { loldu::ldu(at::zeros({8, 8}), 2); });
  LOLDU_CHECK(msg.find("negligible pivot") != std::string::npos && msg.find("[8, 8]") != std::string::npos);
  // At a large rank getrf does not stop at a tiny pivot: the first negligible step is reported.
  msg = loldu_test::error_of([] {
    auto a = at::randn({300, 150}, at::kDouble);
    loldu::ldu(at::cat({a, at::mm(a, at::randn({150, 1}, at::kDouble)), at::randn({300, 49}, at::kDouble)}, 1), 200);
  });
  LOLDU_CHECK(msg.find("negligible pivot") != std::string::npos && msg.find("at step 150 of 200") != std::string::npos);
  msg = loldu_test::error_of([] { loldu::ldu(at::randn({8, 6}), 7); });
  LOLDU_CHECK(msg.find("rank") != std::string::npos && msg.find("[8, 6]") != std::string::npos);
  msg = loldu_test::error_of([] {
    auto W = at::randn({8, 6});
    W[3][1] = std::nan("");
    loldu::ldu(W, 4);
  });
  LOLDU_CHECK(msg.find("NaN") != std::string::npos && msg.find("W[3, 1]") != std::string::npos);
  // Leading columns far below the rest of W: pivots are judged against the pivot rows too.
  msg = loldu_test::error_of([] {
    auto W = at::randn({64, 48});
    W.narrow(1, 0, 4).mul_(1e-30);
    loldu::ldu(W, 4);
  });
  LOLDU_CHECK(msg.find("scaled far below the rest") != std::string::npos && msg.find("[64, 48]") != std::string::npos);
  msg = loldu_test::error_of([] { loldu::ldu(at::rand({64, 48}) * 1e-39, 8); });
  LOLDU_CHECK(msg.find("too small to factorize in float32") != std::string::npos);
  msg = loldu_test::error_of([] { loldu::ldu(at::ones({5, 5}, at::kLong), 2); });
  LOLDU_CHECK(msg.find("fp64, fp32") != std::string::npos);
  return loldu_test::finish("test_ldu");
}
