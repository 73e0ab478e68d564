// Fuzzing and replay of the torch-free adapter reader (loldu::parse_adapter), built with
// -fsanitize=address,undefined so that any out-of-bounds access, leak or undefined behaviour aborts.
//
//   fuzz_adapter_reader --fuzz SECONDS SEED [--save DIR] FILE...
//       mutates the real adapter files FILE... in a seeded random loop for SECONDS: byte-level
//       mutations (bit flips, truncation, growth, header lengths, digits, nesting) and, to reach
//       the checks behind the hashes, config and tensor edits re-signed with correct hashes. Every
//       input must be accepted or refused with a loldu::LolduError; anything else fails the run.
//       With --save, the first input of each new kind of refusal (up to 4 KiB) is written to DIR.
//   fuzz_adapter_reader --replay FILE...
//       reads each file; one whose name starts with "accept-" must be accepted, "refuse-" refused.
//       Prints "<file>: ok" or "<file>: refused: <message>" per file.
#include <loldu/adapter_file.h>
#include <loldu/sha256.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace {

using Bytes = std::vector<uint8_t>;
using nlohmann::json;

std::string base_name(const std::string& p) {
  const size_t s = p.rfind('/');
  return s == std::string::npos ? p : p.substr(s + 1);
}

// Outcome of one parse: "" when accepted, else the error message. Any exception that is not a
// loldu::LolduError is a bug: reported through `bug`.
std::string outcome(const Bytes& b, bool& bug, std::string& bug_what) {
  try {
    loldu::parse_adapter(b.data(), b.size(), "input");
    return "";
  } catch (const loldu::LolduError& e) {
    return std::string("refused: ") + e.what();
  } catch (const std::exception& e) {
    bug = true;
    bug_what = std::string("unexpected ") + typeid(e).name() + ": " + e.what();
  } catch (...) {
    bug = true;
    bug_what = "unexpected non-standard exception";
  }
  return "bug";
}

// A refusal's kind: its message without numbers and quoted names, so one check counts once.
std::string signature(const std::string& msg) {
  std::string s;
  bool quoted = false;
  for (char c : msg) {
    if (c == '\'') {
      quoted = !quoted;
      s += c;
    } else if (!quoted && !(c >= '0' && c <= '9')) {
      s += c;
    }
    if (s.size() > 90) break;
  }
  return s;
}

Bytes read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return Bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// -- re-signed edits: change the config or a tensor, then fix both hashes ---------------------
std::string hex(const loldu::Sha256::Digest& d) { return loldu::to_hex(d); }

struct Parsed {
  std::map<std::string, std::string> meta;
  std::map<std::string, loldu::SafetensorsTensor> tensors;
  std::map<std::string, Bytes> data;
};

bool split(const Bytes& b, Parsed& p) {
  try {
    auto st = loldu::parse_safetensors(b.data(), b.size(), "seed");
    p.meta = st.metadata;
    p.tensors = st.tensors;
    for (auto& kv : p.tensors) {
      p.data[kv.first] = Bytes(kv.second.data, kv.second.data + kv.second.nbytes);
      kv.second.data = p.data[kv.first].data();
    }
    return true;
  } catch (const loldu::LolduError&) {
    return false;
  }
}

Bytes resign(Parsed& p, json& header) {
  for (auto& kv : p.tensors) kv.second.data = p.data[kv.first].data();
  if (header.is_object()) header["data_sha256"] = loldu::data_hash(p.tensors);
  const std::string text = header.dump(1);
  p.meta[loldu::spec::kMetaConfig] = text;
  p.meta[loldu::spec::kMetaConfigSha256] = hex(loldu::sha256(text.data(), text.size()));
  return loldu::serialize_safetensors(p.tensors, p.meta);
}

json random_value(std::mt19937_64& rng) {
  switch (rng() % 9) {
    case 0: return nullptr;
    case 1: return true;
    case 2: return int64_t(rng() % 7) - 2;
    case 3: return -1.5;
    case 4: return "x";
    case 5: return json::array();
    case 6: return json::object();
    case 7: return 1e308 * 10;  // serialized as null by nlohmann
    default: return int64_t(rng());
  }
}

