// The safetensors format (see loldu/safetensors.h), torch-free.
#include <loldu/safetensors.h>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <random>

#include <loldu/errors.h>

#include "json_limits.h"

namespace loldu {
namespace {

using nlohmann::json;

// checked a * b for non-negative sizes; false on overflow
bool mul_ok(uint64_t a, uint64_t b, uint64_t& out) {
  if (a != 0 && b > std::numeric_limits<uint64_t>::max() / a) return false;
  out = a * b;
  return true;
}

uint64_t as_size(const json& v, const std::string& where, const std::string& field) {
  if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<int64_t>() >= 0))
    throw AdapterError(where + ": safetensors header: " + field + " must be a non-negative integer, got " +
                       detail::json_kind(v));
  return v.get<uint64_t>();
}

std::string os_reason() { return std::strerror(errno); }

}  // namespace

const spec::Dtype* safetensors_dtype(const std::string& dtype) {
  for (const spec::Dtype& d : spec::kDtypes)
    if (dtype == d.safetensors) return &d;
  return nullptr;
}

size_t safetensors_dtype_size(const std::string& dtype) {
  const spec::Dtype* d = safetensors_dtype(dtype);
  return d ? d->size : 0;
}

std::string tuple_repr(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

int64_t SafetensorsTensor::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

SafetensorsFile parse_safetensors(const uint8_t* bytes, size_t size, const std::string& where) {
  if (size < 8) throw AdapterError(where + ": truncated safetensors file (" + std::to_string(size) + " bytes)");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = n << 8 | bytes[i];
  if (n > kMaxHeaderBytes)
    throw AdapterError(where + ": safetensors header length " + std::to_string(n) + " exceeds the limit of " +
                       std::to_string(kMaxHeaderBytes) + " bytes");
  if (n > size - 8)
    throw AdapterError(where + ": safetensors header length " + std::to_string(n) + " exceeds the file size " +
                       std::to_string(size));
  const char* text = reinterpret_cast<const char*>(bytes + 8);
  if (n == 0 || text[0] != '{') throw AdapterError(where + ": safetensors header does not start with '{'");
  json header = detail::parse_json(text, text + n, where, "the safetensors header");
  if (!header.is_object()) throw AdapterError(where + ": safetensors header is not a JSON object");

  SafetensorsFile out;
  struct Range {
    uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Range> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& key = it.key();
    const json& v = it.value();
    if (key == "__metadata__") {
      if (v.is_null()) continue;
      if (!v.is_object()) throw AdapterError(where + ": safetensors header: __metadata__ must be a map of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string())
          throw AdapterError(where + ": safetensors header: __metadata__ entry '" + m.key() + "' is " +
                             detail::json_kind(m.value()) + ", expected a string");
        out.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string field = "tensor '" + key + "'";
    if (!v.is_object()) throw AdapterError(where + ": safetensors header: " + field + " is not an object");
    auto dt = v.find("dtype"), sh = v.find("shape"), off = v.find("data_offsets");
    if (dt == v.end() || sh == v.end() || off == v.end())
      throw AdapterError(where + ": safetensors header: " + field + " lacks dtype, shape or data_offsets");
    if (!dt->is_string()) throw AdapterError(where + ": safetensors header: " + field + ": dtype is not a string");
    SafetensorsTensor t;
    t.dtype = dt->get<std::string>();
    const size_t esize = safetensors_dtype_size(t.dtype);
    if (esize == 0) throw AdapterError(where + ": safetensors header: " + field + ": unknown dtype '" + t.dtype + "'");
    if (!sh->is_array()) throw AdapterError(where + ": safetensors header: " + field + ": shape is not a list");
    uint64_t numel = 1;
    for (const json& s : *sh) {
      const uint64_t dim = as_size(s, where, field + ": shape");
      if (dim > uint64_t(std::numeric_limits<int64_t>::max()) || !mul_ok(numel, dim, numel))
        throw AdapterError(where + ": safetensors header: " + field + ": shape overflows");
      t.shape.push_back(int64_t(dim));
    }
    uint64_t nbytes = 0;
    if (!mul_ok(numel, esize, nbytes))
      throw AdapterError(where + ": safetensors header: " + field + ": shape overflows");
    if (!off->is_array() || off->size() != 2)
      throw AdapterError(where + ": safetensors header: " + field + ": data_offsets must be [begin, end]");
    const uint64_t b = as_size((*off)[0], where, field + ": data_offsets"),
                   e = as_size((*off)[1], where, field + ": data_offsets");
    if (e < b)
      throw AdapterError(where + ": safetensors header: " + field + ": data_offsets [" + std::to_string(b) + ", " +
                         std::to_string(e) + "] end before begin");
    if (e - b != nbytes)
      throw AdapterError(where + ": safetensors header: " + field + ": data_offsets [" + std::to_string(b) + ", " +
                         std::to_string(e) + "] span " + std::to_string(e - b) + " bytes, but " + t.dtype +
                         " of its shape needs " + std::to_string(nbytes));
    t.nbytes = size_t(nbytes);
    auto placed = out.tensors.emplace(key, std::move(t));
    ranges.push_back({b, e, &placed.first->first});
  }
  // The tensors must tile the data exactly: sorted by offset, each starting where the last ended.
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
  const uint64_t data_size = size - 8 - n;
  uint64_t at = 0;
  for (const Range& r : ranges) {
    if (r.begin != at)
      throw AdapterError(where + ": safetensors header: tensor '" + *r.name + "': data_offsets begin at " +
                         std::to_string(r.begin) + " but the previous tensor ends at " + std::to_string(at) +
                         (r.begin < at ? " (overlap)" : " (gap)"));
    if (r.end > data_size)
      throw AdapterError(where + ": safetensors header: tensor '" + *r.name + "': data_offsets end " +
                         std::to_string(r.end) + " is past the end of the data (" + std::to_string(data_size) +
                         " bytes)");
    at = r.end;
  }
  if (at != data_size)
    throw AdapterError(where + ": safetensors data is " + std::to_string(data_size) + " bytes but the tensors cover " +
                       std::to_string(at) + " (truncated or trailing bytes)");
  const uint8_t* data = bytes + 8 + n;
  for (const Range& r : ranges) out.tensors[*r.name].data = data + r.begin;
  return out;
}

std::vector<uint8_t> serialize_safetensors(const std::map<std::string, SafetensorsTensor>& tensors,
                                           const std::map<std::string, std::string>& metadata) {
  std::vector<const std::pair<const std::string, SafetensorsTensor>*> order;
  for (const auto& kv : tensors) {
    const SafetensorsTensor& t = kv.second;
    const size_t esize = safetensors_dtype_size(t.dtype);
    if (esize == 0) throw ShapeError("serialize_safetensors: tensor '" + kv.first + "': unknown dtype '" + t.dtype + "'");
    uint64_t numel = 1;
    for (int64_t s : t.shape) {
      if (s < 0 || !mul_ok(numel, uint64_t(s), numel))
        throw ShapeError("serialize_safetensors: tensor '" + kv.first + "': bad shape");
    }
    if (numel * esize != t.nbytes || (t.nbytes > 0 && t.data == nullptr))
      throw ShapeError("serialize_safetensors: tensor '" + kv.first + "': " + std::to_string(t.nbytes) +
                       " bytes given, its dtype and shape need " + std::to_string(numel * esize));
    order.push_back(&kv);
  }
  std::stable_sort(order.begin(), order.end(), [](auto* a, auto* b) {
    return safetensors_dtype_size(a->second.dtype) > safetensors_dtype_size(b->second.dtype);
  });
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t at = 0;
  for (auto* kv : order) {
    header[kv->first] = {{"dtype", kv->second.dtype},
                         {"shape", kv->second.shape},
                         {"data_offsets", {at, at + kv->second.nbytes}}};
    at += kv->second.nbytes;
  }
  std::string text = header.dump(-1, ' ', /*ensure_ascii=*/true);
  text.append((8 - text.size() % 8) % 8, ' ');
  std::vector<uint8_t> out(8 + text.size() + at);
  const uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out[i] = uint8_t(n >> (8 * i));
  std::memcpy(out.data() + 8, text.data(), text.size());
  uint8_t* p = out.data() + 8 + text.size();
  for (auto* kv : order) {
    if (kv->second.nbytes) std::memcpy(p, kv->second.data, kv->second.nbytes);
    p += kv->second.nbytes;
  }
  return out;
}

std::vector<uint8_t> read_file_bytes(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw AdapterError(path + ": cannot open (" + os_reason() + ")");
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw AdapterError(path + ": not a regular file");
  }
  std::vector<uint8_t> out(size_t(st.st_size));
  size_t got = 0;
  while (got < out.size()) {
    const ssize_t k = ::read(fd, out.data() + got, out.size() - got);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) {
      const std::string why = k < 0 ? os_reason() : "the file shrank while being read";
      ::close(fd);
      throw AdapterError(path + ": cannot read (" + why + ")");
    }
    got += size_t(k);
  }
  ::close(fd);
  return out;
}

void write_file_atomic(const std::string& path, const std::vector<uint8_t>& bytes) {
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  struct stat st;
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
    throw AdapterError(path + ": a directory is in the way of the file; nothing was written");
  // `.<name>.<pid>-<8 chars>.tmp`, flocked while written: the temporary-file convention of
  // python/loldu/adapter_io.py, so that Python's next save to this directory removes what a killed
  // C++ writer left (this side removes only its own temporary, on failure, and never cleans others').
  std::random_device rd;
  std::string tmp;
  int fd = -1;
  for (int attempt = 0; attempt < 16 && fd < 0; ++attempt) {
    static const char* chars = "abcdefghijklmnopqrstuvwxyz0123456789";
    std::string tail;
    for (int i = 0; i < 8; ++i) tail += chars[rd() % 36];
    tmp = dir + "/." + name + "." + std::to_string(::getpid()) + "-" + tail + ".tmp";
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0) throw AdapterError(path + ": cannot create a temporary file in " + dir + " (" + os_reason() + ")");
  ::flock(fd, LOCK_EX);
  auto fail = [&](const std::string& what) {
    const std::string why = os_reason();
    ::unlink(tmp.c_str());
    ::close(fd);
    throw AdapterError(path + ": cannot " + what + " (" + why + "); the file there before, if any, is unchanged");
  };
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t k = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) fail("write");
    done += size_t(k);
  }
  if (::fsync(fd) != 0) fail("fsync");
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail("rename the temporary file over it");
  ::close(fd);
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace loldu
