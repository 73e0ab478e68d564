// SHA-256 (FIPS 180-4), incremental. Torch-free: adapter files and base-weight fingerprints
// (docs/method.md §2) are hashed with it.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace loldu {

class Sha256 {
 public:
  using Digest = std::array<uint8_t, 32>;
  Sha256();
  Sha256& update(const void* data, size_t size);
  Sha256& update(const std::string& s) { return update(s.data(), s.size()); }
  // The digest of everything passed to update; the object must not be updated afterwards.
  Digest digest();

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t fill_ = 0;
  uint64_t total_ = 0;
};

Sha256::Digest sha256(const void* data, size_t size);
// Lower-case hexadecimal, as Python's hashlib hexdigest().
std::string to_hex(const Sha256::Digest& d);

}  // namespace loldu
