// A tiny app built against the installed loldu package: writes an adapter over random base weights,
// reads it back, merges it, checks the merged weight against a float64 LU of the base
// (at::linalg_lu, independent of loldu's kernels), and unmerges back to the exact base.
#include <loldu/loldu.h>

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: consumer SCRATCH_ADAPTER_DIR\n");
    return 2;
  }
  at::manual_seed(11);
  loldu::WeightMap weights = {{"fc.weight", at::randn({12, 9})}, {"fc.bias", at::randn({12})}};
  const loldu::WeightMap base = {{"fc.weight", weights["fc.weight"].clone()}, {"fc.bias", weights["fc.bias"].clone()}};
  loldu::AdapterConfig config;
  config.rank = 4;
  config.alpha = 2.0;
  loldu::AdapterFile made = loldu::make_adapter(weights, {{"fc", "linear"}}, config, "consumer");
  for (size_t i = 0; i < made.z.size(); ++i) made.z[i] = float(made.z[i] + 0.25 * double(i + 1));  // F32 in the file
  made.sigma[0] = 0.75f;
  loldu::save_adapter(argv[1], made);
  const loldu::AdapterFile a = loldu::read_adapter(argv[1]);
  int failures = 0;
  auto check = [&](bool ok, const char* what) {
    if (!ok) {
      std::printf("consumer: FAILED: %s\n", what);
      ++failures;
    }
  };
  check(a.z == made.z && a.sigma == made.sigma && a.pivots == made.pivots, "the adapter reads back as written");

  loldu::MergeRecord rec = loldu::merge_adapter(weights, a);
  // Reference in float64: PL, D, U from the full LU, c = sigma z - sigma0 D.
  const at::Tensor W0 = base.at("fc.weight").to(at::kDouble);
  auto lu = at::linalg_lu(W0);
  const at::Tensor P = std::get<0>(lu), L = std::get<1>(lu), U = std::get<2>(lu);
  const int64_t r = 4;
  const at::Tensor D = U.diagonal().narrow(0, 0, r);
  const at::Tensor PL = at::mm(P, L).narrow(1, 0, r), Uu = U.narrow(0, 0, r) / D.unsqueeze(1);
  const at::Tensor z = at::tensor(std::vector<double>(a.z.begin(), a.z.end()), at::kDouble);
  const double sigma0 = 2.0 / 4.0;
  const at::Tensor c = double(a.sigma[0]) * z - sigma0 * D;
  const at::Tensor want = W0 + at::mm(PL * c.unsqueeze(0), Uu);
  const double err = (weights["fc.weight"].to(at::kDouble) - want).abs().max().item<double>() /
                     want.abs().max().item<double>();
  // fp32 factorization and GEMM of O(1) entries at this size: a few float32 eps.
  check(err < 1e-5, "the merged weight matches the float64 reference");
  check(weights["fc.bias"].equal(base.at("fc.bias")), "the bias is untouched");
  loldu::unmerge_adapter(weights, rec);
  check(weights["fc.weight"].equal(base.at("fc.weight")), "unmerge restores the base exactly");
  if (failures == 0) std::printf("consumer: ok (merged weight within %.2g of the float64 reference)\n", err);
  return failures == 0 ? 0 : 1;
}
