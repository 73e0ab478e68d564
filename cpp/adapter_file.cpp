// Adapter files (see loldu/adapter_file.h), torch-free. The checks follow the Python reader,
// python/loldu/adapter_io.py `_read`, and LoLDUConfig's validation (python/loldu/config.py), both
// driven by the format's description (python/loldu/adapter_spec.json, here as loldu/spec.h).
#include <loldu/adapter_file.h>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <limits>
#include <regex>
#include <set>
#include <stdexcept>

#include <loldu/sha256.h>

#include "json_limits.h"

namespace loldu {

// safetensors.cpp: every check of read_safetensors_file that needs only the header (the file's size
// against what the header describes included); the tensors' data pointers are null.
SafetensorsFile read_safetensors_header(const std::string& path);

namespace {

using nlohmann::json;
using nlohmann::ordered_json;

using spec::kFormat;

bool number_equals(const json& v, int want) {
  if (v.is_boolean()) return int(v.get<bool>()) == want;
  return v.is_number() && v.get<double>() == double(want);
}

std::string short_repr(const json& v) {
  std::string s = v.dump();
  return s.size() <= 40 ? s : s.substr(0, 20) + "...(" + std::to_string(s.size()) + " characters)";
}

// A number as messages spell it (inf and nan as such, not JSON's null).
std::string number_text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

bool nonempty_strings(const json& v) {
  if (!v.is_array() || v.empty()) return false;
  for (const json& e : v)
    if (!e.is_string() || e.get<std::string>().empty()) return false;
  return true;
}

std::string join(const char* const* values, size_t n) {
  std::string out;
  for (size_t i = 0; i < n; ++i) out += std::string(i ? ", " : "") + values[i];
  return out;
}

// Python's str.upper() as far as it can give an ASCII word (task types are ASCII): ASCII letters, and
// the code points outside ASCII that it maps into ASCII (spec::kUpperNonAscii, e.g. U+017F -> "S").
// Any other code point can match no task type and becomes "\x01". `s` is valid UTF-8 (nlohmann
// refuses anything else).
std::string py_upper(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    const auto b = static_cast<unsigned char>(s[i]);
    if (b < 0x80) {
      out += b >= 'a' && b <= 'z' ? char(b - 'a' + 'A') : char(b);
      ++i;
      continue;
    }
    const size_t len = b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : 2;
    uint32_t cp = b & (0x7Fu >> len);
    for (size_t k = 1; k < len && i + k < s.size(); ++k) cp = cp << 6 | (static_cast<unsigned char>(s[i + k]) & 0x3Fu);
    i += len;
    const char* up = "\x01";
    for (const spec::UpperCase& u : spec::kUpperNonAscii)
      if (u.code_point == cp) up = u.upper;
    out += up;
  }
  return out;
}

// A positive int or spec::kFullRank (LoLDUConfig's rank and rank_pattern values).
bool is_rank(const json& v) {
  return v.is_string() ? v.get<std::string>() == spec::kFullRank : v.is_number_integer() && v.get<int64_t>() >= 1;
}

// A usable initial scale: finite and a normal float32 (LoLDUConfig's _scale_refusal).
bool normal_scale(float s) { return std::isfinite(s) && std::abs(s) >= std::numeric_limits<float>::min(); }

// LoLDUConfig refuses pattern keys whose regular-expression syntax Python's re and ECMAScript read
// differently; here: a key std::regex cannot parse, or one using \A, \Z, \z or a POSIX class (valid
// in both, with other meanings). Python's check (config._portable_key_problem) is the complete one.
bool portable_key(const std::string& key) {
  for (const char* odd : {"\\A", "\\Z", "\\z", "[:"})
    if (key.find(odd) != std::string::npos) return false;
  try {
    std::regex compiled(key);
    return true;
  } catch (const std::regex_error&) {
    return false;
  }
}

// Whether a rank_pattern / alpha_pattern key selects the module `name` (LoLDUConfig's key_matches):
// equal, a '.'-suffix, or a regular expression matching it whole.
bool key_matches(const std::string& key, const std::string& name) {
  if (name == key || (name.size() > key.size() && name.compare(name.size() - key.size(), key.size(), key) == 0 &&
                      name[name.size() - key.size() - 1] == '.'))
    return true;
  try {
    return std::regex_match(name, std::regex(key));
  } catch (const std::regex_error&) {
    return false;  // parse_config refuses such keys (portable_key); a config built in C++ may hold one
  }
}

// The pattern entry selecting `name`: an equal key wins, then the first key that matches (config order).
template <class V>
const std::pair<std::string, V>* pattern_entry(const std::vector<std::pair<std::string, V>>& pattern,
                                               const std::string& name) {
  for (const auto& kv : pattern)
    if (kv.first == name) return &kv;
  for (const auto& kv : pattern)
    if (key_matches(kv.first, name)) return &kv;
  return nullptr;
}

const spec::ConfigKey* config_key(const std::string& name) {
  for (const spec::ConfigKey& k : spec::kConfigKeys)
    if (name == k.name) return &k;
  return nullptr;
}

// Throws unless `v`, the value of config key `k` (not a null that `k` permits), is of its type
// (LoLDUConfig's checks, python/loldu/config.py).
void check_config_value(const spec::ConfigKey& k, const json& v, const std::string& bad) {
  const std::string key = k.name;
  const std::string got = ", got " + short_repr(v);
  switch (k.type) {
    case spec::ConfigType::Int:
      if (!v.is_number_integer() || v.get<int64_t>() < 1) throw AdapterError(bad + key + " must be a positive int" + got);
      return;
    case spec::ConfigType::Rank:
      if (!is_rank(v)) throw AdapterError(bad + key + " must be a positive int or '" + spec::kFullRank + "'" + got);
      return;
    case spec::ConfigType::RankMap:
    case spec::ConfigType::NumberMap: {  // rank_pattern / alpha_pattern: {module-name key: value}
      const bool ranks = k.type == spec::ConfigType::RankMap;
      if (!v.is_object()) throw AdapterError(bad + key + " must be None or a dict from module names to values" + got);
      for (auto it = v.begin(); it != v.end(); ++it) {
        if (it.key().empty()) throw AdapterError(bad + key + " keys must be non-empty module names");
        if (!portable_key(it.key()))
          throw AdapterError(bad + key + " key '" + it.key() + "' is not a regular expression both readers read alike");
        const json& x = it.value();
        const bool ok = ranks ? is_rank(x) : x.is_number() && std::isfinite(x.get<double>()) && x.get<double>() != 0;
        if (!ok)
          throw AdapterError(bad + key + "['" + it.key() + "'] must be " +
                             (ranks ? std::string("a positive int or '") + spec::kFullRank + "'" : "a finite nonzero number") +
                             ", got " + short_repr(x));
      }
      return;
    }
    case spec::ConfigType::Number:
      if (!v.is_number() || !std::isfinite(v.get<double>()))
        throw AdapterError(bad + key + " must be a finite number" + got);
      return;
    case spec::ConfigType::Bool:
      if (!v.is_boolean()) throw AdapterError(bad + key + " must be a bool" + got);
      return;
    case spec::ConfigType::Targets:
      if (!(v.is_string() && !v.get<std::string>().empty()) && !nonempty_strings(v))
        throw AdapterError(bad + key + " must be a regex str or a non-empty list of module names" + got);
      return;
    case spec::ConfigType::Names:
      if (v.is_string() ? v.get<std::string>().empty() : !(v.is_array() && (v.empty() || nonempty_strings(v))))
        throw AdapterError(bad + key + " must be None or a list of module names" + got);
      return;
    case spec::ConfigType::Indexes: {  // layers_to_transform: a layer number or a list of them
      auto number = [](const json& i) {
        return i.is_number_integer() && i.get<int64_t>() >= 0 && i.get<int64_t>() < (int64_t{1} << 31);  // as LoLDUConfig
      };
      if (!(number(v) || (v.is_array() && std::all_of(v.begin(), v.end(), number))))
        throw AdapterError(bad + key + " must be None, an int or a list of ints in [0, 2**31)" + got);
      return;
    }
    case spec::ConfigType::Enum:
    case spec::ConfigType::EnumAnyCase:
      if (v.is_string()) {
        const std::string s = k.type == spec::ConfigType::Enum ? v.get<std::string>() : py_upper(v.get<std::string>());
        for (size_t i = 0; i < k.num_values; ++i)
          if (s == k.values[i]) return;
      }
      throw AdapterError(bad + key + " must be " + (k.nullable ? "null or " : "") + "one of " +
                         join(k.values, k.num_values) + got);
  }
}

// LoLDUConfig.from_dict's checks, and the fields a merge needs.
AdapterConfig parse_config(const json& c, const std::string& where) {
  const std::string bad = where + ": invalid config: ";
  if (!c.is_object()) throw AdapterError(bad + "LoLDUConfig.from_dict: expected a dict, got " + detail::json_kind(c));
  for (auto it = c.begin(); it != c.end(); ++it)
    if (!config_key(it.key())) throw AdapterError(bad + "unknown key '" + it.key() + "' (a file from a newer loldu?)");
  for (const spec::ConfigKey& k : spec::kConfigKeys) {
    const bool given = c.contains(k.name) && !(k.nullable && c[k.name].is_null());
    if (given || k.required) check_config_value(k, given ? c[k.name] : json(), bad);
  }
  // Every value present is now of its key's type.
  auto value = [&](const char* key) { return c.contains(key) && !c[key].is_null() ? &c[key] : nullptr; };
  // PEFT's rules across keys (LoLDUConfig._check_layers); an empty layers_to_transform is none.
  const json* layers = value("layers_to_transform");
  if (layers && layers->is_array() && layers->empty()) layers = nullptr;
  if (value("layers_pattern") && !layers) throw AdapterError(bad + "layers_pattern is given without layers_to_transform");
  const json& targets = c["target_modules"];
  if (layers && targets.is_string() && targets.get<std::string>() != spec::kAllLinear)
    throw AdapterError(bad + "layers_to_transform cannot be used with a regex target_modules");
  AdapterConfig out;
  out.json = c.dump();
  if (auto v = value("rank")) out.rank = v->is_string() ? 0 : v->get<int64_t>();  // 0: "full"
  if (auto v = value("rank_pattern"))
    for (auto it = v->begin(); it != v->end(); ++it)
      out.rank_pattern.emplace_back(it.key(), it.value().is_string() ? 0 : it.value().get<int64_t>());
  if (auto v = value("alpha_pattern"))
    for (auto it = v->begin(); it != v->end(); ++it) out.alpha_pattern.emplace_back(it.key(), it.value().get<double>());
  if (auto v = value("alpha")) out.alpha = v->get<double>();
  if (auto v = value("sigma0")) out.sigma0 = v->get<double>();
  if (auto v = value("train_scale")) out.train_scale = v->get<bool>();
  if (auto v = value("pivoting")) out.pivoting = v->get<std::string>();
  if (auto v = value("factor_dtype")) out.factor_dtype = v->get<std::string>();
  if (auto v = value("factor_storage")) out.factor_storage = v->get<std::string>();
  if (auto v = value("parametrization")) out.parametrization = v->get<std::string>();
  if (!out.sigma0 && out.alpha == 0)
    throw AdapterError(bad + "alpha = 0 gives sigma0 = 0, which freezes the adapter at zero");
  if (out.sigma0 && !out.alpha_pattern.empty())
    throw AdapterError(bad + "alpha_pattern cannot be combined with sigma0");
  // LoLDUConfig checks the scales it knows without the layers: sigma0, or alpha (and alpha_pattern's
  // values) over one int rank; the others per layer (check_ranks).
  std::vector<double> scales;
  if (out.sigma0) scales.push_back(*out.sigma0);
  else if (out.rank > 0) {
    scales.push_back(out.alpha / double(out.rank));
    for (const auto& kv : out.alpha_pattern) scales.push_back(kv.second / double(out.rank));
  }
  for (double s : scales)
    if (!normal_scale(static_cast<float>(s))) throw AdapterError(bad + "sigma0 overflows float32 or is zero or subnormal");
  return out;
}

// Whether a floating-point tensor (as torch's is_floating_point: not complex) holds no NaN/Inf;
// true for the other dtypes. Decoded from the bit patterns (spec::Dtype), little-endian.
bool all_finite(const SafetensorsTensor& t) {
  const spec::Dtype* d = safetensors_dtype(t.dtype);
  if (!d || d->nonfinite_mask == 0) return true;
  for (size_t i = 0; i + d->size <= t.nbytes; i += d->size) {
    uint64_t bits = 0;
    for (size_t b = d->size; b-- > 0;) bits = bits << 8 | t.data[i + b];
    if ((bits & d->nonfinite_mask) == d->nonfinite_value) return false;
  }
  return true;
}

const spec::TensorSpec& tensor_spec(const std::string& name) {
  for (const spec::TensorSpec& t : spec::kTensors)
    if (name == t.name) return t;
  throw std::logic_error("loldu: no adapter tensor '" + name + "' in the spec");
}

// The shape of adapter tensor `t` in format `version` for L layers whose ranks sum to R (before
// spec::kRaggedFrom: all of rank r = R / L).
std::vector<int64_t> tensor_shape(const spec::TensorSpec& t, int64_t L, int64_t R, int version) {
  const bool ragged = version >= spec::kRaggedFrom;
  const int64_t* dims = ragged ? t.dims : t.dims_before_ragged;
  std::vector<int64_t> shape;
  for (size_t i = 0; i < (ragged ? t.ndim : t.ndim_before_ragged); ++i)
    shape.push_back(dims[i] == spec::kDimLayers ? L : dims[i] == spec::kDimRanks ? R
                    : dims[i] == spec::kDimRank ? (L ? R / L : 0) : dims[i]);
  return shape;
}

void copy_rows(const SafetensorsTensor& t, void* dst) {
  if (t.nbytes) std::memcpy(dst, t.data, t.nbytes);
}

bool dtype_allowed(const spec::TensorSpec& t, const std::string& dtype) {
  return std::any_of(std::begin(t.dtypes), std::end(t.dtypes), [&](const char* d) { return d && dtype == d; });
}

std::string allowed_dtypes(const spec::TensorSpec& t) {
  std::string out;
  for (const char* d : t.dtypes)
    if (d) out += (out.empty() ? "" : " or ") + std::string(d);
  return out;
}

std::string same_dtype_names() {
  std::string out;
  for (const char* n : spec::kSameDtype) out += (out.empty() ? "" : " and ") + std::string(n);
  return out;
}

// An F32 or F64 tensor's values (little-endian, as the hosts loldu runs on).
std::vector<double> as_doubles(const SafetensorsTensor& t) {
  if (t.dtype == tensor_spec("z").dtypes[1]) {  // the wide one (F64)
    std::vector<double> out(t.nbytes / sizeof(double));
    copy_rows(t, out.data());
    return out;
  }
  std::vector<float> f(t.nbytes / sizeof(float));
  copy_rows(t, f.data());
  return std::vector<double>(f.begin(), f.end());
}

}  // namespace

