// Private: the one place JSON text is parsed (nlohmann/json), with loldu's limits.
#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>
#include <string>

#include <loldu/errors.h>
#include <loldu/safetensors.h>

namespace loldu {
namespace detail {

// The deepest nesting of objects and arrays in [begin, end), stopping as soon as it passes `limit`:
// one linear scan of the brackets outside strings. On valid JSON this is the parser's own depth; on
// invalid text it can only say more than the parser reaches before its error, and the parser still
// refuses the text. (nlohmann's parse callback, the obvious place for the limit, rescans the
// enclosing container after each value it closes: quadratic in the number of entries.)
inline int json_depth(const char* begin, const char* end, int limit) {
  int depth = 0, deepest = 0;
  bool in_string = false;
  for (const char* p = begin; p < end && deepest <= limit; ++p) {
    const char ch = *p;
    if (in_string) {
      if (ch == '\\') ++p;  // the escaped character, a quote included, stays in the string
      else if (ch == '"') in_string = false;
    } else if (ch == '"') {
      in_string = true;
    } else if (ch == '{' || ch == '[') {
      deepest = std::max(deepest, ++depth);
    } else if (ch == '}' || ch == ']') {
      --depth;
    }
  }
  return deepest;
}

// Parses [begin, end) as one JSON value (surrounding whitespace allowed), refusing nesting deeper
// than kMaxJsonDepth. Throws AdapterError "<where>: <what> is not valid JSON (...)". Linear time.
inline nlohmann::json parse_json(const char* begin, const char* end, const std::string& where, const char* what) {
  if (json_depth(begin, end, kMaxJsonDepth) > kMaxJsonDepth)
    throw AdapterError(where + ": " + what + " is nested more than " + std::to_string(kMaxJsonDepth) +
                       " levels deep");
  try {
    return nlohmann::json::parse(begin, end);
  } catch (const nlohmann::json::exception& e) {
    throw AdapterError(where + ": " + what + " is not valid JSON (" + e.what() + ")");
  }
}

// A short description of a JSON value's type, for messages.
inline std::string json_kind(const nlohmann::json& v) {
  if (v.is_boolean()) return "a bool";
  if (v.is_number_integer()) return "an integer";
  if (v.is_number()) return "a float";
  return std::string("a ") + v.type_name();
}

}  // namespace detail
}  // namespace loldu
