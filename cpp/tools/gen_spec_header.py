#!/usr/bin/env python3
"""Writes cpp/include/loldu/spec.h, the C++ view of the adapter format, from
python/loldu/adapter_spec.json (the one description both readers follow).

    python cpp/tools/gen_spec_header.py            # rewrite the header
    python cpp/tools/gen_spec_header.py --check    # exit 1 when the header is stale

Plain Python (no torch, no loldu import), so it runs before anything is built; tests/test_spec.py
fails while the checked-in header differs from what this writes.
"""
import argparse
import json
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "python" / "loldu" / "adapter_spec.json"
HEADER = ROOT / "cpp" / "include" / "loldu" / "spec.h"

_TYPES = {"int": "Int", "targets": "Targets", "number": "Number", "bool": "Bool", "enum": "Enum",
          "enum_any_case": "EnumAnyCase", "names": "Names", "indexes": "Indexes", "rank": "Rank",
          "rank_map": "RankMap", "number_map": "NumberMap"}


def _camel(key: str) -> str:
    return "".join(part.capitalize() for part in key.split("_"))


def _str(s: str) -> str:
    return json.dumps(s, ensure_ascii=True)


def _strings(items) -> str:
    return "{" + ", ".join(_str(s) for s in items) + "}"


def _literal(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    return _str(v)


def _scalar_type(v) -> str:
    return {bool: "bool", int: "int64_t", float: "double", str: "const char*"}[type(v)]


def _hex(v: float, suffix: str = "") -> str:
    return float(v).hex() + suffix


def _floats(values, n: int, suffix: str) -> str:
    return "{" + ", ".join(_hex(v, suffix) for v in values) + ", 0" * (n - len(values)) + "}"


def _format_part(spec: dict) -> list:
    f, m = spec["format"], spec["metadata"]
    return [
        "// -- the format ------------------------------------------------------------------------------",
        f"inline constexpr const char* kFormat = {_str(f['name'])};",
        f"inline constexpr int kFormatVersion = {f['version_written']};  // the version written",
        f"inline constexpr int kReadableVersions[] = {{{', '.join(map(str, f['versions_read']['cpp']))}}};",
        f"inline constexpr int kRaggedFrom = {f['ragged_from']};  // per-layer ranks, z and pivots concatenated",
        f"inline constexpr int kVersionMaxDigits = {f['version_max_digits']};  // \"loldu-adapter/<1 to this many digits>\"",
        f"inline constexpr const char* kWeightsFile = {_str(f['weights_file'])};",
        f"inline constexpr const char* kConfigFile = {_str(f['config_file'])};  // the readable copy (format 3)",
        f"inline constexpr const char* kLegacyConfigFile = {_str(f['legacy_config_file'])};  // its name in format 2",
        f"inline constexpr const char* kMetaFormat = {_str(m['format'])};",
        f"inline constexpr const char* kMetaConfig = {_str(m['config'])};",
        f"inline constexpr const char* kMetaConfigSha256 = {_str(m['config_sha256'])};",
        f"inline constexpr const char* kMetaV1ConfigSha256 = {_str(m['v1_config_sha256'])};  // format 1's only key",
        f"inline constexpr const char* kMetaSafetensorsFormat[2] = {_strings(m['safetensors_format'])};",
        f"inline constexpr const char* kLayerKinds[] = {_strings(spec['layer_kinds'])};",
        f"// {spec['layer_dtypes_about']}",
        f"inline constexpr const char* kLayerDtypes[] = {_strings(spec['layer_dtypes'])};",
        f"// {spec['adapter_name']['about']}",
        f"inline constexpr const char* kAdapterNamePattern = {_str(spec['adapter_name']['pattern'])};",
        "",
    ]


def _config_part(spec: dict) -> list:
    c = spec["config"]
    out = ["// -- the config (LoLDUConfig) --------------------------------------------------------------------",
           "enum class ConfigType { " + ", ".join(dict.fromkeys(_TYPES.values())) + " };",
           "struct ConfigKey {",
           "  const char* name;",
           "  ConfigType type;",
           "  bool nullable;      // null allowed (and the default when `required` is false)",
           "  bool required;      // must be present (and not null)",
           "  bool omit_default;  // left out of the written config at its default",
           "  const char* const* values;  // the allowed values of an enum, else nullptr",
           "  size_t num_values;",
           "};"]
    rows, defaults = [], []
    for key, k in c["keys"].items():
        values = "nullptr, 0"
        if "values" in k:
            out.append(f"inline constexpr const char* k{_camel(key)}Values[] = {_strings(k['values'])};")
            values = f"k{_camel(key)}Values, {len(k['values'])}"
        rows.append(f"    {{{_str(key)}, ConfigType::{_TYPES[k['type']]}, {_literal(bool(k.get('nullable')))}, "
                    f"{_literal(bool(k.get('required')))}, {_literal(bool(k.get('omit_default')))}, {values}}},")
        if k["default"] is not None:
            defaults.append(f"inline constexpr {_scalar_type(k['default'])} kDefault{_camel(key)} = "
                            f"{_literal(k['default'])};")
    out += ["inline constexpr ConfigKey kConfigKeys[] = {"] + rows + ["};"] + defaults
    out.append(f"inline constexpr const char* kAllLinear = {_str(c['all_linear'])};")
    out.append(f"inline constexpr const char* kFullRank = {_str(c['full_rank'])};  // rank: min(d, k) of each layer")
    out += ["// Python's str.upper() of the code points outside ASCII whose upper case is ASCII (task_type is",
            "// matched in any case, as Python matches it).",
            "struct UpperCase {", "  uint32_t code_point;", "  const char* upper;", "};",
            "inline constexpr UpperCase kUpperNonAscii[] = {"]
    out += [f"    {{0x{ord(ch):04x}, {_str(up)}}}," for ch, up in c["upper_non_ascii"].items()]
    most = max(len(h) for h in c["task_heads"].values())
    out += ["};", "struct TaskHeads {", "  const char* task_type;", f"  const char* heads[{most}];  // nullptr-padded", "};",
            "inline constexpr TaskHeads kTaskHeads[] = {"]
    out += [f"    {{{_str(t)}, {_strings(h)}}}," for t, h in c["task_heads"].items()]
    return out + ["};", ""]


def _dtype_part(spec: dict) -> list:
    out = ["// -- dtypes --------------------------------------------------------------------------------------",
           "// A safetensors dtype: its torch name (as str(torch dtype) without \"torch.\"), element size, and",
           "// the bits of a non-finite element: (little-endian bits & mask) == value; mask 0 for the dtypes",
           "// torch's is_floating_point excludes (integers, bool, complex), which are never checked.",
           "struct Dtype {", "  const char* safetensors;", "  const char* torch;", "  size_t size;",
           "  uint64_t nonfinite_mask;", "  uint64_t nonfinite_value;", "};",
           "inline constexpr Dtype kDtypes[] = {"]
    for d in spec["dtypes"]:
        mask, value = d["nonfinite"] or ("0x0", "0x0")
        out.append(f"    {{{_str(d['safetensors'])}, {_str(d['torch'])}, {d['size']}, {mask}ull, {value}ull}},")
    out += ["};", "// The c10::ScalarType enumerator of each kDtypes row, in the same order (for torch users).",
            "#define LOLDU_SPEC_C10_TYPES(X) " + " ".join(f"X({d['c10']})" for d in spec["dtypes"]), ""]
    return out


def _allowed(entry: dict) -> list:
    return entry.get("dtypes", [entry["dtype"]])


def _tensor_part(spec: dict) -> list:
    t = spec["tensors"]
    most = max(len(_allowed(e)) for e in t["table"])
    out = ["// -- the tensors of an adapter file --------------------------------------------------------------",
           f"inline constexpr const char* kSavedPrefix = {_str(t['saved_prefix'])};  // \"saved.<module>.<tensor>\"",
           "inline constexpr int64_t kDimLayers = -1;  // a dimension of L, the number of layers",
           "inline constexpr int64_t kDimRank = -2;    // a dimension of r, the rank (before kRaggedFrom)",
           "inline constexpr int64_t kDimRanks = -3;   // a dimension of R, the sum of the layers' ranks",
           "struct TensorSpec {", "  const char* name;",
           "  const char* dtype;  // safetensors name, the one written for fp32 layers",
           f"  const char* dtypes[{most}];  // every dtype allowed (nullptr-padded)",
           "  size_t ndim;", "  int64_t dims[2];  // kDimLayers, kDimRanks or a size",
           "  size_t ndim_before_ragged;  // the shape in formats before kRaggedFrom",
           "  int64_t dims_before_ragged[2];  // kDimLayers, kDimRank or a size", "};",
           "inline constexpr TensorSpec kTensors[] = {"]
    dims = {"L": "kDimLayers", "r": "kDimRank", "R": "kDimRanks"}

    def shape_of(shape):
        return [dims.get(s, str(s)) if isinstance(s, str) else str(s) for s in shape] + ["0"] * (2 - len(shape))

    for e in t["table"]:
        old = e.get("shape_before_ragged", e["shape"])
        out.append(f"    {{{_str(e['name'])}, {_str(e['dtype'])}, {_strings(_allowed(e))}, {len(e['shape'])}, "
                   f"{{{', '.join(shape_of(e['shape']))}}}, {len(old)}, {{{', '.join(shape_of(old))}}}}},")
    out += ["};", "// Tensors that share one dtype (z and sigma: both F32, or both F64).",
            f"inline constexpr const char* kSameDtype[] = {_strings(t['same_dtype'])};"]
    return out + [""]


def _coefficient_part(spec: dict) -> list:
    c = spec["coefficients"]
    n = max(len(v["z"]) for v in c["vectors"])
    out = ["// -- coefficients (docs/method.md §1, §9) -----------------------------------------------------------",
           f"// paper: c = {c['paper']}",
           f"// relative: c = {c['relative']}",
           *(f"// {line}" for line in textwrap.wrap("c_check: " + c["c_check"], 96)),
           f"inline constexpr double kCAbsMax = {_literal(float(c['c_abs_max']))};",
           "// Golden vectors: c in fp32 and in fp64 (inputs and sigma0 exact in fp32).",
           "struct CoefficientCase {", "  const char* parametrization;", "  float sigma;", "  float sigma0;",
           "  size_t n;", f"  float z[{n}];", f"  float D[{n}];", f"  float c_float32[{n}];", f"  double c_float64[{n}];",
           "};", "inline constexpr CoefficientCase kCoefficientCases[] = {"]
    for v in c["vectors"]:
        out.append(f"    {{{_str(v['parametrization'])}, {_hex(v['sigma'], 'f')}, {_hex(v['sigma0'], 'f')}, {len(v['z'])},")
        out.append(f"     {_floats(v['z'], n, 'f')}, {_floats(v['D'], n, 'f')},")
        out.append(f"     {_floats(v['c_float32'], n, 'f')}, {_floats(v['c_float64'], n, '')}}},")
    return out + ["};", ""]


def render(spec: dict) -> str:
    """The text of spec.h for the parsed adapter_spec.json `spec`."""
    lines = ["// Generated from python/loldu/adapter_spec.json by cpp/tools/gen_spec_header.py; do not edit.",
             "// The adapter format as constants: config keys, enums and defaults, the dtype and tensor tables,",
             "// format names and the coefficient golden vectors, shared with the Python reader (loldu.spec).",
             "#pragma once", "", "#include <cstddef>", "#include <cstdint>", "", "namespace loldu {",
             "namespace spec {", ""]
    for part in (_format_part, _config_part, _dtype_part, _tensor_part, _coefficient_part):
        lines += part(spec)
    return "\n".join(lines + ["}  // namespace spec", "}  // namespace loldu", ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only say whether the header is up to date")
    args = p.parse_args(argv)
    text = render(json.loads(SPEC.read_text(encoding="utf-8")))
    current = HEADER.read_text(encoding="utf-8") if HEADER.exists() else None
    if args.check:
        if current != text:
            print(f"{HEADER} is stale: run python {Path(__file__).relative_to(ROOT)}", file=sys.stderr)
            return 1
        return 0
    if current != text:
        HEADER.write_text(text, encoding="utf-8")
        print(f"wrote {HEADER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