void check_coefficient_inputs(const AdapterFile& a, const std::string& where) {
  for (double v : a.z)
    if (!std::isfinite(v)) throw AdapterError(where + ": z or sigma holds NaN/Inf");
  for (double v : a.sigma)
    if (!std::isfinite(v)) throw AdapterError(where + ": z or sigma holds NaN/Inf");
  // spec::kCAbsMax: W0 (so D) is unknown here; the term of c without D must already be in bounds.
  const bool relative = a.config.parametrization == "relative";
  const std::vector<size_t> at = a.offsets();
  for (size_t i = 0; i < a.layers.size() && at[i + 1] <= a.z.size() && i < a.sigma.size(); ++i) {
    const double s0 = relative ? double(a.config.scale_for(a.layers[i].name, int64_t(at[i + 1] - at[i]))) : 1.0;
    const double scale = relative ? a.sigma[i] / s0 : a.sigma[i];
    for (size_t j = at[i]; j < at[i + 1]; ++j) {
      const double term = scale * a.z[j];
      if (!(std::abs(term) <= spec::kCAbsMax))
        throw AdapterError(where + ": layer '" + a.layers[i].name + "': " + (relative ? "sigma / sigma0 * z" : "sigma * z") +
                           " = " + number_text(term) + " at rank index " + std::to_string(j - at[i]) +
                           ": c would be non-finite or above the bound " + number_text(spec::kCAbsMax));
    }
  }
}

