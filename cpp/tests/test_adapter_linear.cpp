// The fused adapter op against a dense float64 (W0 + ΔW) forward and autograd of that forward, in
// both forms (docs/method.md §7), and the cost model behind form "auto".
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

  // The dense form and its backward, with the saved W and without; full rank too (U's zero
  // triangle skipped in blocks) and an unstructured U (no skipping). fp64, different summation
  // orders than the reference: bound 1e-10 as above.
  for (int64_t rr : {r, std::min(d, k)}) {
    auto fr = loldu::ldu(W, rr);
    for (const auto& Ur : {fr.U, fr.U + 0.1 * torch::randn_like(fr.U)}) {
      auto cr2 = torch::randn({rr}, f64).requires_grad_(true);
      auto xr2 = x.clone().requires_grad_(true);
      auto ref2 = torch::addmm(b, xr2.reshape({-1, k}), (W + torch::mm(fr.PL * cr2.unsqueeze(0), Ur)).t())
                      .reshape({2, n, d});
      ref2.backward(g);
      auto c2 = cr2.detach();
      for (const char* form : {"delta", "dense"}) {
        auto [y2, saved] = loldu::adapter_linear_forward(x, W, b, fr.PL, Ur, c2, form);
        LOLDU_CHECK((y2 - ref2).abs().max().item<double>() < 1e-10);
        for (const auto& s : {std::optional<at::Tensor>(saved), std::optional<at::Tensor>()}) {
          auto [gx2, gc2] = loldu::adapter_linear_backward(g, x, W, fr.PL, Ur, c2, true, true, form, s);
          LOLDU_CHECK((gx2 - xr2.grad()).abs().max().item<double>() < 1e-10);
          LOLDU_CHECK((gc2 - cr2.grad()).abs().max().item<double>() < 1e-10);
        }
      }
    }
  }
  // The chooser: full rank of a BERT-size layer runs dense, rank 16 of a 4096 x 4096 layer delta.
  const auto cpu = c10::DeviceType::CPU;
  LOLDU_CHECK(loldu::adapter_form(2048, 768, 768, 768, at::kFloat, cpu, true, true) == "dense");
  LOLDU_CHECK(loldu::adapter_form(2048, 4096, 4096, 16, at::kFloat, cpu, true, true) == "delta");
  const int64_t m = loldu::adapter_dense_min_rows(768, 768, 768, at::kFloat, cpu, true, true);
  LOLDU_CHECK(loldu::adapter_form(m, 768, 768, 768, at::kFloat, cpu, true, true) == "dense");
  LOLDU_CHECK(loldu::adapter_form(m - 1, 768, 768, 768, at::kFloat, cpu, true, true) == "delta");
  // Per-row c runs delta whatever the form asked for.
  auto cs = torch::randn({2, n, r}, f64);
  LOLDU_CHECK(loldu::resolve_adapter_form(x, W, f.PL, cs, "dense") == "delta");
  LOLDU_CHECK(loldu::adapter_linear(x, W, b, f.PL, f.U, cs, "dense").equal(
      loldu::adapter_linear(x, W, b, f.PL, f.U, cs, "delta")));

  auto msg = loldu_test::error_of([&] { loldu::adapter_linear(x, W, b, f.PL, f.U, c, "sparse"); });
  LOLDU_CHECK(msg.find("form must be 'auto', 'delta' or 'dense', got 'sparse'") != std::string::npos);
  msg = loldu_test::error_of([&] { loldu::adapter_linear(torch::randn({3, k + 1}, f64), W, b, f.PL, f.U, c); });
  LOLDU_CHECK(msg.find("features") != std::string::npos && msg.find("[3, 41]") != std::string::npos);
  msg = loldu_test::error_of([&] { loldu::adapter_linear(x, W, b, f.PL, f.U, torch::randn({r + 1}, f64)); });
  LOLDU_CHECK(msg.find("c must be") != std::string::npos);
  return loldu_test::finish("test_adapter_linear");
}
