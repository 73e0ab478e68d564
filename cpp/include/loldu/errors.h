// Exceptions of the C++ adapter API (the counterparts of python/loldu/errors.py). Torch-free.
// Every message names the file, layer or field at fault.
#pragma once

#include <stdexcept>
#include <string>

namespace loldu {

// Base class of every error the adapter file and merge API throws.
class LolduError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An adapter or weights file cannot be read, written, checked against a base, merged or unmerged.
class AdapterError : public LolduError {
 public:
  using LolduError::LolduError;
};

// Tensors of inconsistent shapes or dtypes.
class ShapeError : public LolduError {
 public:
  using LolduError::LolduError;
};

}  // namespace loldu
