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

void check_against_oracle(int64_t d, int64_t k, int64_t r, at::ScalarType dt, double tol) {
  at::Tensor W = at::randn({d, k}, at::TensorOptions().dtype(dt));
  auto got = loldu::ldu(W, r);
  auto want = oracle(W, r);
  LOLDU_CHECK(got.PL.sizes() == at::IntArrayRef({d, r}) && got.U.sizes() == at::IntArrayRef({r, k}));
  LOLDU_CHECK(got.pivots.equal(want.pivots));
  LOLDU_CHECK(max_rel(got.PL, want.PL) < tol);
  LOLDU_CHECK(max_rel(got.D, want.D) < tol);
  LOLDU_CHECK(max_rel(got.U, want.U) < tol);
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
  // A batch of matrices gives the same factors as one at a time, bit for bit: r = 7 <= 64 (one
  // block) runs no BLAS call, so every matrix goes through the very same per-matrix loops.
  at::Tensor Wb = at::randn({3, 50, 30}, at::kDouble);
  auto batch = loldu::ldu(Wb, 7);
  for (int64_t b = 0; b < 3; ++b) LOLDU_CHECK(batch.U[b].equal(loldu::ldu(Wb[b], 7).U));

  // Bad input: errors that name the shape and rank, never NaN in an output.
  auto msg = loldu_test::error_of([] { loldu::ldu(at::zeros({8, 8}), 2); });
  LOLDU_CHECK(msg.find("negligible pivot") != std::string::npos && msg.find("[8, 8]") != std::string::npos);
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