// Replaces one random node of `j` (or one of its keys' values) by a random value, or drops a key.
void mutate_json(json& j, std::mt19937_64& rng, int depth = 0) {
  if ((j.is_object() || j.is_array()) && !j.empty() && depth < 4 && rng() % 4 != 0) {
    size_t i = rng() % j.size();
    auto it = j.begin();
    std::advance(it, long(i));
    if (j.is_object() && rng() % 6 == 0) {
      j.erase(it);
      return;
    }
    mutate_json(*it, rng, depth + 1);
    return;
  }
  if (j.is_object() && rng() % 3 == 0) {
    j["extra"] = random_value(rng);
    return;
  }
  j = random_value(rng);
}

Bytes semantic_mutation(const Bytes& seed, std::mt19937_64& rng) {
  Parsed p;
  if (!split(seed, p)) return seed;
  json header;
  try {
    header = json::parse(p.meta[loldu::spec::kMetaConfig]);
  } catch (const json::exception&) {
    return seed;
  }
  switch (rng() % 4) {
    case 0:
    case 1:
      mutate_json(header, rng);
      break;
    case 2: {  // a tensor's bytes: pivots out of range or repeated, NaN in z, ...
      auto it = p.data.begin();
      std::advance(it, long(rng() % p.data.size()));
      if (!it->second.empty()) {
        const size_t at = rng() % it->second.size();
        static const uint8_t vals[] = {0x00, 0x01, 0x7f, 0x80, 0xff, 0xc0};
        it->second[at] = vals[rng() % 6];
      }
      break;
    }
    default: {  // a tensor renamed, dropped, or given another dtype or shape
      auto it = p.tensors.begin();
      std::advance(it, long(rng() % p.tensors.size()));
      const std::string key = it->first;
      const int what = int(rng() % 3);
      if (what == 0) {
        auto t = it->second;
        p.tensors.erase(it);
        p.tensors["saved.x." + key] = t;
        p.data["saved.x." + key] = p.data[key];
      } else if (what == 1) {
        p.tensors.erase(it);
      } else if (it->second.dtype == loldu::spec::kTensors[0].dtype) {  // z's F32, read as pivots' I32
        it->second.dtype = loldu::spec::kTensors[2].dtype;
      } else if (!it->second.shape.empty() && it->second.shape.back() % 2 == 0) {
        it->second.shape.back() /= 2;
        it->second.shape.push_back(2);
      }
      break;
    }
  }
  return resign(p, header);
}

Bytes byte_mutation(Bytes b, std::mt19937_64& rng) {
  const int rounds = 1 + int(rng() % 3);
  for (int k = 0; k < rounds; ++k) {
    const size_t n = b.size();
    switch (rng() % 9) {
      case 0:  // bit flip
        if (n) b[rng() % n] ^= uint8_t(1u << (rng() % 8));
        break;
      case 1:  // random byte
        if (n) b[rng() % n] = uint8_t(rng());
        break;
      case 2:  // truncate
        b.resize(n ? rng() % n : 0);
        break;
      case 3:  // grow
        for (int i = int(rng() % 64); i >= 0; --i) b.push_back(uint8_t(rng()));
        break;
      case 4: {  // header length: nearby, huge or past the end
        if (n < 8) break;
        uint64_t len = 0;
        for (int i = 7; i >= 0; --i) len = len << 8 | b[size_t(i)];
        const uint64_t choices[] = {len + 1, len - 1, len + 8, uint64_t(n), uint64_t(n) - 7, 100000001, ~uint64_t(0), 0};
        len = choices[rng() % 8];
        for (int i = 0; i < 8; ++i) b[size_t(i)] = uint8_t(len >> (8 * i));
        break;
      }
      case 5: {  // a digit in the header changed (offsets, shapes, lengths)
        std::vector<size_t> digits;
        for (size_t i = 8; i < std::min<size_t>(n, 4096); ++i)
          if (b[i] >= '0' && b[i] <= '9') digits.push_back(i);
        if (!digits.empty()) b[digits[rng() % digits.size()]] = uint8_t('0' + rng() % 10);
        break;
      }
      case 6: {  // deep nesting at a random place in the header
        if (n < 9) break;
        const size_t at = 8 + rng() % std::min<size_t>(n - 8, 512);
        const std::string open(size_t(1 + rng() % 40), rng() % 2 ? '[' : '{');
        b.insert(b.begin() + long(at), open.begin(), open.end());
        break;
      }
      case 7: {  // delete a span
        if (n < 2) break;
        const size_t at = rng() % n, len = 1 + rng() % std::min<size_t>(n - at, 32);
        b.erase(b.begin() + long(at), b.begin() + long(std::min(n, at + len)));
        break;
      }
      default: {  // duplicate a span
        if (n < 2) break;
        const size_t at = rng() % n, len = 1 + rng() % std::min<size_t>(n - at, 32);
        Bytes span(b.begin() + long(at), b.begin() + long(std::min(n, at + len)));
        b.insert(b.begin() + long(rng() % n), span.begin(), span.end());
        break;
      }
    }
  }
  return b;
}

