// Adapter files and merging into weight maps: sha256 against the FIPS 180-4 test vectors, merged
// weights against a float64 LU reference (at::linalg_lu), exact unmerge, bounded swaps, refusals that
// leave the weights unchanged, saved modules, the reader/writer round trip, and the coefficient
// formulas against the spec's golden vectors.
#include <loldu/loldu.h>

#include <ATen/ATen.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "check.h"

namespace {

std::string scratch(const std::string& name) {
  const char* env = std::getenv("LOLDU_TEST_TMP");
  const std::filesystem::path dir = std::filesystem::path(env ? env : "/tmp/loldu_test_merge") / name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir.parent_path());
  return dir.string();
}

loldu::WeightMap clone(const loldu::WeightMap& w) {
  loldu::WeightMap out;
  for (const auto& kv : w) out[kv.first] = kv.second.clone();
  return out;
}

bool same(const loldu::WeightMap& a, const loldu::WeightMap& b) {
  if (a.size() != b.size()) return false;
  for (const auto& kv : a) {
    auto it = b.find(kv.first);
    if (it == b.end() || it->second.scalar_type() != kv.second.scalar_type() || !it->second.equal(kv.second)) return false;
  }
  return true;
}

// A small model's weights: linear, conv2d, embedding, and a transformers Conv1D (stored (in, out)).
loldu::WeightMap model(at::ScalarType dt) {
  auto o = at::TensorOptions().dtype(dt);
  return {{"fc.weight", at::randn({24, 16}, o)},  {"fc.bias", at::randn({24}, o)},
          {"conv.weight", at::randn({6, 3, 3, 3}, o)}, {"emb.weight", at::randn({30, 8}, o)},
          {"attn.c_proj.weight", at::randn({10, 14}, o)}, {"head.weight", at::randn({2, 24}, o)},
          {"step", at::tensor({7}, at::kLong)}};
}

const std::vector<std::pair<std::string, std::string>> kTargets = {
    {"fc", "linear"}, {"conv", "conv2d"}, {"emb", "embedding"}, {"attn.c_proj", "conv1d"}};

loldu::AdapterFile random_adapter(const loldu::WeightMap& w, int64_t rank, uint64_t seed, const std::string& name) {
  loldu::AdapterConfig config;
  config.rank = rank;
  config.alpha = 3.0;
  config.train_scale = true;
  loldu::AdapterFile a = loldu::make_adapter(w, kTargets, config, name);
  at::manual_seed(seed);
  const at::Tensor e = at::randn({int64_t(a.z.size())});
  // Rounded to float: the values an F32 file holds, so a file round trip is exact.
  for (size_t i = 0; i < a.z.size(); ++i) a.z[i] = float(a.z[i] * (1.0f + 0.5f * e[int64_t(i)].item<float>()));
  for (size_t i = 0; i < a.sigma.size(); ++i) a.sigma[i] = float(a.sigma[i] * (1.0f + 0.1f * float(i + 1)));
  return a;
}

// W0 + PL diag(c) U in float64 from the full LU of W0 (the oracle), c = sigma z - sigma0 D.
at::Tensor reference_merge(const at::Tensor& W0f, const loldu::AdapterFile& a, size_t layer) {
  const int64_t r = a.rank();
  const at::Tensor W0 = W0f.to(at::kDouble);
  auto lu = at::linalg_lu(W0);
  const at::Tensor U = std::get<2>(lu);
  const at::Tensor D = U.diagonal().narrow(0, 0, r);
  const at::Tensor PL = at::mm(std::get<0>(lu), std::get<1>(lu)).narrow(1, 0, r);
  const at::Tensor Uu = U.narrow(0, 0, r) / D.unsqueeze(1);
  std::vector<double> z(a.z.begin() + int64_t(layer) * r, a.z.begin() + int64_t(layer + 1) * r);
  const at::Tensor c = double(a.sigma[layer]) * at::tensor(z, at::kDouble) - double(a.config.initial_scale()) * D;
  return W0 + at::mm(PL * c.unsqueeze(0), Uu);
}

