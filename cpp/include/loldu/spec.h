// Generated from python/loldu/adapter_spec.json by cpp/tools/gen_spec_header.py; do not edit.
// The adapter format as constants: config keys, enums and defaults, the dtype and tensor tables,
// format names and the coefficient golden vectors, shared with the Python reader (loldu.spec).
#pragma once

#include <cstddef>
#include <cstdint>

namespace loldu {
namespace spec {

// -- the format ------------------------------------------------------------------------------
inline constexpr const char* kFormat = "loldu-adapter";
inline constexpr int kFormatVersion = 4;  // the version written
inline constexpr int kReadableVersions[] = {2, 3, 4};
inline constexpr int kRaggedFrom = 4;  // per-layer ranks, z and pivots concatenated
inline constexpr int kVersionMaxDigits = 6;  // "loldu-adapter/<1 to this many digits>"
inline constexpr const char* kWeightsFile = "adapter_model.safetensors";
inline constexpr const char* kConfigFile = "loldu_config.json";  // the readable copy (format 3)
inline constexpr const char* kLegacyConfigFile = "adapter_config.json";  // its name in format 2
inline constexpr const char* kMetaFormat = "loldu_format";
inline constexpr const char* kMetaConfig = "loldu_config";
inline constexpr const char* kMetaConfigSha256 = "loldu_config_sha256";
inline constexpr const char* kMetaV1ConfigSha256 = "config_sha256";  // format 1's only key
inline constexpr const char* kMetaSafetensorsFormat[2] = {"format", "pt"};
inline constexpr const char* kLayerKinds[] = {"linear", "conv2d", "embedding", "conv1d"};
// a layer's dtype: its base weight's (str(torch dtype) without "torch."), one LoLDU factorizes
inline constexpr const char* kLayerDtypes[] = {"float32", "float64", "float16", "bfloat16"};
// an adapter's name matches pattern whole (Python re.fullmatch; ASCII letters, digits, _ and -, not starting with a digit or -)
inline constexpr const char* kAdapterNamePattern = "[A-Za-z_][A-Za-z0-9_-]*";

// -- the config (LoLDUConfig) --------------------------------------------------------------------
enum class ConfigType { Int, Targets, Number, Bool, Enum, EnumAnyCase, Names, Indexes, Rank, RankMap, NumberMap };
struct ConfigKey {
  const char* name;
  ConfigType type;
  bool nullable;      // null allowed (and the default when `required` is false)
  bool required;      // must be present (and not null)
  bool omit_default;  // left out of the written config at its default
  const char* const* values;  // the allowed values of an enum, else nullptr
  size_t num_values;
};
inline constexpr const char* kPivotingValues[] = {"partial", "none"};
inline constexpr const char* kFactorDtypeValues[] = {"float32", "float64", "float16", "bfloat16"};
inline constexpr const char* kFormValues[] = {"auto", "delta", "dense"};
inline constexpr const char* kFactorStorageValues[] = {"full", "cur", "lu"};
inline constexpr const char* kTaskTypeValues[] = {"SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"};
inline constexpr const char* kParametrizationValues[] = {"paper", "relative"};
inline constexpr ConfigKey kConfigKeys[] = {
    {"rank", ConfigType::Rank, false, false, false, nullptr, 0},
    {"target_modules", ConfigType::Targets, false, true, false, nullptr, 0},
    {"alpha", ConfigType::Number, false, false, false, nullptr, 0},
    {"sigma0", ConfigType::Number, true, false, false, nullptr, 0},
    {"train_scale", ConfigType::Bool, false, false, false, nullptr, 0},
    {"pivoting", ConfigType::Enum, false, false, false, kPivotingValues, 2},
    {"factor_dtype", ConfigType::Enum, true, false, false, kFactorDtypeValues, 4},
    {"form", ConfigType::Enum, false, false, true, kFormValues, 3},
    {"factor_storage", ConfigType::Enum, false, false, true, kFactorStorageValues, 3},
    {"modules_to_save", ConfigType::Names, true, false, true, nullptr, 0},
    {"task_type", ConfigType::EnumAnyCase, true, false, true, kTaskTypeValues, 6},
    {"parametrization", ConfigType::Enum, false, false, true, kParametrizationValues, 2},
    {"layers_to_transform", ConfigType::Indexes, true, false, true, nullptr, 0},
    {"layers_pattern", ConfigType::Names, true, false, true, nullptr, 0},
    {"rank_pattern", ConfigType::RankMap, true, false, true, nullptr, 0},
    {"alpha_pattern", ConfigType::NumberMap, true, false, true, nullptr, 0},
};
inline constexpr int64_t kDefaultRank = 8;
inline constexpr double kDefaultAlpha = 1.0;
inline constexpr bool kDefaultTrainScale = false;
inline constexpr const char* kDefaultPivoting = "partial";
inline constexpr const char* kDefaultForm = "auto";
inline constexpr const char* kDefaultFactorStorage = "full";
inline constexpr const char* kDefaultParametrization = "paper";
inline constexpr const char* kAllLinear = "all-linear";
inline constexpr const char* kFullRank = "full";  // rank: min(d, k) of each layer
// Python's str.upper() of the code points outside ASCII whose upper case is ASCII (task_type is
// matched in any case, as Python matches it).
struct UpperCase {
  uint32_t code_point;
  const char* upper;
};
inline constexpr UpperCase kUpperNonAscii[] = {
    {0x00df, "SS"},
    {0x0131, "I"},
    {0x017f, "S"},
    {0xfb00, "FF"},
    {0xfb01, "FI"},
    {0xfb02, "FL"},
    {0xfb03, "FFI"},
    {0xfb04, "FFL"},
    {0xfb05, "ST"},
    {0xfb06, "ST"},
};
struct TaskHeads {
  const char* task_type;
  const char* heads[2];  // nullptr-padded
};
inline constexpr TaskHeads kTaskHeads[] = {
    {"SEQ_CLS", {"classifier", "score"}},
    {"TOKEN_CLS", {"classifier", "score"}},
    {"QUESTION_ANS", {"qa_outputs"}},
};

// -- dtypes --------------------------------------------------------------------------------------
// A safetensors dtype: its torch name (as str(torch dtype) without "torch."), element size, and
// the bits of a non-finite element: (little-endian bits & mask) == value; mask 0 for the dtypes
// torch's is_floating_point excludes (integers, bool, complex), which are never checked.
struct Dtype {
  const char* safetensors;
  const char* torch;
  size_t size;
  uint64_t nonfinite_mask;
  uint64_t nonfinite_value;
};
inline constexpr Dtype kDtypes[] = {
    {"F64", "float64", 8, 0x7ff0000000000000ull, 0x7ff0000000000000ull},
    {"F32", "float32", 4, 0x7f800000ull, 0x7f800000ull},
    {"F16", "float16", 2, 0x7c00ull, 0x7c00ull},
    {"BF16", "bfloat16", 2, 0x7f80ull, 0x7f80ull},
    {"I64", "int64", 8, 0x0ull, 0x0ull},
    {"I32", "int32", 4, 0x0ull, 0x0ull},
    {"I16", "int16", 2, 0x0ull, 0x0ull},
    {"I8", "int8", 1, 0x0ull, 0x0ull},
    {"U8", "uint8", 1, 0x0ull, 0x0ull},
    {"BOOL", "bool", 1, 0x0ull, 0x0ull},
    {"F8_E4M3", "float8_e4m3fn", 1, 0x7full, 0x7full},
    {"F8_E4M3FNUZ", "float8_e4m3fnuz", 1, 0xffull, 0x80ull},
    {"F8_E5M2", "float8_e5m2", 1, 0x7cull, 0x7cull},
    {"F8_E5M2FNUZ", "float8_e5m2fnuz", 1, 0xffull, 0x80ull},
    {"C64", "complex64", 8, 0x0ull, 0x0ull},
    {"U16", "uint16", 2, 0x0ull, 0x0ull},
    {"U32", "uint32", 4, 0x0ull, 0x0ull},
    {"U64", "uint64", 8, 0x0ull, 0x0ull},
};
// The c10::ScalarType enumerator of each kDtypes row, in the same order (for torch users).
#define LOLDU_SPEC_C10_TYPES(X) X(Double) X(Float) X(Half) X(BFloat16) X(Long) X(Int) X(Short) X(Char) X(Byte) X(Bool) X(Float8_e4m3fn) X(Float8_e4m3fnuz) X(Float8_e5m2) X(Float8_e5m2fnuz) X(ComplexFloat) X(UInt16) X(UInt32) X(UInt64)

// -- the tensors of an adapter file --------------------------------------------------------------
inline constexpr const char* kSavedPrefix = "saved.";  // "saved.<module>.<tensor>"
inline constexpr int64_t kDimLayers = -1;  // a dimension of L, the number of layers
inline constexpr int64_t kDimRank = -2;    // a dimension of r, the rank (before kRaggedFrom)
inline constexpr int64_t kDimRanks = -3;   // a dimension of R, the sum of the layers' ranks
struct TensorSpec {
  const char* name;
  const char* dtype;  // safetensors name, the one written for fp32 layers
  const char* dtypes[2];  // every dtype allowed (nullptr-padded)
  size_t ndim;
  int64_t dims[2];  // kDimLayers, kDimRanks or a size
  size_t ndim_before_ragged;  // the shape in formats before kRaggedFrom
  int64_t dims_before_ragged[2];  // kDimLayers, kDimRank or a size
};
inline constexpr TensorSpec kTensors[] = {
    {"z", "F32", {"F32", "F64"}, 1, {kDimRanks, 0}, 2, {kDimLayers, kDimRank}},
    {"sigma", "F32", {"F32", "F64"}, 1, {kDimLayers, 0}, 1, {kDimLayers, 0}},
    {"pivots", "I32", {"I32"}, 1, {kDimRanks, 0}, 2, {kDimLayers, kDimRank}},
    {"fingerprint", "U8", {"U8"}, 2, {kDimLayers, 32}, 2, {kDimLayers, 32}},
};
// Tensors that share one dtype (z and sigma: both F32, or both F64).
inline constexpr const char* kSameDtype[] = {"z", "sigma"};

// -- coefficients (docs/method.md §1, §9) -----------------------------------------------------------
// paper: c = sigma0 * (z - D) + (sigma - sigma0) * z
// relative: c = (sigma / sigma0) * (D * z)
// c_check: every c_i finite and |c_i| <= c_abs_max, refused otherwise at save, load and merge.
// Without W0 (save, load) D is unknown, so the term without D is checked in float64: paper sigma *
// z_i, relative (sigma / sigma0) * z_i, each finite and |.| <= c_abs_max. At merge (W0 known) c
// itself is checked in the weight's working dtype (fp32, fp64 for fp64 weights), and every merged
// weight element is finite.
inline constexpr double kCAbsMax = 1e+30;
// Golden vectors: c in fp32 and in fp64 (inputs and sigma0 exact in fp32).
struct CoefficientCase {
  const char* parametrization;
  float sigma;
  float sigma0;
  size_t n;
  float z[4];
  float D[4];
  float c_float32[4];
  double c_float64[4];
};
inline constexpr CoefficientCase kCoefficientCases[] = {
    {"paper", 0x1.3333340000000p-2f, 0x1.0000000000000p-3f, 4,
     {0x1.8000000000000p-1f, -0x1.8000000000000p+0f, 0x1.8ccccc0000000p+1f, 0x1.0624de0000000p-10f}, {0x1.0000000000000p-1f, -0x1.0000000000000p+1f, 0x1.8000000000000p+1f, 0x1.d000000000000p+2f},
     {0x1.4cccce0000000p-3f, -0x1.99999c0000000p-3f, 0x1.1c28f60000000p-1f, -0x1.cfd8ae0000000p-1f}, {0x1.4cccce0000000p-3, -0x1.99999c0000000p-3, 0x1.1c28f60a3d700p-1, -0x1.cfd8adab65c92p-1}},
    {"paper", 0x1.99999a0000000p-4f, 0x1.99999a0000000p-4f, 3,
     {0x1.99999a0000000p-4f, -0x1.6666660000000p-1f, 0x1.19999a0000000p+1f, 0}, {0x1.99999a0000000p-4f, -0x1.6666660000000p-1f, 0x1.19999a0000000p+1f, 0},
     {0x0.0p+0f, 0x0.0p+0f, 0x0.0p+0f, 0}, {0x0.0p+0, 0x0.0p+0, 0x0.0p+0, 0}},
    {"paper", 0x1.13404e0000000p-9f, 0x1.0000000000000p-4f, 3,
     {0x1.4ccccc0000000p+0f, 0x0.0p+0f, -0x1.cccccc0000000p-2f, 0}, {0x1.19999a0000000p+0f, -0x1.a666660000000p+1f, 0x1.99999a0000000p-2f, 0},
     {-0x1.0e6afe0000000p-4f, 0x1.a666660000000p-3f, -0x1.a9153a0000000p-6f, 0}, {-0x1.0e6afd4214cecp-4, 0x1.a666660000000p-3, -0x1.a91537f5eb314p-6, 0}},
    {"relative", 0x1.99999a0000000p-3f, 0x1.0000000000000p-4f, 4,
     {0x1.99999a0000000p-4f, -0x1.99999a0000000p-3f, 0x0.0p+0f, 0x1.4000000000000p+1f}, {0x1.b333340000000p+0f, -0x1.3333340000000p-2f, 0x1.4000000000000p+2f, 0x1.47ae140000000p-7f},
     {0x1.16872c0000000p-1f, 0x1.89374e0000000p-3f, 0x0.0p+0f, 0x1.47ae140000000p-4f}, {0x1.16872c10624e2p-1, 0x1.89374d9168735p-3, 0x0.0p+0, 0x1.47ae1451eb850p-4}},
    {"relative", 0x1.5555560000000p-2f, 0x1.5555560000000p-2f, 2,
     {0x0.0p+0f, 0x0.0p+0f, 0, 0}, {0x1.a666660000000p+1f, -0x1.cccccc0000000p-1f, 0, 0},
     {0x0.0p+0f, -0x0.0p+0f, 0, 0}, {0x0.0p+0, -0x0.0p+0, 0, 0}},
};

}  // namespace spec
}  // namespace loldu