int fuzz(double seconds, uint64_t seed, const std::string& save_dir, const std::vector<std::string>& files) {
  std::vector<Bytes> seeds;
  for (const auto& f : files) {
    const std::string name = base_name(f);
    if (name.rfind("accept-", 0) == 0) seeds.push_back(read_all(f));
  }
  if (seeds.empty()) {
    std::printf("fuzz_adapter_reader: no seed files (accept-*.safetensors) given\n");
    return 2;
  }
  std::mt19937_64 rng(seed);
  std::set<std::string> kinds;
  const auto start = std::chrono::steady_clock::now();
  long iterations = 0, accepted = 0, saved = 0;
  while (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < seconds) {
    for (int batch = 0; batch < 64; ++batch, ++iterations) {
      const Bytes& s = seeds[rng() % seeds.size()];
      const Bytes input = rng() % 3 == 0 ? semantic_mutation(s, rng) : byte_mutation(s, rng);
      bool bug = false;
      std::string what;
      const std::string out = outcome(input, bug, what);
      if (bug) {
        const std::string path = (save_dir.empty() ? std::string("/tmp") : save_dir) + "/crash-" +
                                 std::to_string(seed) + "-" + std::to_string(iterations) + ".safetensors";
        std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(input.data()), long(input.size()));
        std::printf("fuzz_adapter_reader: %s (input saved to %s)\n", what.c_str(), path.c_str());
        return 1;
      }
      if (out.empty()) ++accepted;
      const std::string kind = out.empty() ? "accepted" : signature(out);
      if (kinds.insert(kind).second && !save_dir.empty() && input.size() <= 4096) {
        const std::string path = save_dir + "/" + (out.empty() ? "accept-" : "refuse-") + "fuzz-" +
                                 std::to_string(seed) + "-" + std::to_string(iterations) + ".safetensors";
        std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(input.data()), long(input.size()));
        ++saved;
      }
    }
  }
  std::printf("fuzz_adapter_reader: seed %llu, %ld inputs in %.0f s, %ld accepted, %zu kinds of outcome, %ld saved; "
              "no crash, no unexpected exception\n",
              static_cast<unsigned long long>(seed), iterations, seconds, accepted, kinds.size(), saved);
  return 0;
}

int replay(const std::vector<std::string>& files) {
  int failures = 0;
  for (const auto& f : files) {
    const std::string name = base_name(f);
    const Bytes b = read_all(f);
    bool bug = false;
    std::string what;
    const std::string out = outcome(b, bug, what);
    std::printf("%s: %s\n", name.c_str(), bug ? what.c_str() : (out.empty() ? "ok" : out.c_str()));
    const bool want_accept = name.rfind("accept-", 0) == 0, want_refuse = name.rfind("refuse-", 0) == 0;
    if (bug || (want_accept && !out.empty()) || (want_refuse && out.empty())) {
      std::printf("  FAILED: expected %s\n", want_accept ? "acceptance" : "a refusal");
      ++failures;
    }
  }
  std::printf("fuzz_adapter_reader --replay: %zu files, %d failed\n", files.size(), failures);
  return failures ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.size() >= 2 && args[0] == "--replay") return replay({args.begin() + 1, args.end()});
  if (args.size() >= 4 && args[0] == "--fuzz") {
    const double seconds = std::stod(args[1]);
    const uint64_t seed = std::stoull(args[2]);
    std::string save;
    std::vector<std::string> files;
    for (size_t i = 3; i < args.size(); ++i) {
      if (args[i] == "--save" && i + 1 < args.size()) save = args[++i];
      else files.push_back(args[i]);
    }
    return fuzz(seconds, seed, save, files);
  }
  std::printf("usage: fuzz_adapter_reader --fuzz SECONDS SEED [--save DIR] FILE... | --replay FILE...\n");
  return 2;
}
