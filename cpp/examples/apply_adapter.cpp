// apply_adapter: LoLDU adapters applied to safetensors weights from C++, without Python.
//
//   apply_adapter BASE.safetensors ADAPTER_DIR OUT.safetensors
//       merges the adapter into the base weights and writes them (the base's metadata kept).
//   apply_adapter --swap BASE.safetensors ADAPTER_A ADAPTER_B [--swaps N] [--subtract]
//       merges A, then swaps A -> B -> A ... N times (default 1000) in memory, prints the time per
//       swap, unmerges, and prints the largest difference from the original base weights. By
//       default each merge keeps the weights it overwrites, so the drift is exactly 0; --subtract
//       unmerges by subtracting the delta instead (Python's unmerge: W0[:, :r] and W0[pivots, :]
//       exact, the rest within rounding per swap).
//   apply_adapter --check ADAPTER_DIR...
//       reads and checks adapter directories; prints what each holds, or why it is refused.
//   apply_adapter --create BASE.safetensors OUT_DIR --rank R|full [--alpha A] [--seed S] [--name NAME]
//                 MODULE:KIND...
//       writes a new adapter over the base for the modules given (KIND: linear, conv2d, embedding,
//       conv1d), with seeded random z and sigma: an adapter written from C++.
// Exit status: 0 on success, 1 on a refused input (the message names the file and the layer) or any
// other failure (out of memory included), 2 on bad usage: an unknown flag, or a value out of its
// range (--swaps 0 to 1e9, --rank 1 to 2^31 - 1, --seed 0 to 2^64 - 1, --alpha a finite number, --name
// spec::kAdapterNamePattern, as the Python loader requires), with a message naming the flag.
#include <loldu/loldu.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <regex>
#include <string>
#include <vector>

