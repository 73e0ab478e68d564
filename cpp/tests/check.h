// A minimal test harness: LOLDU_CHECK records a failure with its line and keeps going.
#pragma once

#include <cstdio>
#include <exception>
#include <string>

namespace loldu_test {
inline int& failures() {
  static int n = 0;
  return n;
}
inline int finish(const char* name) {
  if (failures() == 0) std::printf("%s: all checks passed\n", name);
  else std::printf("%s: %d check(s) FAILED\n", name, failures());
  return failures() == 0 ? 0 : 1;
}
// Runs f and returns the exception message, or "" when nothing was thrown.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}
}  // namespace loldu_test

#define LOLDU_CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::printf("%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);   \
      ++loldu_test::failures();                                              \
    }                                                                        \
  } while (0)
