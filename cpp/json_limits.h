// Private: the one place JSON text is parsed (nlohmann/json), with loldu's limits.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

#include <loldu/errors.h>
#include <loldu/safetensors.h>

namespace loldu {
namespace detail {

struct JsonTooDeep {};

// Parses [begin, end) as one JSON value (surrounding whitespace allowed), refusing nesting deeper
// than kMaxJsonDepth. Throws AdapterError "<where>: <what> is not valid JSON (...)".
inline nlohmann::json parse_json(const char* begin, const char* end, const std::string& where, const char* what) {
  auto limit = [](int depth, nlohmann::json::parse_event_t event, nlohmann::json&) {
    if ((event == nlohmann::json::parse_event_t::object_start || event == nlohmann::json::parse_event_t::array_start) &&
        depth >= kMaxJsonDepth)
      throw JsonTooDeep{};
    return true;
  };
  try {
    return nlohmann::json::parse(begin, end, limit);
  } catch (const JsonTooDeep&) {
    throw AdapterError(where + ": " + what + " is nested more than " + std::to_string(kMaxJsonDepth) +
                       " levels deep");
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
