// Reading and writing loldu adapter files, torch-free (plain bytes <-> structs).
//
// The format is python/loldu/adapter_spec.json's (its constants: loldu/spec.h, generated from it),
// as python/loldu/adapter_io.py writes it: a directory holding adapter_model.safetensors (the whole
// adapter) and loldu_config.json (adapter_config.json in format 2): a byte-identical readable copy
// of its config text, not needed to read it. The safetensors metadata holds "loldu_format"
// ("loldu-adapter/<version>"), "loldu_config" (the config JSON text) and "loldu_config_sha256"
// (sha256 of that text); the tensors are z (R,) and sigma (L,), both F32 or both F64, pivots (R,) I32,
// fingerprint (L, 32) U8 and, from version 3, "saved.<module>.<tensor>" for each tensor of each
// saved module (modules_to_save), in its own dtype. z and pivots are the layers' vectors concatenated
// in layer order, R the sum of the layers' ranks (version 4; before it one rank r for all layers and
// z, pivots of shape (L, r): the same bytes). The config text is {"format": "loldu-adapter",
// "format_version", "adapter_name", "model_class" (optional), "config": {LoLDUConfig}, "data_sha256",
// "layers": [{name, kind, shape [d, k], dtype, rank (version 4)}, ...], "saved_modules": [{name,
// tensors}, ...] (version 3)}. Versions 2, 3 and 4 are read; 4 is written.
//
// The reader accepts what the Python reader accepts and refuses what it refuses, with an
// AdapterError naming the file and the field: every hash (config, tensor data) is checked, every
// tensor's dtype and shape, the config's values (the keys, types and enums of adapter_spec.json;
// task_type in any case, as Python's str.upper() matches it), z and sigma finite, the term of c
// that needs no base weight (sigma z, or (sigma / sigma0) z for the relative form) finite and within
// spec::kCAbsMax (adapter_spec.json's c_check), each layer's rank (what its config gives it) and its
// pivots r distinct rows in [0, d). The one check left to Python: that a str target_modules is a
// valid Python regular expression (C++ has no Python regex engine). A rank_pattern / alpha_pattern key
// is matched as a regular expression with std::regex (ECMAScript), which agrees with Python's re on
// the syntax module names need (., *, +, ?, [], (), |, \d); a key only Python parses is matched by
// name and '.'-suffix alone.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <loldu/errors.h>
#include <loldu/safetensors.h>
#include <loldu/spec.h>