namespace {

// What the header of an adapter file says, checked: everything but the tensor data (whose hash,
// values and pivots parse_checked then checks), so a reader can refuse a file before reading its data.
struct CheckedHeader {
  AdapterFile adapter;        // layers, config, saved modules; no tensor values yet
  std::string data_sha256;    // "" when missing or not a string (which no data hash equals)
};

bool allowed(const char* const* values, size_t n, const std::string& s) {
  return std::any_of(values, values + n, [&](const char* v) { return s == v; });
}

// The stored adapter name: absent (null or "", loaded as "default") or matching the spec's pattern.
void check_adapter_name(const json& header, AdapterFile& out, const std::string& where) {
  if (!header.contains("adapter_name") || header["adapter_name"].is_null()) return;
  const json& name = header["adapter_name"];
  if (name.is_string() && name.get<std::string>().empty()) return;
  if (!name.is_string() || !std::regex_match(name.get<std::string>(), std::regex(spec::kAdapterNamePattern)))
    throw AdapterError(where + ": adapter_name " + short_repr(name) + " must be a str matching " +
                       spec::kAdapterNamePattern + " (letters, digits, _ or -, not starting with a digit or -)");
  out.adapter_name = name.get<std::string>();
}

// `layers`: a non-empty list of {name, kind, shape [d, k], dtype}, each kind and dtype one the spec
// allows and d, k positive ints (a bool is refused, as the Python reader refuses it).
void check_layers(const json& layers, AdapterFile& out, const std::string& where) {
  bool ok = layers.is_array() && !layers.empty();
  for (size_t i = 0; ok && i < layers.size(); ++i) {
    const json& e = layers[i];
    auto dim = [](const json& v) { return v.is_number_integer() && v.get<int64_t>() > 0; };
    ok = e.is_object() && e.contains("name") && e["name"].is_string() && e.contains("kind") && e["kind"].is_string() &&
         e.contains("dtype") && e["dtype"].is_string() && e.contains("shape") && e["shape"].is_array() &&
         e["shape"].size() == 2 && dim(e["shape"][0]) && dim(e["shape"][1]);
    if (ok)
      out.layers.push_back({e["name"].get<std::string>(), e["kind"].get<std::string>(), e["shape"][0].get<int64_t>(),
                            e["shape"][1].get<int64_t>(), e["dtype"].get<std::string>()});
  }
  if (!ok)
    throw AdapterError(where + ": 'layers' must be a non-empty list of {name, kind, shape [d, k], dtype} "
                       "(d and k positive ints)");
  for (const auto& l : out.layers) {
    if (!allowed(spec::kLayerKinds, std::size(spec::kLayerKinds), l.kind))
      throw AdapterError(where + ": layer '" + l.name + "': kind '" + l.kind + "' is not one of " +
                         join(spec::kLayerKinds, std::size(spec::kLayerKinds)));
    if (!allowed(spec::kLayerDtypes, std::size(spec::kLayerDtypes), l.dtype))
      throw AdapterError(where + ": layer '" + l.name + "': dtype '" + l.dtype + "' is not one of " +
                         join(spec::kLayerDtypes, std::size(spec::kLayerDtypes)) +
                         " (the base weight dtypes LoLDU adapts)");
  }
  std::set<std::string> names;
  for (const auto& l : out.layers)
    if (!names.insert(l.name).second) throw AdapterError(where + ": repeated layer names ('" + l.name + "')");
}

// Each layer's rank (adapter_io's check_ranks): from spec::kRaggedFrom its entry's "rank", which must
// be what the config gives the layer; before it the config's one int rank. Every layer's initial
// scale must be a normal float32. The patterns are re-read in the config's order (nlohmann's json
// sorts keys; the first matching key wins, as in Python).
void check_ranks(const json& layers, const std::string& text, int version, AdapterFile& out, const std::string& where) {
  AdapterConfig& c = out.config;
  const ordered_json ordered = ordered_json::parse(text);  // already parsed once: valid
  const ordered_json& oc = ordered["config"];
  if (!c.rank_pattern.empty()) {
    c.rank_pattern.clear();
    for (auto it = oc["rank_pattern"].begin(); it != oc["rank_pattern"].end(); ++it)
      c.rank_pattern.emplace_back(it.key(), it.value().is_string() ? 0 : it.value().get<int64_t>());
  }
  if (!c.alpha_pattern.empty()) {
    c.alpha_pattern.clear();
    for (auto it = oc["alpha_pattern"].begin(); it != oc["alpha_pattern"].end(); ++it)
      c.alpha_pattern.emplace_back(it.key(), it.value().get<double>());
  }
  if (version < spec::kRaggedFrom && (c.rank == 0 || !c.rank_pattern.empty()))
    throw AdapterError(where + ": format_version " + std::to_string(version) + " holds one int rank for all layers, "
                       "but the config has rank 'full' or a rank_pattern (per-layer ranks need format " +
                       std::to_string(spec::kRaggedFrom) + ")");
  for (size_t i = 0; i < out.layers.size(); ++i) {
    AdapterLayer& l = out.layers[i];
    const std::string layer = where + ": layer '" + l.name + "'";
    if (version < spec::kRaggedFrom) {
      l.rank = c.rank;
    } else {
      const json& e = layers[i];
      if (!e.contains("rank") || !e["rank"].is_number_integer() || e["rank"].get<int64_t>() < 1)
        throw AdapterError(layer + ": rank must be a positive int, got " + (e.contains("rank") ? short_repr(e["rank"]) : "None"));
      l.rank = e["rank"].get<int64_t>();
      const int64_t want = c.rank_for(l.name, l.d, l.k);
      if (want > std::min(l.d, l.k))
        throw AdapterError(layer + ": rank " + std::to_string(want) + " exceeds min(d, k) = " +
                           std::to_string(std::min(l.d, l.k)) + " of its weight");
      if (l.rank != want)
        throw AdapterError(layer + ": rank " + std::to_string(l.rank) + " in the file, but its config gives the layer rank " +
                           std::to_string(want));
    }
    if (!normal_scale(c.scale_for(l.name, l.rank)))
      throw AdapterError(layer + ": sigma0 = alpha / rank overflows float32 or is zero or subnormal");
  }
}

CheckedHeader check_header(const SafetensorsFile& st, const std::string& where) {
  const auto& meta = st.metadata;
  auto fmt = meta.find(spec::kMetaFormat);
  if (fmt == meta.end()) {
    if (meta.count(spec::kMetaV1ConfigSha256))
      throw AdapterError(where + ": format_version 1 is not supported by the C++ reader (it reads 2 and 3); "
                         "load and save it once with Python loldu to rewrite it in the current format");
    throw AdapterError(where + ": not a loldu adapter file (no loldu_format in its metadata)");
  }
  // "loldu-adapter/<1 to kVersionMaxDigits ASCII digits>"
  const std::string& f = fmt->second;
  const std::string prefix = std::string(kFormat) + "/";
  const std::string digits = f.compare(0, prefix.size(), prefix) == 0 ? f.substr(prefix.size()) : "";
  const bool numeric = !digits.empty() && digits.size() <= size_t(spec::kVersionMaxDigits) &&
                       std::all_of(digits.begin(), digits.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
  if (!numeric) throw AdapterError(where + ": not a loldu adapter file (loldu_format '" + f + "')");
  const int version = std::stoi(digits);
  const auto* readable = std::end(spec::kReadableVersions);
  if (std::find(std::begin(spec::kReadableVersions), readable, version) == readable) {
    std::string list;
    for (int v : spec::kReadableVersions) list += (list.empty() ? "" : ", ") + std::to_string(v);
    throw AdapterError(where + ": format_version " + std::to_string(version) + " is not supported (this loldu reads " +
                       list + ")");
  }

  auto text_it = meta.find(spec::kMetaConfig);
  auto hash_it = meta.find(spec::kMetaConfigSha256);
  if (text_it == meta.end() || hash_it == meta.end() ||
      to_hex(sha256(text_it->second.data(), text_it->second.size())) != hash_it->second)
    throw AdapterError(where + ": the config stored in the file does not match its hash: the file is corrupted");
  const std::string& text = text_it->second;
  const json header = detail::parse_json(text.data(), text.data() + text.size(), where, "the stored config");
  if (!header.is_object() || !header.contains("format") || header["format"] != kFormat)
    throw AdapterError(where + ": not a loldu adapter config (format " +
                       (header.is_object() && header.contains("format") ? short_repr(header["format"]) : "None") + ")");
  if (!header.contains("format_version") || !number_equals(header["format_version"], version))
    throw AdapterError(where + ": format_version " +
                       (header.contains("format_version") ? short_repr(header["format_version"]) : "None") +
                       " is not supported here (the weights file says " + std::to_string(version) + ")");

  CheckedHeader checked;
  AdapterFile& out = checked.adapter;
  out.format_version = version;
  out.source = where;
  out.config_text = text;
  out.config = parse_config(header.contains("config") ? header["config"] : json(), where);
  check_adapter_name(header, out, where);
  if (header.contains("model_class") && header["model_class"].is_string())
    out.model_class = header["model_class"].get<std::string>();
  check_layers(header.contains("layers") ? header["layers"] : json(), out, where);
  check_ranks(header["layers"], text, version, out, where);
  if (header.contains("data_sha256") && header["data_sha256"].is_string())
    checked.data_sha256 = header["data_sha256"].get<std::string>();

  // Saved modules (format 3): their tensors are stored as "saved.<module>.<tensor>".
  std::set<std::string> expected;
  for (const spec::TensorSpec& t : spec::kTensors) expected.insert(t.name);
  if (version >= 3 && header.contains("saved_modules")) {
    const json& sm = header["saved_modules"];
    bool sm_ok = sm.is_array();
    std::set<std::string> modules;
    for (size_t i = 0; sm_ok && i < sm.size(); ++i) {
      const json& m = sm[i];
      sm_ok = m.is_object() && m.contains("name") && m["name"].is_string() && !m["name"].get<std::string>().empty() &&
              m.contains("tensors") && m["tensors"].is_array() && (m["tensors"].empty() || nonempty_strings(m["tensors"])) &&
              modules.insert(m["name"].get<std::string>()).second;
      if (!sm_ok) break;
      SavedModule s{m["name"].get<std::string>(), {}};
      for (const json& t : m["tensors"]) {
        s.tensors.push_back(t.get<std::string>());
        expected.insert(spec::kSavedPrefix + s.name + "." + s.tensors.back());
      }
      out.saved_modules.push_back(std::move(s));
    }
    if (!sm_ok)
      throw AdapterError(where + ": 'saved_modules' must be a list of {name, tensors} with distinct names");
  }
  std::set<std::string> found;
  for (const auto& kv : st.tensors) found.insert(kv.first);
  if (found != expected) {
    std::string exp, got;
    for (const auto& s : expected) exp += (exp.empty() ? "" : ", ") + ("'" + s + "'");
    for (const auto& s : found) got += (got.empty() ? "" : ", ") + ("'" + s + "'");
    throw AdapterError(where + ": expected tensors [" + exp + "], found [" + got + "]");
  }
  const int64_t L = int64_t(out.layers.size()), R = int64_t(out.offsets().back());
  for (const spec::TensorSpec& w : spec::kTensors) {
    const auto& t = st.tensors.at(w.name);
    const std::vector<int64_t> shape = tensor_shape(w, L, R, version);
    if (!dtype_allowed(w, t.dtype) || t.shape != shape)
      throw AdapterError(where + ": tensor '" + w.name + "' is " + t.dtype + " " + tuple_repr(t.shape) + ", expected " +
                         allowed_dtypes(w) + " " + tuple_repr(shape) + " (" + std::to_string(L) + " layers, " +
                         (version >= spec::kRaggedFrom ? "ranks summing to " + std::to_string(R)
                                                       : "rank " + std::to_string(out.config.rank)) + ")");
  }
  const std::string& shared = st.tensors.at(spec::kSameDtype[0]).dtype;
  for (const char* name : spec::kSameDtype)
    if (st.tensors.at(name).dtype != shared)
      throw AdapterError(where + ": tensor '" + name + "' is " + st.tensors.at(name).dtype + " but '" +
                         spec::kSameDtype[0] + "' is " + shared + " (" + same_dtype_names() + " share one dtype)");
  return checked;
}

AdapterFile parse_checked(const uint8_t* bytes, size_t size, const std::string& where) {
  const SafetensorsFile st = parse_safetensors(bytes, size, where);
  CheckedHeader checked = check_header(st, where);
  AdapterFile& out = checked.adapter;
  const int64_t L = int64_t(out.layers.size());
  const std::vector<size_t> at = out.offsets();
  if (checked.data_sha256.empty() || checked.data_sha256 != data_hash(st.tensors))
    throw AdapterError(where + ": tensor data does not match the hash in the config: the file is corrupted");

  out.z_dtype = st.tensors.at("z").dtype;
  out.z = as_doubles(st.tensors.at("z"));
  out.sigma = as_doubles(st.tensors.at("sigma"));
  out.pivots.resize(at.back());
  out.fingerprints.resize(size_t(L));
  copy_rows(st.tensors.at("pivots"), out.pivots.data());
  copy_rows(st.tensors.at("fingerprint"), out.fingerprints.data());
  check_coefficient_inputs(out, where);
  for (int64_t i = 0; i < L; ++i) {
    const int64_t d = out.layers[size_t(i)].d;
    std::vector<int32_t> row(out.pivots.begin() + int64_t(at[size_t(i)]), out.pivots.begin() + int64_t(at[size_t(i) + 1]));
    std::sort(row.begin(), row.end());
    const bool valid = row.front() >= 0 && int64_t(row.back()) < d && std::adjacent_find(row.begin(), row.end()) == row.end();
    if (!valid)
      throw AdapterError(where + ": layer '" + out.layers[size_t(i)].name + "': pivots must be " +
                         std::to_string(row.size()) + " distinct rows in [0, " + std::to_string(d) + ")");
  }
  for (const auto& m : out.saved_modules)
    for (const auto& t : m.tensors) {
      const std::string key = spec::kSavedPrefix + m.name + "." + t;
      const auto& src = st.tensors.at(key);
      if (!all_finite(src)) throw AdapterError(where + ": saved tensor '" + key + "' holds NaN/Inf");
      out.saved_tensors[key] = OwnedTensor{src.dtype, src.shape, std::vector<uint8_t>(src.data, src.data + src.nbytes)};
    }
  return std::move(out);
}

std::string join_path(const std::string& dir, const std::string& name) {
  return dir.empty() || dir.back() == '/' ? dir + name : dir + "/" + name;
}

// Removes the adapter_config.json a format-1/2 save left beside a format-3 adapter (its copy is now
// loldu_config.json), as the Python writer does. Best effort; another tool's file of that name stays.
void remove_legacy_copy(const std::string& path) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode) || st.st_size >= (64 << 20)) return;
  try {
    const std::vector<uint8_t> b = read_file_bytes(path);
    const char* t = reinterpret_cast<const char*>(b.data());
    const json j = detail::parse_json(t, t + b.size(), path, "the config copy");
    if (j.is_object() && j.contains("format") && j["format"] == kFormat) ::unlink(path.c_str());
  } catch (const LolduError&) {
  }
}

}  // namespace