void test_sha256() {
  auto hex = [](const std::string& s) { return loldu::to_hex(loldu::sha256(s.data(), s.size())); };
  LOLDU_CHECK(hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  LOLDU_CHECK(hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  LOLDU_CHECK(hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
              "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  loldu::Sha256 h;  // one million 'a', fed in uneven pieces
  const std::string chunk(997, 'a');
  size_t left = 1000000;
  while (left) {
    const size_t n = std::min(left, chunk.size());
    h.update(chunk.data(), n);
    left -= n;
  }
  LOLDU_CHECK(loldu::to_hex(h.digest()) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

void test_merge_matches_reference(at::ScalarType dt, double tol) {
  at::manual_seed(1);
  loldu::WeightMap w = model(dt);
  const loldu::WeightMap base = clone(w);
  const loldu::AdapterFile a = random_adapter(w, 3, 2, "a");
  loldu::MergeRecord rec = loldu::merge_adapter(w, a);
  for (size_t i = 0; i < kTargets.size(); ++i) {
    const std::string key = kTargets[i].first + ".weight";
    const at::Tensor W0 = loldu::weight_matrix(base.at(key), kTargets[i].second);
    const at::Tensor got = loldu::weight_matrix(w.at(key), kTargets[i].second).to(at::kDouble);
    const at::Tensor want = reference_merge(W0, a, i);
    // fp32 factors and GEMMs against the float64 truth: a few eps of the largest entry.
    const double err = (got - want).abs().max().item<double>() / want.abs().max().item<double>();
    LOLDU_CHECK(err < tol);
    LOLDU_CHECK(!w.at(key).equal(base.at(key)));  // the adapter did change the weight
  }
  LOLDU_CHECK(w.at("fc.bias").equal(base.at("fc.bias")) && w.at("step").equal(base.at("step")));
  loldu::unmerge_adapter(w, rec);
  LOLDU_CHECK(same(w, base));
  LOLDU_CHECK(!rec.active);
}

void test_subtracting_unmerge() {
  at::manual_seed(3);
  loldu::WeightMap w = model(at::kFloat);
  const loldu::WeightMap base = clone(w);
  const loldu::AdapterFile a = random_adapter(w, 4, 5, "a");
  loldu::MergeOptions opts;
  opts.keep_base = false;
  loldu::MergeRecord rec = loldu::merge_adapter(w, a, opts);
  LOLDU_CHECK(!rec.layers.front().base.defined());
  loldu::unmerge_adapter(w, rec);
  for (size_t i = 0; i < kTargets.size(); ++i) {
    const std::string key = kTargets[i].first + ".weight";
    const at::Tensor W = loldu::weight_matrix(w.at(key), kTargets[i].second);
    const at::Tensor W0 = loldu::weight_matrix(base.at(key), kTargets[i].second);
    const at::Tensor piv = at::tensor(std::vector<int64_t>(a.pivots.begin() + int64_t(i) * a.rank(),
                                                           a.pivots.begin() + int64_t(i + 1) * a.rank()));
    // What the factorization reads comes back exactly, so the fingerprint still matches...
    LOLDU_CHECK(W.narrow(1, 0, a.rank()).equal(W0.narrow(1, 0, a.rank())));
    LOLDU_CHECK(W.index_select(0, piv).equal(W0.index_select(0, piv)));
    // ...and the rest within two roundings of fp32 at the size of W0 + delta.
    const double scale = W0.abs().max().item<double>() + 1.0;
    LOLDU_CHECK((W - W0).abs().max().item<double>() <= 4 * 1.2e-7 * scale * 4);
  }
  loldu::check_adapter(w, a);  // still the same base
}

void test_swaps_do_not_drift() {
  at::manual_seed(4);
  loldu::WeightMap w = model(at::kFloat);
  const loldu::WeightMap base = clone(w);
  const loldu::AdapterFile a = random_adapter(w, 2, 6, "a"), b = random_adapter(w, 5, 7, "b");
  loldu::MergeRecord rec = loldu::merge_adapter(w, a);
  const loldu::WeightMap merged_a = clone(w);
  for (int i = 0; i < 200; ++i) rec = loldu::swap_adapter(w, rec, i % 2 == 0 ? b : a);
  LOLDU_CHECK(rec.adapter_name == "a");
  LOLDU_CHECK(same(w, merged_a));  // the same merge of A as the first one, bit for bit
  loldu::unmerge_adapter(w, rec);
  LOLDU_CHECK(same(w, base));

  // Subtracting unmerges restore W0[:, :r] and the pivot rows exactly, so an adapter of the same
  // rank (the same pivots, as adapters sharing one Python model's layers) keeps fitting the base.
  const loldu::AdapterFile b2 = random_adapter(w, 2, 16, "b2");
  loldu::MergeOptions opts;
  opts.keep_base = false;
  rec = loldu::merge_adapter(w, a, opts);
  for (int i = 0; i < 50; ++i) rec = loldu::swap_adapter(w, rec, i % 2 == 0 ? b2 : a);
  loldu::unmerge_adapter(w, rec);
  loldu::check_adapter(w, a);
  loldu::check_adapter(w, b2);
  // The rest drifts by at most one rounding per unmerge: 51 here, against about 0.5 ulp per swap.
  for (const auto& t : kTargets) {
    const std::string key = t.first + ".weight";
    const double scale = base.at(key).abs().max().item<double>() + 1.0;
    LOLDU_CHECK((w.at(key) - base.at(key)).abs().max().item<double>() <= 51 * 2 * 1.2e-7 * scale * 4);
  }
}

void test_refusals_change_nothing() {
  at::manual_seed(8);
  loldu::WeightMap w = model(at::kFloat);
  const loldu::AdapterFile a = random_adapter(w, 3, 9, "a");
  // Another base: one entry of the pivot rows of the last layer differs.
  loldu::WeightMap other = clone(w);
  const int64_t p0 = a.pivots[size_t(3 * a.rank())];
  other["attn.c_proj.weight"].t()[p0][5] += 1e-3;
  const loldu::WeightMap before = clone(other);
  std::string msg = loldu_test::error_of([&] { loldu::merge_adapter(other, a); });
  LOLDU_CHECK(msg.find("layer 'attn.c_proj'") != std::string::npos && msg.find("fingerprint") != std::string::npos);
  LOLDU_CHECK(same(other, before));
  // A change outside what the factorization reads is the same base for the fingerprint.
  loldu::WeightMap outside = clone(w);
  outside["fc.weight"][0][15] += 1.0f;
  bool pivot_row = false;
  for (int64_t j = 0; j < a.rank(); ++j) pivot_row |= a.pivots[size_t(j)] == 0;
  if (!pivot_row) loldu::check_adapter(outside, a);

  auto refused = [&](loldu::WeightMap m, const char* needle) {
    const loldu::WeightMap copy = clone(m);
    const std::string e = loldu_test::error_of([&] { loldu::merge_adapter(m, a); });
    LOLDU_CHECK(e.find(needle) != std::string::npos);
    LOLDU_CHECK(same(m, copy));
  };
  loldu::WeightMap missing = clone(w);
  missing.erase("emb.weight");
  refused(missing, "no 'emb.weight'");
  loldu::WeightMap half = clone(w);
  half["conv.weight"] = half["conv.weight"].to(at::kHalf);
  refused(half, "dtype");
  loldu::WeightMap shape = clone(w);
  shape["fc.weight"] = at::randn({24, 17});
  refused(shape, "(24, 17)");
  loldu::WeightMap flat = clone(w);
  flat["conv.weight"] = flat["conv.weight"].reshape({6, 27});
  refused(flat, "conv2d");

  // A swap to an adapter of another base keeps the merged adapter in place.
  loldu::WeightMap m = clone(w);
  loldu::MergeRecord rec = loldu::merge_adapter(m, a);
  const loldu::WeightMap merged = clone(m);
  loldu::WeightMap alien_base = clone(w);
  alien_base["emb.weight"] = at::randn({30, 8});
  const loldu::AdapterFile alien = random_adapter(alien_base, 3, 10, "alien");
  msg = loldu_test::error_of([&] { rec = loldu::swap_adapter(m, rec, alien); });
  LOLDU_CHECK(msg.find("layer 'emb'") != std::string::npos);
  LOLDU_CHECK(same(m, merged) && rec.active);
  loldu::unmerge_adapter(m, rec);
  LOLDU_CHECK(same(m, w));
  LOLDU_CHECK(!loldu_test::error_of([&] { loldu::unmerge_adapter(m, rec); }).empty());

  // An AdapterFile edited in C++ into an inconsistent state is refused, not read out of bounds.
  loldu::AdapterFile short_z = a;
  short_z.z.pop_back();
  LOLDU_CHECK(loldu_test::error_of([&] { loldu::merge_adapter(m, short_z); }).find("one entry per layer") !=
              std::string::npos);
  loldu::AdapterFile far_pivot = a;
  far_pivot.pivots[0] = 1000;
  LOLDU_CHECK(loldu_test::error_of([&] { loldu::merge_adapter(m, far_pivot); }).find("layer 'fc': pivots") !=
              std::string::npos);
  LOLDU_CHECK(same(m, w));
}

void test_saved_modules() {
  at::manual_seed(12);
  loldu::WeightMap w = model(at::kFloat);
  const loldu::WeightMap base = clone(w);
  loldu::AdapterFile a = random_adapter(w, 2, 13, "heads");
  const at::Tensor head = at::randn({2, 24}), extra = at::randn({5});
  auto owned = [](const at::Tensor& t) {
    const at::Tensor c = t.contiguous();
    const uint8_t* p = static_cast<const uint8_t*>(c.const_data_ptr());
    return loldu::OwnedTensor{loldu::spec::kDtypes[1].safetensors, c.sizes().vec(),  // F32
                              std::vector<uint8_t>(p, p + c.nbytes())};
  };
  a.saved_modules = {{"head", {"weight"}}, {"newhead", {"bias"}}};
  a.saved_tensors = {{"saved.head.weight", owned(head)}, {"saved.newhead.bias", owned(extra)}};
  const std::string dir = scratch("saved");
  loldu::save_adapter(dir, a);
  const loldu::AdapterFile back = loldu::read_adapter(dir);
  LOLDU_CHECK(back.saved_modules.size() == 2 && back.saved_tensors.size() == 2);
  loldu::MergeRecord rec = loldu::merge_adapter(w, back);
  LOLDU_CHECK(w.at("head.weight").equal(head) && w.count("newhead.bias") && w.at("newhead.bias").equal(extra));
  loldu::unmerge_adapter(w, rec);
  LOLDU_CHECK(same(w, base));
  // A saved tensor whose base entry has another shape is refused before anything changes.
  loldu::AdapterFile bad = back;
  bad.saved_tensors["saved.head.weight"].shape = {4, 12};
  const std::string msg = loldu_test::error_of([&] { loldu::merge_adapter(w, bad); });
  LOLDU_CHECK(msg.find("saved.head.weight") != std::string::npos);
  LOLDU_CHECK(same(w, base));
}

void test_files_round_trip() {
  at::manual_seed(14);
  loldu::WeightMap w = model(at::kBFloat16);
  w["mask"] = at::randn({3, 3}) > 0;
  w["scale"] = at::randn({}, at::kDouble);
  const std::string dir = scratch("files");
  std::filesystem::create_directories(dir);
  loldu::save_weights(dir + "/w.safetensors", w, {{"format", "pt"}});
  std::map<std::string, std::string> meta;
  const loldu::WeightMap back = loldu::load_weights(dir + "/w.safetensors", &meta);
  LOLDU_CHECK(same(w, back) && meta.at("format") == "pt");

  const loldu::AdapterFile a = random_adapter(w, 2, 15, "bf");
  loldu::save_adapter(dir + "/adapter", a);
  std::vector<std::string> warnings;
  const loldu::AdapterFile r = loldu::read_adapter(dir + "/adapter", &warnings);
  LOLDU_CHECK(warnings.empty());
  LOLDU_CHECK(r.z == a.z && r.sigma == a.sigma && r.pivots == a.pivots && r.fingerprints == a.fingerprints);
  LOLDU_CHECK(r.layers.size() == 4 && r.layers[3].kind == "conv1d" && r.layers[3].d == 14 && r.layers[3].dtype == "bfloat16");
  LOLDU_CHECK(r.format_version == loldu::kAdapterFormatVersion && r.adapter_name == "bf" && r.rank() == 2);
  for (const auto& l : r.layers) LOLDU_CHECK(l.rank == 2);
  // A stale copy of the config is only warned about; a flipped byte in the weights file is refused.
  {
    std::FILE* f = std::fopen((dir + "/adapter/loldu_config.json").c_str(), "ab");
    std::fputs(" ", f);
    std::fclose(f);
  }
  warnings.clear();
  loldu::read_adapter(dir + "/adapter", &warnings);
  LOLDU_CHECK(warnings.size() == 1);
  std::vector<uint8_t> raw = loldu::read_file_bytes(dir + "/adapter/adapter_model.safetensors");
  raw[raw.size() - 3] ^= 1;  // inside the fingerprints
  const std::string msg = loldu_test::error_of([&] { loldu::parse_adapter(raw.data(), raw.size(), "flipped"); });
  LOLDU_CHECK(msg.find("flipped: tensor data does not match") == 0);
  // Invalid adapters are refused before anything is written.
  loldu::AdapterFile nan = a;
  nan.z[1] = std::nanf("");
  LOLDU_CHECK(!loldu_test::error_of([&] { loldu::save_adapter(dir + "/nan", nan); }).empty());
  LOLDU_CHECK(!std::filesystem::exists(dir + "/nan/adapter_model.safetensors"));
}

// The coefficient formulas against adapter_spec.json's golden vectors, bit for bit in fp32 and fp64 (the
// Python side checks the same vectors in tests/test_spec.py).
void test_coefficients_match_the_spec() {
  for (const auto& v : loldu::spec::kCoefficientCases) {
    const int64_t n = int64_t(v.n);
    for (at::ScalarType dt : {at::kFloat, at::kDouble}) {
      const at::Tensor z = at::from_blob(const_cast<float*>(v.z), {n}, at::kFloat).to(dt);
      const at::Tensor D = at::from_blob(const_cast<float*>(v.D), {n}, at::kFloat).to(dt);
      const at::Tensor sigma = at::scalar_tensor(double(v.sigma), at::kFloat).to(dt);
      const at::Tensor c = loldu::coefficients(z, sigma, D, double(v.sigma0), v.parametrization).to(at::kDouble);
      for (int64_t i = 0; i < n; ++i) {
        const double want = dt == at::kFloat ? double(v.c_float32[i]) : v.c_float64[i];
        LOLDU_CHECK(c[i].item<double>() == want);
      }
    }
  }
}

// adapter_spec.json's c_check at merge, the rank against the layer, z and sigma in F64; every refusal
// leaves the weights as they were.
void test_merge_bounds() {
  at::manual_seed(31);
  // c past the bound although sigma z is in it: z = 0 leaves c = -sigma0 D, with D ~ 1e31.
  loldu::WeightMap w = {{"fc.weight", at::randn({24, 16}) * 1e31}};
  loldu::AdapterConfig config;
  config.rank = 2;
  config.alpha = 3.0;
  loldu::AdapterFile a = loldu::make_adapter(w, {{"fc", "linear"}}, config, "big");
  std::fill(a.z.begin(), a.z.end(), 0.0);
  const at::Tensor before = w["fc.weight"].clone();
  std::string msg = loldu_test::error_of([&] { loldu::merge_adapter(w, a); });
  LOLDU_CHECK(msg.find("layer 'fc': its coefficients c") != std::string::npos && msg.find("exceed the bound 1e+30") != std::string::npos);
  LOLDU_CHECK(w["fc.weight"].equal(before));
  // c in bounds, the merged weight not: fp16 weights under a delta of ~1e5.
  loldu::WeightMap h = {{"fc.weight", at::randn({24, 16}).to(at::kHalf)}};
  loldu::AdapterFile b = loldu::make_adapter(h, {{"fc", "linear"}}, config, "wide");
  for (double& v : b.z) v += 1e5;
  const at::Tensor hb = h["fc.weight"].clone();
  msg = loldu_test::error_of([&] { loldu::merge_adapter(h, b); });
  LOLDU_CHECK(msg.find("layer 'fc': the merged weight holds NaN/Inf in float16") != std::string::npos);
  LOLDU_CHECK(h["fc.weight"].equal(hb));
  // z = sigma = 3e38: finite, but sigma z overflows; refused before any computation.
  loldu::AdapterFile inf = loldu::make_adapter(w, {{"fc", "linear"}}, config, "inf");
  std::fill(inf.z.begin(), inf.z.end(), 3e38);
  std::fill(inf.sigma.begin(), inf.sigma.end(), 3e38);
  msg = loldu_test::error_of([&] { loldu::merge_adapter(w, inf); });
  LOLDU_CHECK(msg.find("layer 'fc': sigma * z") != std::string::npos);

  // Rank above the smaller side: an AdapterError naming the adapter and the layer, not a torch error.
  loldu::WeightMap n = {{"fc.weight", at::randn({128, 64})}};
  config.rank = 100;
  loldu::AdapterFile wide;
  wide.adapter_name = "wide";
  wide.config = config;
  wide.layers = {{"fc", "linear", 128, 64, "float32"}};
  wide.z.assign(100, 0.5);
  wide.sigma = {1.0};
  for (int32_t i = 0; i < 100; ++i) wide.pivots.push_back(i);
  wide.fingerprints.resize(1);
  msg = loldu_test::error_of([&] { loldu::check_adapter(n, wide); });
  LOLDU_CHECK(msg == "adapter 'wide': layer 'fc': rank 100 exceeds the smaller side of its (128, 64) weight");
  msg = loldu_test::error_of([&] { loldu::fingerprint(n["fc.weight"], at::arange(100)); });
  LOLDU_CHECK(msg.find("loldu::fingerprint: 100 pivots exceed the smaller side of W (128, 64)") == 0);

  // F64 z and sigma on fp64 weights: kept exactly through a file, merged as the float64 reference.
  loldu::WeightMap d = model(at::kDouble);
  loldu::AdapterFile f = random_adapter(d, 3, 33, "f64");
  f.z_dtype = "F64";
  const at::Tensor e = at::randn({int64_t(f.z.size())}, at::kDouble);
  for (size_t i = 0; i < f.z.size(); ++i) f.z[i] *= 1.0 + 1e-9 * e[int64_t(i)].item<double>();  // beyond float
  const std::string dir = scratch("f64");
  loldu::save_adapter(dir, f);
  const loldu::AdapterFile r = loldu::read_adapter(dir);
  LOLDU_CHECK(r.z_dtype == "F64" && r.z == f.z && r.sigma == f.sigma);
  loldu::WeightMap merged = d;
  for (auto& kv : merged) kv.second = kv.second.clone();
  loldu::merge_adapter(merged, r);
  const at::Tensor want = reference_merge(d.at("fc.weight"), r, 0);
  LOLDU_CHECK((merged.at("fc.weight") - want).abs().max().item<double>() < 1e-12 * want.abs().max().item<double>());
}

}  // namespace

int main() {
  test_coefficients_match_the_spec();
  test_sha256();
  test_merge_matches_reference(at::kFloat, 2e-6);
  test_merge_matches_reference(at::kDouble, 1e-12);
  test_subtracting_unmerge();
  test_swaps_do_not_drift();
  test_refusals_change_nothing();
  test_saved_modules();
  test_files_round_trip();
  test_merge_bounds();
  return loldu_test::finish("test_merge");
}
