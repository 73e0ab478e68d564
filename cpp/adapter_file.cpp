// Adapter files (see loldu/adapter_file.h), torch-free. The checks follow the Python reader,
// python/loldu/adapter_io.py `_read`, and LoLDUConfig's validation (python/loldu/config.py).
#include <loldu/adapter_file.h>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <set>

#include <loldu/sha256.h>

#include "json_limits.h"

namespace loldu {
namespace {

using nlohmann::json;
using nlohmann::ordered_json;

constexpr const char* kFormat = "loldu-adapter";
const int kReadable[] = {2, 3};

const std::map<std::string, std::string>& torch_dtype_names() {
  static const std::map<std::string, std::string> names = {
      {"F64", "torch.float64"},     {"F32", "torch.float32"},
      {"F16", "torch.float16"},     {"BF16", "torch.bfloat16"},
      {"I64", "torch.int64"},       {"I32", "torch.int32"},
      {"I16", "torch.int16"},       {"I8", "torch.int8"},
      {"U8", "torch.uint8"},        {"BOOL", "torch.bool"},
      {"F8_E4M3", "torch.float8_e4m3fn"}, {"F8_E4M3FNUZ", "torch.float8_e4m3fnuz"},
      {"F8_E5M2", "torch.float8_e5m2"},   {"F8_E5M2FNUZ", "torch.float8_e5m2fnuz"},
      {"C64", "torch.complex64"},   {"U64", "torch.uint64"},
      {"U32", "torch.uint32"},      {"U16", "torch.uint16"}};
  return names;
}

// Python's repr of a shape tuple: "()", "(4,)", "(4, 8)".
std::string tuple_repr(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// sha256 over the tensors sorted by key of "key|torch dtype|shape repr|" and their raw bytes
// (adapter_io.py `_data_hash`).
std::string data_hash(const std::map<std::string, SafetensorsTensor>& tensors) {
  Sha256 h;
  for (const auto& kv : tensors) {  // std::map: sorted by UTF-8 bytes, i.e. by code point, as Python's sorted()
    const auto& t = kv.second;
    h.update(kv.first + "|" + torch_dtype_names().at(t.dtype) + "|" + tuple_repr(t.shape) + "|");
    if (t.nbytes) h.update(t.data, t.nbytes);
  }
  return to_hex(h.digest());
}

// Python's `isinstance(v, int)` (a bool is an int there) and `isinstance(v, (int, float))` without bool.
bool is_py_int(const json& v) { return v.is_number_integer() || v.is_boolean(); }
int64_t py_int(const json& v) { return v.is_boolean() ? int64_t(v.get<bool>()) : v.get<int64_t>(); }
bool is_number(const json& v) { return v.is_number(); }
double number(const json& v) { return v.get<double>(); }

bool number_equals(const json& v, int want) {
  if (v.is_boolean()) return int(v.get<bool>()) == want;
  return v.is_number() && v.get<double>() == double(want);
}

std::string short_repr(const json& v) {
  std::string s = v.dump();
  return s.size() <= 40 ? s : s.substr(0, 20) + "...(" + std::to_string(s.size()) + " characters)";
}

bool nonempty_strings(const json& v) {
  if (!v.is_array() || v.empty()) return false;
  for (const json& e : v)
    if (!e.is_string() || e.get<std::string>().empty()) return false;
  return true;
}

// LoLDUConfig.from_dict's checks, and the fields a merge needs.
AdapterConfig parse_config(const json& c, const std::string& where) {
  const std::string bad = where + ": invalid config: ";
  if (!c.is_object()) throw AdapterError(bad + "LoLDUConfig.from_dict: expected a dict, got " + detail::json_kind(c));
  static const std::set<std::string> known = {"rank",    "target_modules", "alpha",          "sigma0",
                                              "train_scale", "pivoting",   "factor_dtype",   "form",
                                              "factor_storage", "modules_to_save", "task_type",
                                              "parametrization"};
  std::vector<std::string> unknown;
  for (auto it = c.begin(); it != c.end(); ++it)
    if (!known.count(it.key())) unknown.push_back(it.key());
  if (!unknown.empty()) throw AdapterError(bad + "unknown key '" + unknown.front() + "' (a file from a newer loldu?)");
  AdapterConfig out;
  out.json = c.dump();
  if (c.contains("rank")) {
    const json& r = c["rank"];
    if (!r.is_number_integer() || r.get<int64_t>() < 1)
      throw AdapterError(bad + "rank must be a positive int, got " + short_repr(r));
    out.rank = r.get<int64_t>();
  }
  const json tm = c.contains("target_modules") ? c["target_modules"] : json();
  const bool tm_ok = (tm.is_string() && !tm.get<std::string>().empty()) || nonempty_strings(tm);
  if (!tm_ok)
    throw AdapterError(bad + "target_modules must be a regex str or a non-empty list of module names, got " +
                       short_repr(tm));
  if (c.contains("alpha")) {
    const json& a = c["alpha"];
    if (!is_number(a) || !std::isfinite(number(a)))
      throw AdapterError(bad + "alpha must be a finite number, got " + short_repr(a));
    out.alpha = number(a);
  }
  if (c.contains("sigma0") && !c["sigma0"].is_null()) {
    const json& s = c["sigma0"];
    if (!is_number(s) || !std::isfinite(number(s)))
      throw AdapterError(bad + "sigma0 must be a finite number, got " + short_repr(s));
    out.sigma0 = number(s);
  }
  if (!out.sigma0 && out.alpha == 0)
    throw AdapterError(bad + "alpha = 0 gives sigma0 = 0, which freezes the adapter at zero");
  const float s0 = out.initial_scale();
  if (!std::isfinite(s0)) throw AdapterError(bad + "sigma0 overflows float32");
  if (std::abs(s0) < std::numeric_limits<float>::min())
    throw AdapterError(bad + "sigma0 is zero or subnormal in float32");
  if (c.contains("train_scale")) {
    if (!c["train_scale"].is_boolean()) throw AdapterError(bad + "train_scale must be a bool");
    out.train_scale = c["train_scale"].get<bool>();
  }
  auto one_of = [&](const char* key, std::initializer_list<const char*> allowed, bool nullable,
                    const char* dflt) -> std::optional<std::string> {
    if (!c.contains(key) || (nullable && c[key].is_null())) return dflt ? std::optional<std::string>(dflt) : std::nullopt;
    const json& v = c[key];
    if (v.is_string())
      for (const char* a : allowed)
        if (v.get<std::string>() == a) return v.get<std::string>();
    std::string list;
    for (const char* a : allowed) list += std::string(list.empty() ? "" : ", ") + a;
    throw AdapterError(bad + key + " must be " + (nullable ? "null or " : "") + "one of " + list + ", got " +
                       short_repr(v));
  };
  out.pivoting = *one_of("pivoting", {"partial", "none"}, false, "partial");
  out.factor_dtype = one_of("factor_dtype", {"bfloat16", "float16", "float32", "float64"}, true, nullptr);
  one_of("form", {"auto", "delta", "dense"}, false, "auto");
  out.factor_storage = *one_of("factor_storage", {"full", "cur"}, false, "full");
  out.parametrization = *one_of("parametrization", {"paper", "relative"}, false, "paper");
  if (c.contains("task_type") && !c["task_type"].is_null() && !c["task_type"].is_string())
    throw AdapterError(bad + "task_type must be None or a str, got " + short_repr(c["task_type"]));
  if (c.contains("modules_to_save") && !c["modules_to_save"].is_null()) {
    const json& m = c["modules_to_save"];
    const bool ok = m.is_string() ? !m.get<std::string>().empty() : (m.is_array() && (m.empty() || nonempty_strings(m)));
    if (!ok) throw AdapterError(bad + "modules_to_save must be None or a list of module names, got " + short_repr(m));
  }
  return out;
}

// Whether a floating-point tensor (as torch's is_floating_point: not complex) holds no NaN/Inf;
// true for the other dtypes. Decoded from the bit patterns, little-endian.
bool all_finite(const SafetensorsTensor& t) {
  const std::string& dt = t.dtype;
  const uint8_t* p = t.data;
  const size_t n = t.nbytes;
  auto each = [&](size_t esize, auto bad) {
    for (size_t i = 0; i + esize <= n; i += esize)
      if (bad(p + i)) return false;
    return true;
  };
  auto u16 = [](const uint8_t* q) { return uint16_t(q[0] | q[1] << 8); };
  if (dt == "F64")
    return each(8, [](const uint8_t* q) { double v; std::memcpy(&v, q, 8); return !std::isfinite(v); });
  if (dt == "F32")
    return each(4, [](const uint8_t* q) { float v; std::memcpy(&v, q, 4); return !std::isfinite(v); });
  if (dt == "F16") return each(2, [&](const uint8_t* q) { return (u16(q) & 0x7c00) == 0x7c00; });
  if (dt == "BF16") return each(2, [&](const uint8_t* q) { return (u16(q) & 0x7f80) == 0x7f80; });
  if (dt == "F8_E4M3") return each(1, [](const uint8_t* q) { return (q[0] & 0x7f) == 0x7f; });
  if (dt == "F8_E5M2") return each(1, [](const uint8_t* q) { return (q[0] & 0x7c) == 0x7c; });
  if (dt == "F8_E4M3FNUZ" || dt == "F8_E5M2FNUZ") return each(1, [](const uint8_t* q) { return q[0] == 0x80; });
  return true;
}

void copy_rows(const SafetensorsTensor& t, void* dst) {
  if (t.nbytes) std::memcpy(dst, t.data, t.nbytes);
}

AdapterFile parse_checked(const uint8_t* bytes, size_t size, const std::string& where) {
  SafetensorsFile st = parse_safetensors(bytes, size, where);
  const auto& meta = st.metadata;
  auto fmt = meta.find("loldu_format");
  if (fmt == meta.end()) {
    if (meta.count("config_sha256"))
      throw AdapterError(where + ": format_version 1 is not supported by the C++ reader (it reads 2 and 3); "
                         "load and save it once with Python loldu to rewrite it in the current format");
    throw AdapterError(where + ": not a loldu adapter file (no loldu_format in its metadata)");
  }
  // "loldu-adapter/<1 to 6 ASCII digits>"
  const std::string& f = fmt->second;
  const std::string prefix = std::string(kFormat) + "/";
  const std::string digits = f.compare(0, prefix.size(), prefix) == 0 ? f.substr(prefix.size()) : "";
  const bool numeric = !digits.empty() && digits.size() <= 6 &&
                       std::all_of(digits.begin(), digits.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
  if (!numeric) throw AdapterError(where + ": not a loldu adapter file (loldu_format '" + f + "')");
  const int version = std::stoi(digits);
  if (std::find(std::begin(kReadable), std::end(kReadable), version) == std::end(kReadable))
    throw AdapterError(where + ": format_version " + std::to_string(version) +
                       " is not supported (this loldu reads 2, 3)");

  auto text_it = meta.find("loldu_config");
  auto hash_it = meta.find("loldu_config_sha256");
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

  AdapterFile out;
  out.format_version = version;
  out.source = where;
  out.config_text = text;
  out.config = parse_config(header.contains("config") ? header["config"] : json(), where);
  if (header.contains("adapter_name") && header["adapter_name"].is_string() &&
      !header["adapter_name"].get<std::string>().empty())
    out.adapter_name = header["adapter_name"].get<std::string>();
  if (header.contains("model_class") && header["model_class"].is_string())
    out.model_class = header["model_class"].get<std::string>();

  const json layers = header.contains("layers") ? header["layers"] : json();
  bool ok = layers.is_array() && !layers.empty();
  if (ok) {
    for (const json& e : layers) {
      const bool entry_ok = e.is_object() && e.contains("name") && e["name"].is_string() && e.contains("kind") &&
                            e["kind"].is_string() && e.contains("dtype") && e["dtype"].is_string() &&
                            e.contains("shape") && e["shape"].is_array() && e["shape"].size() == 2 &&
                            is_py_int(e["shape"][0]) && is_py_int(e["shape"][1]) && py_int(e["shape"][0]) > 0 &&
                            py_int(e["shape"][1]) > 0;
      if (!entry_ok) {
        ok = false;
        break;
      }
      out.layers.push_back({e["name"].get<std::string>(), e["kind"].get<std::string>(), py_int(e["shape"][0]),
                            py_int(e["shape"][1]), e["dtype"].get<std::string>()});
    }
  }
  if (!ok) throw AdapterError(where + ": 'layers' must be a non-empty list of {name, kind, shape [d, k], dtype}");
  std::set<std::string> names;
  for (const auto& l : out.layers)
    if (!names.insert(l.name).second) throw AdapterError(where + ": repeated layer names ('" + l.name + "')");

  // Saved modules (format 3): their tensors are stored as "saved.<module>.<tensor>".
  std::set<std::string> expected = {"z", "sigma", "pivots", "fingerprint"};
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
        expected.insert("saved." + s.name + "." + s.tensors.back());
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
  const int64_t L = int64_t(out.layers.size()), r = out.config.rank;
  struct Want {
    const char* key;
    const char* dtype;
    std::vector<int64_t> shape;
  };
  const Want wants[] = {{"z", "F32", {L, r}}, {"sigma", "F32", {L}}, {"pivots", "I32", {L, r}},
                        {"fingerprint", "U8", {L, 32}}};
  for (const Want& w : wants) {
    const auto& t = st.tensors.at(w.key);
    if (t.dtype != w.dtype || t.shape != w.shape)
      throw AdapterError(where + ": tensor '" + w.key + "' is " + t.dtype + " " + tuple_repr(t.shape) + ", expected " +
                         w.dtype + " " + tuple_repr(w.shape) + " (" + std::to_string(L) + " layers, rank " +
                         std::to_string(r) + ")");
  }
  if (!header.contains("data_sha256") || !header["data_sha256"].is_string() ||
      header["data_sha256"].get<std::string>() != data_hash(st.tensors))
    throw AdapterError(where + ": tensor data does not match the hash in the config: the file is corrupted");

  out.z.resize(size_t(L * r));
  out.sigma.resize(size_t(L));
  out.pivots.resize(size_t(L * r));
  out.fingerprints.resize(size_t(L));
  copy_rows(st.tensors.at("z"), out.z.data());
  copy_rows(st.tensors.at("sigma"), out.sigma.data());
  copy_rows(st.tensors.at("pivots"), out.pivots.data());
  copy_rows(st.tensors.at("fingerprint"), out.fingerprints.data());
  for (float v : out.z)
    if (!std::isfinite(v)) throw AdapterError(where + ": z or sigma holds NaN/Inf");
  for (float v : out.sigma)
    if (!std::isfinite(v)) throw AdapterError(where + ": z or sigma holds NaN/Inf");
  for (int64_t i = 0; i < L; ++i) {
    const int64_t d = out.layers[size_t(i)].d;
    std::vector<int32_t> row(out.pivots.begin() + i * r, out.pivots.begin() + (i + 1) * r);
    std::sort(row.begin(), row.end());
    const bool valid = row.front() >= 0 && int64_t(row.back()) < d && std::adjacent_find(row.begin(), row.end()) == row.end();
    if (!valid)
      throw AdapterError(where + ": layer '" + out.layers[size_t(i)].name + "': pivots must be " + std::to_string(r) +
                         " distinct rows in [0, " + std::to_string(d) + ")");
  }
  for (const auto& m : out.saved_modules)
    for (const auto& t : m.tensors) {
      const std::string key = "saved." + m.name + "." + t;
      const auto& src = st.tensors.at(key);
      if (!all_finite(src)) throw AdapterError(where + ": saved tensor '" + key + "' holds NaN/Inf");
      out.saved_tensors[key] = OwnedTensor{src.dtype, src.shape, std::vector<uint8_t>(src.data, src.data + src.nbytes)};
    }
  return out;
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

float AdapterConfig::initial_scale() const {
  const double s = sigma0 ? *sigma0 : alpha / double(rank);
  return static_cast<float>(s);
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
  if (::stat(wpath.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) throw AdapterError(wpath + ": no such adapter file");
  const std::vector<uint8_t> raw = read_file_bytes(wpath);
  AdapterFile a = parse_adapter(raw.data(), raw.size(), wpath);
  const std::string cpath = join_path(dir, a.format_version >= 3 ? kAdapterConfigName : kLegacyConfigName);
  bool copy_ok = false;
  try {
    const std::vector<uint8_t> copy = read_file_bytes(cpath);
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
  if (r < 1) throw AdapterError(what + ": rank must be a positive int, got " + std::to_string(r));
  if (int64_t(a.z.size()) != L * r || int64_t(a.sigma.size()) != L || int64_t(a.pivots.size()) != L * r ||
      int64_t(a.fingerprints.size()) != L)
    throw AdapterError(what + ": z, sigma, pivots, fingerprints must hold (" + std::to_string(L) + ", " +
                       std::to_string(r) + "), (" + std::to_string(L) + "), (" + std::to_string(L) + ", " +
                       std::to_string(r) + "), (" + std::to_string(L) + ") entries for " + std::to_string(L) +
                       " layers at rank " + std::to_string(r));
  std::map<std::string, SafetensorsTensor> tensors;
  tensors["z"] = {"F32", {L, r}, reinterpret_cast<const uint8_t*>(a.z.data()), a.z.size() * 4};
  tensors["sigma"] = {"F32", {L}, reinterpret_cast<const uint8_t*>(a.sigma.data()), a.sigma.size() * 4};
  tensors["pivots"] = {"I32", {L, r}, reinterpret_cast<const uint8_t*>(a.pivots.data()), a.pivots.size() * 4};
  tensors["fingerprint"] = {"U8", {L, 32}, a.fingerprints.empty() ? nullptr : a.fingerprints.front().data(),
                            a.fingerprints.size() * 32};
  ordered_json saved = ordered_json::array();
  for (const auto& m : a.saved_modules) {
    saved.push_back({{"name", m.name}, {"tensors", m.tensors}});
    for (const auto& t : m.tensors) {
      const std::string key = "saved." + m.name + "." + t;
      auto it = a.saved_tensors.find(key);
      if (it == a.saved_tensors.end()) throw AdapterError(what + ": saved module '" + m.name + "' lacks tensor '" + t + "'");
      if (safetensors_dtype_size(it->second.dtype) == 0)
        throw AdapterError(what + ": saved tensor '" + key + "': unknown dtype '" + it->second.dtype + "'");
      tensors[key] = {it->second.dtype, it->second.shape, it->second.bytes.data(), it->second.bytes.size()};
    }
  }
  if (tensors.size() != 4 + a.saved_tensors.size())
    throw AdapterError(what + ": saved_tensors holds tensors no saved module lists");

  ordered_json config = a.config.json.empty()
                            ? ordered_json::object()
                            : ordered_json::parse(a.config.json);  // produced by the reader: valid JSON
  ordered_json targets = ordered_json::array();
  for (const auto& l : a.layers) targets.push_back(l.name);
  config["rank"] = r;
  if (!config.contains("target_modules")) config["target_modules"] = targets;
  config["alpha"] = a.config.alpha;
  config["sigma0"] = a.config.sigma0 ? ordered_json(*a.config.sigma0) : ordered_json(nullptr);
  config["train_scale"] = a.config.train_scale;
  config["pivoting"] = a.config.pivoting;
  config["factor_dtype"] = a.config.factor_dtype ? ordered_json(*a.config.factor_dtype) : ordered_json(nullptr);
  if (a.config.factor_storage != "full" || config.contains("factor_storage")) config["factor_storage"] = a.config.factor_storage;
  if (a.config.parametrization != "paper" || config.contains("parametrization"))
    config["parametrization"] = a.config.parametrization;
  if (!a.saved_modules.empty() && !config.contains("modules_to_save")) {
    ordered_json names = ordered_json::array();
    for (const auto& m : a.saved_modules) names.push_back(m.name);
    config["modules_to_save"] = names;
  }
  ordered_json layers = ordered_json::array();
  for (const auto& l : a.layers)
    layers.push_back({{"name", l.name}, {"kind", l.kind}, {"shape", {l.d, l.k}}, {"dtype", l.dtype}});
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
      {"format", "pt"},
      {"loldu_format", std::string(kFormat) + "/" + std::to_string(kAdapterFormatVersion)},
      {"loldu_config", out.config_text},
      {"loldu_config_sha256", to_hex(sha256(out.config_text.data(), out.config_text.size()))}};
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