std::string data_hash(const std::map<std::string, SafetensorsTensor>& tensors) {
  Sha256 h;
  for (const auto& kv : tensors) {  // std::map: sorted by UTF-8 bytes, i.e. by code point, as Python's sorted()
    const auto& t = kv.second;
    const spec::Dtype* d = safetensors_dtype(t.dtype);
    if (!d) throw AdapterError("loldu::data_hash: tensor '" + kv.first + "': unknown dtype '" + t.dtype + "'");
    h.update(kv.first + "|torch." + d->torch + "|" + tuple_repr(t.shape) + "|");
    if (t.nbytes) h.update(t.data, t.nbytes);
  }
  return to_hex(h.digest());
}

float AdapterConfig::initial_scale() const {
  const double s = sigma0 ? *sigma0 : alpha / double(rank);
  return static_cast<float>(s);
}

int64_t AdapterConfig::rank_for(const std::string& name, int64_t d, int64_t k) const {
  const auto* e = pattern_entry(rank_pattern, name);
  const int64_t r = e ? e->second : rank;
  return r == 0 ? std::min(d, k) : r;
}

float AdapterConfig::scale_for(const std::string& name, int64_t r) const {
  if (sigma0) return static_cast<float>(*sigma0);
  const auto* e = pattern_entry(alpha_pattern, name);
  return static_cast<float>((e ? e->second : alpha) / double(r));
}

