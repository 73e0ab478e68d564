// The fused adapter op against a dense float64 (W0 + ΔW) forward and autograd of that forward.
#include <loldu/loldu.h>

#include <ATen/ATen.h>
#include <torch/torch.h>

#include "check.h"

int main() {
  torch::manual_seed(0);
  const int64_t n = 13, d = 48, k = 40, r = 9;
  auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  auto W = torch::randn({d, k}, f64), b = torch::randn({d}, f64), x = torch::randn({2, n, k}, f64);
  auto f = loldu::ldu(W, r);
  auto c = torch::randn({r}, f64);

  auto dense_w = (W + loldu::delta_weight(f.PL, f.U, c)).requires_grad_(false);
  auto xr = x.clone().requires_grad_(true);
  auto cr = c.clone().requires_grad_(true);
  auto ref = torch::addmm(b, xr.reshape({-1, k}),
                          (W + torch::mm(f.PL * cr.unsqueeze(0), f.U)).t()).reshape({2, n, d});
  auto y = loldu::adapter_linear(x, W, b, f.PL, f.U, c);
  LOLDU_CHECK((y - ref).abs().max().item<double>() < 1e-10);
  LOLDU_CHECK((y - torch::nn::functional::linear(x, dense_w, b)).abs().max().item<double>() < 1e-10);

  auto g = torch::randn_like(ref);
  ref.backward(g);
  auto [gx, gc] = loldu::adapter_linear_backward(g, x, W, f.PL, f.U, c, true);
  LOLDU_CHECK((gx - xr.grad()).abs().max().item<double>() < 1e-10);
  LOLDU_CHECK((gc - cr.grad()).abs().max().item<double>() < 1e-10);

  // c = 0 gives the base layer exactly: the op's own base GEMM, addmm(b, x2, W^T) on the 2-D view
  // of x, plus an exact zero. The reference is that very call, so the check stays bit for bit.
  auto base = loldu::adapter_linear(x, W, b, f.PL, f.U, torch::zeros({r}, f64));
  LOLDU_CHECK(base.equal(torch::addmm(b, x.reshape({-1, k}), W.t()).view({2, n, d})));
  // different GEMM paths (F.linear on the 3-D x vs addmm on its 2-D view; BLAS kernels differ by
  // CPU): equal up to fp rounding, bound 1e-12 relative to max |y|.
  auto lin = torch::nn::functional::linear(x, W, b);
  LOLDU_CHECK((base - lin).abs().max().item<double>() <= 1e-12 * lin.abs().max().item<double>());

  auto msg = loldu_test::error_of([&] { loldu::adapter_linear(torch::randn({3, k + 1}, f64), W, b, f.PL, f.U, c); });
  LOLDU_CHECK(msg.find("features") != std::string::npos && msg.find("[3, 41]") != std::string::npos);
  msg = loldu_test::error_of([&] { loldu::adapter_linear(x, W, b, f.PL, f.U, torch::randn({r + 1}, f64)); });
  LOLDU_CHECK(msg.find("c must be") != std::string::npos);
  return loldu_test::finish("test_adapter_linear");
}