namespace loldu {

constexpr const char* kAdapterWeightsName = spec::kWeightsFile;
constexpr const char* kAdapterConfigName = spec::kConfigFile;  // the readable copy (format 3)
constexpr const char* kLegacyConfigName = spec::kLegacyConfigFile;  // its name in format 2
constexpr int kAdapterFormatVersion = spec::kFormatVersion;

// One adapted matrix: the module's name in the model, its kind ("linear", "conv2d", "embedding",
// "conv1d"), the (d, k) matrix LoLDU factorizes (docs/method.md §0) and the base weight's dtype
// ("float32", "float16", "bfloat16", "float64").
struct AdapterLayer {
  std::string name;
  std::string kind;
  int64_t d = 0;
  int64_t k = 0;
  std::string dtype;
  // Its rank: set by the reader; 0 in an adapter built in C++ means the config's (rank_for).
  int64_t rank = 0;
};

// A module trained fully and stored whole (modules_to_save): its tensors replace the base's
// "<name>.<tensor>" entries when merging.
struct SavedModule {
  std::string name;
  std::vector<std::string> tensors;
};

// A saved tensor, owning its bytes (little-endian, row-major).
struct OwnedTensor {
  std::string dtype;  // safetensors dtype name: "F32", "BF16", "I64", ...
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

// The LoLDUConfig fields a merge needs, and the whole config object as JSON text.
struct AdapterConfig {
  int64_t rank = spec::kDefaultRank;  // 0: "full", min(d, k) of each layer
  // PEFT's per-module overrides, in the config's order: rank (0: "full") and alpha by module-name key.
  std::vector<std::pair<std::string, int64_t>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  double alpha = spec::kDefaultAlpha;
  std::optional<double> sigma0;
  bool train_scale = spec::kDefaultTrainScale;
  std::string pivoting = spec::kDefaultPivoting;
  std::optional<std::string> factor_dtype;  // storage dtype of PL and U; none: the weight's dtype
  std::string factor_storage = spec::kDefaultFactorStorage;  // "full" (PL, U stored) or "cur" (formed from W0 when merging)
  // How z and sigma give c (docs/method.md §1, §9): "paper", c = sigma z - sigma0 D (z starts at D),
  // or "relative", c = (sigma / sigma0) D z (z starts at 0).
  std::string parametrization = spec::kDefaultParametrization;
  // The "config" object as stored (other keys such as target_modules are kept for writing back);
  // empty for a config built in C++, where the writer lists the layers as target_modules.
  std::string json;
  // sigma0 as the Python side uses it: float32(sigma0 if set, else alpha / rank), for one int rank
  // and no alpha_pattern; scale_for gives each layer's.
  float initial_scale() const;
  // The rank of layer `name` with a (d, k) weight (LoLDUConfig.rank_for): rank_pattern's value for
  // it, else rank; "full" (0) is min(d, k). Not checked against min(d, k).
  int64_t rank_for(const std::string& name, int64_t d, int64_t k) const;
  // The initial scale of layer `name` at rank `rank`: float32(sigma0, else alpha_pattern's value
  // for it or alpha, divided by rank).
  float scale_for(const std::string& name, int64_t rank) const;
};

struct AdapterFile {
  int format_version = kAdapterFormatVersion;
  std::string adapter_name = "default";
  std::string model_class;  // the Python model's class name, when recorded ("" otherwise)
  AdapterConfig config;
  std::vector<AdapterLayer> layers;  // L layers, in file order
  // z and sigma as stored in z_dtype, "F32" (layers trained in fp32 or lower) or "F64" (layers
  // trained in fp64); the writer stores them in z_dtype, rounding to float for "F32".
  std::string z_dtype = spec::kTensors[0].dtype;
  std::vector<double> z;             // (R,): the layers' vectors, concatenated in layer order
  std::vector<double> sigma;         // (L,)
  std::vector<int32_t> pivots;       // (R,), as z
  std::vector<std::array<uint8_t, 32>> fingerprints;  // (L,): sha256 of what the factorization reads
  std::vector<SavedModule> saved_modules;
  std::map<std::string, OwnedTensor> saved_tensors;  // by file key "saved.<module>.<tensor>"
  std::string config_text;  // the config text as read or last written
  std::string source;       // the file it was read from, for messages ("" when built in C++)

  int64_t rank() const { return config.rank; }  // the config's rank (0: "full"); a layer's: layer_rank
  size_t num_layers() const { return layers.size(); }
  int64_t layer_rank(size_t i) const;
  // Where each layer's entries start in z and pivots, and their end: L + 1 prefix sums of the ranks.
  std::vector<size_t> offsets() const;
};

// The reader's checks of z and sigma (finite; the term of c without D within spec::kCAbsMax), also
// run by the writer and by merge on an AdapterFile built in C++. Throws AdapterError naming `where`
// and the layer.
void check_coefficient_inputs(const AdapterFile& adapter, const std::string& where);

// Parses adapter_model.safetensors given as bytes; `where` names it in errors. Fully checked.
AdapterFile parse_adapter(const uint8_t* bytes, size_t size, const std::string& where);

// Reads the adapter directory `dir`. A missing or differing config copy is ignored, with
// one line appended to `warnings` (when given), as the Python reader warns.
AdapterFile read_adapter(const std::string& dir, std::vector<std::string>* warnings = nullptr);

// The adapter_model.safetensors bytes of `adapter` (format 4) and its config text. Checks the
// adapter as the reader would (its own output is parsed back) and throws AdapterError otherwise.
struct SerializedAdapter {
  std::vector<uint8_t> weights;
  std::string config_text;
};
SerializedAdapter serialize_adapter(const AdapterFile& adapter);

// sha256 (hex) over `tensors` sorted by name of "<name>|<torch dtype>|<shape repr>|" and their bytes:
// the "data_sha256" of the config text (python/loldu/adapter_io.py `_data_hash`).
std::string data_hash(const std::map<std::string, SafetensorsTensor>& tensors);

// Writes `adapter` into `dir` (created if missing): adapter_model.safetensors first, by an atomic
// rename (the commit), then loldu_config.json; a loldu adapter_config.json of format 2 there is
// removed. Nothing is written when the adapter is invalid.
void save_adapter(const std::string& dir, const AdapterFile& adapter);

}  // namespace loldu