int64_t AdapterFile::layer_rank(size_t i) const {
  const AdapterLayer& l = layers.at(i);
  return l.rank > 0 ? l.rank : config.rank_for(l.name, l.d, l.k);
}

std::vector<size_t> AdapterFile::offsets() const {
  std::vector<size_t> out(layers.size() + 1, 0);
  for (size_t i = 0; i < layers.size(); ++i) out[i + 1] = out[i] + size_t(std::max<int64_t>(layer_rank(i), 0));
  return out;
}

AdapterFile parse_adapter(const uint8_t* bytes, size_t size, const std::string& where) {
  try {
    return parse_checked(bytes, size, where);
  } catch (const nlohmann::json::exception& e) {  // a check above missed a type: still the file's fault
    throw AdapterError(where + ": malformed adapter config (" + e.what() + ")");
  }
}

AdapterFile read_adapter(const std::string& dir, std::vector<std::string>* warnings) {
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    throw AdapterError(dir + ": no such adapter directory");
  const std::string wpath = join_path(dir, kAdapterWeightsName);
  if (::stat(wpath.c_str(), &st) != 0 || S_ISDIR(st.st_mode)) throw AdapterError(wpath + ": no such adapter file");
  // Everything the header says first, so a file whose size matches a wrong tensor table (a sparse
  // file of gigabytes) is refused before its data is read.
  try {
    check_header(read_safetensors_header(wpath), wpath);
  } catch (const nlohmann::json::exception& e) {
    throw AdapterError(wpath + ": malformed adapter config (" + e.what() + ")");
  }
  const std::vector<uint8_t> raw = read_safetensors_file(wpath);
  AdapterFile a = parse_adapter(raw.data(), raw.size(), wpath);
  const std::string cpath = join_path(dir, a.format_version >= 3 ? kAdapterConfigName : kLegacyConfigName);
  bool copy_ok = false;
  try {
    const std::vector<uint8_t> copy = read_file_bytes(cpath, a.config_text.size());  // longer: it differs
    copy_ok = copy.size() == a.config_text.size() && std::equal(copy.begin(), copy.end(), a.config_text.begin(),
                                                                 [](uint8_t x, char y) { return x == uint8_t(y); });
  } catch (const AdapterError&) {
  }
  if (!copy_ok && warnings)
    warnings->push_back(cpath + ": missing or differs from the config stored in " + wpath +
                        " (an interrupted save, or an edit); using the stored one");
  return a;
}