namespace {

// A flag's value that does not parse or is out of range: exit 2 with this message.
struct BadValue {
  std::string message;
};

// `text` as an integer in [lo, hi], whole (no sign where lo >= 0, no trailing characters).
template <class T>
T integer_flag(const std::string& flag, const std::string& text, T lo, T hi) {
  T v{};
  const char* end = text.data() + text.size();
  const auto res = std::from_chars(text.data(), end, v);
  if (res.ec != std::errc() || res.ptr != end || v < lo || v > hi)
    throw BadValue{flag + " must be an integer from " + std::to_string(lo) + " to " + std::to_string(hi) + ", got '" +
                   text + "'"};
  return v;
}

double finite_flag(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const double v = text.empty() ? 0.0 : std::strtod(text.c_str(), &end);
  if (text.empty() || end != text.c_str() + text.size() || !std::isfinite(v) || errno == ERANGE)
    throw BadValue{flag + " must be a finite number, got '" + text + "'"};
  return v;
}

int usage() {
  std::fprintf(stderr,
               "usage: apply_adapter BASE.safetensors ADAPTER_DIR OUT.safetensors\n"
               "       apply_adapter --swap BASE.safetensors ADAPTER_A ADAPTER_B [--swaps N] [--subtract]\n"
               "       apply_adapter --check ADAPTER_DIR...\n"
               "       apply_adapter --create BASE.safetensors OUT_DIR --rank R|full [--alpha A] [--seed S] [--name NAME] "
               "MODULE:KIND...\n");
  return 2;
}

loldu::AdapterFile read(const std::string& dir) {
  std::vector<std::string> warnings;
  loldu::AdapterFile a = loldu::read_adapter(dir, &warnings);
  for (const auto& w : warnings) std::fprintf(stderr, "apply_adapter: warning: %s\n", w.c_str());
  return a;
}

// "rank r" when every layer has rank r, else "ranks a to b".
std::string ranks_text(const loldu::AdapterFile& a) {
  int64_t lo = INT64_MAX, hi = 0;
  for (size_t i = 0; i < a.layers.size(); ++i) {
    lo = std::min(lo, a.layer_rank(i));
    hi = std::max(hi, a.layer_rank(i));
  }
  return lo == hi ? "rank " + std::to_string(lo) : "ranks " + std::to_string(lo) + " to " + std::to_string(hi);
}

int merge_to_file(const std::string& base, const std::string& dir, const std::string& out) {
  std::map<std::string, std::string> metadata;
  loldu::WeightMap weights = loldu::load_weights(base, &metadata);
  const loldu::AdapterFile a = read(dir);
  loldu::MergeOptions opts;
  opts.keep_base = false;  // written once: no unmerge
  loldu::merge_adapter(weights, a, opts);
  loldu::save_weights(out, weights, metadata);
  std::printf("merged adapter '%s' (%zu layers, %s, %zu saved tensors) into %s -> %s\n", a.adapter_name.c_str(),
              a.layers.size(), ranks_text(a).c_str(), a.saved_tensors.size(), base.c_str(), out.c_str());
  return 0;
}

double max_drift(const loldu::WeightMap& now, const loldu::WeightMap& original, std::string& worst) {
  if (now.size() != original.size()) throw loldu::AdapterError("the weight map gained or lost entries");
  double drift = 0;
  for (const auto& kv : original) {
    auto it = now.find(kv.first);
    if (it == now.end()) throw loldu::AdapterError("'" + kv.first + "' is missing after unmerge");
    if (!kv.second.is_floating_point()) {
      if (!kv.second.equal(it->second)) {
        worst = kv.first;
        return std::numeric_limits<double>::infinity();
      }
      continue;
    }
    const double d = (it->second.to(at::kDouble) - kv.second.to(at::kDouble)).abs().max().item<double>();
    if (d > drift) {
      drift = d;
      worst = kv.first;
    }
  }
  return drift;
}

int swap(const std::string& base, const std::string& dir_a, const std::string& dir_b, long swaps, bool subtract) {
  loldu::WeightMap weights = loldu::load_weights(base);
  loldu::WeightMap original;
  for (const auto& kv : weights) original[kv.first] = kv.second.clone();
  const loldu::AdapterFile a = read(dir_a), b = read(dir_b);
  loldu::MergeOptions opts;
  opts.keep_base = !subtract;
  loldu::MergeRecord rec = loldu::merge_adapter(weights, a, opts);
  std::vector<double> ms;
  ms.reserve(size_t(swaps));
  for (long i = 0; i < swaps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    rec = loldu::swap_adapter(weights, rec, i % 2 == 0 ? b : a);
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  loldu::unmerge_adapter(weights, rec);
  std::string worst;
  const double drift = max_drift(weights, original, worst);
  std::sort(ms.begin(), ms.end());
  double total = 0;
  for (double m : ms) total += m;
  std::printf("swap: %ld swaps between '%s' and '%s' (%zu and %zu layers), %s unmerge\n", swaps, a.adapter_name.c_str(),
              b.adapter_name.c_str(), a.layers.size(), b.layers.size(), subtract ? "subtracting" : "restoring");
  if (swaps > 0)
    std::printf("time per swap: mean %.3f ms, median %.3f ms, max %.3f ms\n", total / double(swaps), ms[ms.size() / 2],
                ms.back());
  std::printf("max drift after %ld swaps and unmerge: %.9g (max |W - W0| over all weights%s%s)\n", swaps, drift,
              worst.empty() ? "" : ", at ", worst.c_str());
  return 0;
}

int check(const std::vector<std::string>& dirs) {
  int refused = 0;
  for (const auto& dir : dirs) {
    try {
      const loldu::AdapterFile a = read(dir);
      // One rank and one sigma0: said once; per-layer ranks or scales (rank "full", the patterns): per layer.
      bool uniform = true;
      for (const auto& l : a.layers)
        uniform = uniform && l.rank == a.layers[0].rank &&
                  a.config.scale_for(l.name, l.rank) == a.config.scale_for(a.layers[0].name, a.layers[0].rank);
      char s0[40] = "per layer";
      if (uniform) std::snprintf(s0, sizeof s0, "%.9g", double(a.config.scale_for(a.layers[0].name, a.layers[0].rank)));
      std::printf("%s: ok: adapter '%s', format %d, %s, sigma0 %s, %zu layers, %zu saved tensors\n", dir.c_str(),
                  a.adapter_name.c_str(), a.format_version, ranks_text(a).c_str(), s0, a.layers.size(),
                  a.saved_tensors.size());
      for (const auto& l : a.layers) {
        std::printf("  %s: %s (%lld, %lld) %s", l.name.c_str(), l.kind.c_str(), static_cast<long long>(l.d),
                    static_cast<long long>(l.k), l.dtype.c_str());
        if (uniform) std::printf("\n");
        else std::printf(", rank %lld, sigma0 %.9g\n", static_cast<long long>(l.rank), double(a.config.scale_for(l.name, l.rank)));
      }
    } catch (const loldu::LolduError& e) {
      std::printf("%s: refused: %s\n", dir.c_str(), e.what());
      ++refused;
    }
  }
  return refused ? 1 : 0;
}

int create(const std::vector<std::string>& args) {
  if (args.size() < 2) return usage();
  const std::string base = args[0], out = args[1];
  loldu::AdapterConfig config;
  config.rank = -1;  // required; 0 is "full"
  config.train_scale = true;
  uint64_t seed = 0;
  std::string name = "default";
  std::vector<std::pair<std::string, std::string>> targets;
  for (size_t i = 2; i < args.size(); ++i) {
    const bool has_value = i + 1 < args.size();
    if (args[i] == "--rank" && has_value)
      config.rank = args[i + 1] == loldu::spec::kFullRank ? (++i, 0) : integer_flag<int64_t>("--rank", args[++i], 1, INT32_MAX);
    else if (args[i] == "--alpha" && has_value) config.alpha = finite_flag("--alpha", args[++i]);
    else if (args[i] == "--seed" && has_value)
      seed = integer_flag<uint64_t>("--seed", args[++i], 0, std::numeric_limits<uint64_t>::max());
    else if (args[i] == "--name" && has_value) {
      name = args[++i];
      if (!std::regex_match(name, std::regex(loldu::spec::kAdapterNamePattern)))
        throw BadValue{"--name must match " + std::string(loldu::spec::kAdapterNamePattern) +
                       " (letters, digits, _ and -, as the Python loader requires), got '" + name + "'"};
    }
    else if (args[i].find(':') != std::string::npos && args[i][0] != '-')
      targets.emplace_back(args[i].substr(0, args[i].rfind(':')), args[i].substr(args[i].rfind(':') + 1));
    else return usage();
  }
  if (config.rank < 0 || targets.empty()) return usage();
  const loldu::WeightMap weights = loldu::load_weights(base);
  loldu::AdapterFile a = loldu::make_adapter(weights, targets, config, name);
  // Seeded random values in place of training: z = D (1 + 0.3 e), sigma = sigma0 (1 + 0.2 e').
  at::Generator gen = at::detail::createCPUGenerator(seed);
  const at::Tensor ez = at::randn({int64_t(a.z.size())}, gen, at::kFloat);
  const at::Tensor es = at::randn({int64_t(a.sigma.size())}, gen, at::kFloat);
  // Rounded to float: the values the file (z and sigma F32) holds.
  for (size_t i = 0; i < a.z.size(); ++i) a.z[i] = float(a.z[i] * (1.0f + 0.3f * ez[int64_t(i)].item<float>()));
  for (size_t i = 0; i < a.sigma.size(); ++i) a.sigma[i] = float(a.sigma[i] * (1.0f + 0.2f * es[int64_t(i)].item<float>()));
  loldu::save_adapter(out, a);
  std::printf("wrote adapter '%s' (%zu layers, %s) to %s\n", name.c_str(), a.layers.size(), ranks_text(a).c_str(),
              out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  try {
    if (args.size() == 3 && args[0].rfind("--", 0) != 0) return merge_to_file(args[0], args[1], args[2]);
    if (!args.empty() && args[0] == "--swap" && args.size() >= 4) {
      long swaps = 1000;
      bool subtract = false;
      for (size_t i = 4; i < args.size(); ++i) {
        if (args[i] == "--swaps" && i + 1 < args.size()) swaps = integer_flag<long>("--swaps", args[++i], 0, 1000000000L);
        else if (args[i] == "--subtract") subtract = true;
        else return usage();
      }
      return swap(args[1], args[2], args[3], swaps, subtract);
    }
    if (args.size() >= 2 && args[0] == "--check") return check({args.begin() + 1, args.end()});
    if (!args.empty() && args[0] == "--create") return create({args.begin() + 1, args.end()});
    return usage();
  } catch (const loldu::LolduError& e) {
    std::fprintf(stderr, "apply_adapter: %s\n", e.what());
    return 1;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "apply_adapter: %s\n", e.what_without_backtrace());
    return 1;
  } catch (const BadValue& e) {
    std::fprintf(stderr, "apply_adapter: %s\n", e.message.c_str());
    return 2;
  } catch (const std::exception& e) {  // out of memory and the like: a failure, not a crash
    std::fprintf(stderr, "apply_adapter: %s\n", e.what());
    return 1;
  }
}