SerializedAdapter serialize_adapter(const AdapterFile& a) {
  const std::string what = "loldu::serialize_adapter";
  const int64_t L = int64_t(a.layers.size()), r = a.config.rank;
  if (L == 0) throw AdapterError(what + ": the adapter has no layers");
  if (r < 0) throw AdapterError(what + ": rank must be a positive int or 0 ('full'), got " + std::to_string(r));
  const std::vector<size_t> at = a.offsets();
  const int64_t R = int64_t(at.back());
  // Checked before the config is written: JSON has no NaN or Inf (they would be written as null).
  if (!std::isfinite(a.config.alpha))
    throw AdapterError(what + ": invalid config: alpha must be a finite number, got " + number_text(a.config.alpha));
  if (a.config.sigma0 && !std::isfinite(*a.config.sigma0))
    throw AdapterError(what + ": invalid config: sigma0 must be a finite number, got " + number_text(*a.config.sigma0));
  if (!std::regex_match(a.adapter_name, std::regex(spec::kAdapterNamePattern)))
    throw AdapterError(what + ": adapter name must match " + spec::kAdapterNamePattern +
                       " (letters, digits, _ or -, as the Python loader requires), got '" + a.adapter_name + "'");
  if (int64_t(a.z.size()) != R || int64_t(a.sigma.size()) != L || int64_t(a.pivots.size()) != R ||
      int64_t(a.fingerprints.size()) != L)
    throw AdapterError(what + ": z, sigma, pivots, fingerprints must hold " + std::to_string(R) + ", " +
                       std::to_string(L) + ", " + std::to_string(R) + ", " + std::to_string(L) + " entries for " +
                       std::to_string(L) + " layers whose ranks sum to " + std::to_string(R));
  std::map<std::string, SafetensorsTensor> tensors;
  auto put = [&](const char* name, const void* data, size_t nbytes, const std::string& dtype) {
    const spec::TensorSpec& t = tensor_spec(name);
    tensors[name] = {dtype, tensor_shape(t, L, R, kAdapterFormatVersion), static_cast<const uint8_t*>(data), nbytes};
  };
  // z and sigma in z_dtype: F32 rounds (a value past float's range becomes Inf, refused below).
  if (!dtype_allowed(tensor_spec("z"), a.z_dtype) || !dtype_allowed(tensor_spec("sigma"), a.z_dtype))
    throw AdapterError(what + ": z_dtype must be " + allowed_dtypes(tensor_spec("z")) + ", got '" + a.z_dtype + "'");
  const std::vector<float> z32(a.z.begin(), a.z.end()), sigma32(a.sigma.begin(), a.sigma.end());
  if (a.z_dtype == tensor_spec("z").dtypes[1]) {  // F64, the wide one
    put("z", a.z.data(), a.z.size() * sizeof(double), a.z_dtype);
    put("sigma", a.sigma.data(), a.sigma.size() * sizeof(double), a.z_dtype);
  } else {
    put("z", z32.data(), z32.size() * sizeof(float), tensor_spec("z").dtype);
    put("sigma", sigma32.data(), sigma32.size() * sizeof(float), tensor_spec("sigma").dtype);
  }
  put("pivots", a.pivots.data(), a.pivots.size() * sizeof(int32_t), tensor_spec("pivots").dtype);
  put("fingerprint", a.fingerprints.empty() ? nullptr : a.fingerprints.front().data(), a.fingerprints.size() * 32,
      tensor_spec("fingerprint").dtype);
  ordered_json saved = ordered_json::array();
  for (const auto& m : a.saved_modules) {
    saved.push_back({{"name", m.name}, {"tensors", m.tensors}});
    for (const auto& t : m.tensors) {
      const std::string key = spec::kSavedPrefix + m.name + "." + t;
      auto it = a.saved_tensors.find(key);
      if (it == a.saved_tensors.end()) throw AdapterError(what + ": saved module '" + m.name + "' lacks tensor '" + t + "'");
      if (safetensors_dtype_size(it->second.dtype) == 0)
        throw AdapterError(what + ": saved tensor '" + key + "': unknown dtype '" + it->second.dtype + "'");
      tensors[key] = {it->second.dtype, it->second.shape, it->second.bytes.data(), it->second.bytes.size()};
    }
  }
  if (tensors.size() != std::size(spec::kTensors) + a.saved_tensors.size())
    throw AdapterError(what + ": saved_tensors holds tensors no saved module lists");

  ordered_json config = a.config.json.empty()
                            ? ordered_json::object()
                            : ordered_json::parse(a.config.json);  // produced by the reader: valid JSON
  ordered_json targets = ordered_json::array();
  for (const auto& l : a.layers) targets.push_back(l.name);
  config["rank"] = r == 0 ? ordered_json(spec::kFullRank) : ordered_json(r);
  if (!config.contains("target_modules")) config["target_modules"] = targets;
  // The patterns in their order (left out when empty, as LoLDUConfig.to_dict leaves them out).
  auto put_pattern = [&](const char* key, const auto& pattern, auto value) {
    if (pattern.empty()) return void(config.erase(key));
    ordered_json p = ordered_json::object();
    for (const auto& kv : pattern) p[kv.first] = value(kv.second);
    config[key] = p;
  };
  put_pattern("rank_pattern", a.config.rank_pattern,
              [](int64_t v) { return v == 0 ? ordered_json(spec::kFullRank) : ordered_json(v); });
  put_pattern("alpha_pattern", a.config.alpha_pattern, [](double v) { return ordered_json(v); });
  config["alpha"] = a.config.alpha;
  config["sigma0"] = a.config.sigma0 ? ordered_json(*a.config.sigma0) : ordered_json(nullptr);
  config["train_scale"] = a.config.train_scale;
  config["pivoting"] = a.config.pivoting;
  config["factor_dtype"] = a.config.factor_dtype ? ordered_json(*a.config.factor_dtype) : ordered_json(nullptr);
  // Left out at their defaults (adapter_spec.json's omit_default), as LoLDUConfig.to_dict writes them.
  if (a.config.factor_storage != spec::kDefaultFactorStorage || config.contains("factor_storage"))
    config["factor_storage"] = a.config.factor_storage;
  if (a.config.parametrization != spec::kDefaultParametrization || config.contains("parametrization"))
    config["parametrization"] = a.config.parametrization;
  if (!a.saved_modules.empty() && !config.contains("modules_to_save")) {
    ordered_json names = ordered_json::array();
    for (const auto& m : a.saved_modules) names.push_back(m.name);
    config["modules_to_save"] = names;
  }
  ordered_json layers = ordered_json::array();
  for (size_t i = 0; i < a.layers.size(); ++i) {
    const AdapterLayer& l = a.layers[i];
    layers.push_back({{"name", l.name}, {"kind", l.kind}, {"shape", {l.d, l.k}}, {"dtype", l.dtype},
                      {"rank", int64_t(at[i + 1] - at[i])}});
  }
  ordered_json header = {{"format", kFormat},
                         {"format_version", kAdapterFormatVersion},
                         {"adapter_name", a.adapter_name}};
  if (!a.model_class.empty()) header["model_class"] = a.model_class;
  header["config"] = config;
  header["data_sha256"] = data_hash(tensors);
  header["layers"] = layers;
  header["saved_modules"] = saved;
  SerializedAdapter out;
  out.config_text = header.dump(1, ' ', /*ensure_ascii=*/true) + "\n";
  const std::map<std::string, std::string> meta = {
      {spec::kMetaSafetensorsFormat[0], spec::kMetaSafetensorsFormat[1]},
      {spec::kMetaFormat, std::string(kFormat) + "/" + std::to_string(kAdapterFormatVersion)},
      {spec::kMetaConfig, out.config_text},
      {spec::kMetaConfigSha256, to_hex(sha256(out.config_text.data(), out.config_text.size()))}};
  try {
    out.weights = serialize_safetensors(tensors, meta);
  } catch (const ShapeError& e) {
    throw AdapterError(what + ": " + e.what());
  }
  parse_adapter(out.weights.data(), out.weights.size(), what);  // the reader's checks, or AdapterError
  return out;
}

void save_adapter(const std::string& dir, const AdapterFile& adapter) {
  const SerializedAdapter s = serialize_adapter(adapter);
  std::error_code ec;
  if (std::filesystem::exists(dir, ec) && !std::filesystem::is_directory(dir, ec))
    throw AdapterError("loldu::save_adapter: '" + dir + "' exists and is not a directory");
  std::filesystem::create_directories(dir, ec);
  if (ec) throw AdapterError("loldu::save_adapter: cannot create the adapter directory '" + dir + "' (" + ec.message() + ")");
  // The weights file is the commit: renamed first, it alone is a complete adapter.
  write_file_atomic(join_path(dir, kAdapterWeightsName), s.weights);
  write_file_atomic(join_path(dir, kAdapterConfigName), std::vector<uint8_t>(s.config_text.begin(), s.config_text.end()));
  remove_legacy_copy(join_path(dir, kLegacyConfigName));
}

}  // namespace loldu
