// The safetensors format (see loldu/safetensors.h), torch-free.
#include <loldu/safetensors.h>

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <limits>
#include <new>
#include <random>
#include <stdexcept>

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

namespace {

uint64_t header_length(const uint8_t* bytes) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = n << 8 | bytes[i];
  return n;
}

struct Layout {
  SafetensorsFile file;                     // data pointers still null
  std::map<std::string, uint64_t> offsets;  // each tensor's offset from the start of the data
};

// Every check of parse_safetensors that needs only the header: `bytes` holds the first `have` bytes
// (at least 8 + the header length when the file is that long) of a file of `size` bytes. The
// tensors' data pointers are left null.
Layout parse_layout(const uint8_t* bytes, uint64_t have, uint64_t size, const std::string& where) {
  if (size < 8 || have < 8) throw AdapterError(where + ": truncated safetensors file (" + std::to_string(size) + " bytes)");
  const uint64_t n = header_length(bytes);
  if (n > kMaxHeaderBytes)
    throw AdapterError(where + ": safetensors header length " + std::to_string(n) + " exceeds the limit of " +
                       std::to_string(kMaxHeaderBytes) + " bytes");
  if (n > size - 8)
    throw AdapterError(where + ": safetensors header length " + std::to_string(n) + " exceeds the file size " +
                       std::to_string(size));
  if (n > have - 8) throw std::logic_error("loldu::parse_layout: the header was not read whole");
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
  Layout layout;
  for (const Range& r : ranges) layout.offsets[*r.name] = r.begin;
  layout.file = std::move(out);
  return layout;
}

}  // namespace

SafetensorsFile parse_safetensors(const uint8_t* bytes, size_t size, const std::string& where) {
  Layout layout = parse_layout(bytes, size, size, where);
  const uint8_t* data = bytes + 8 + header_length(bytes);
  for (auto& kv : layout.file.tensors) kv.second.data = data + layout.offsets.at(kv.first);
  return std::move(layout.file);
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

namespace {

std::string file_kind(mode_t m) {
  if (S_ISDIR(m)) return "a directory";
  if (S_ISFIFO(m)) return "a FIFO";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISSOCK(m)) return "a socket";
  return "not a plain file";
}

// An open descriptor of the regular file at `path` (a symlink to one is fine: model caches use
// them), with its stat in `st`. The type is checked before opening, since opening a FIFO waits for
// a writer and a device reads without end; O_NONBLOCK and the second check (same file, still
// regular) cover a swap between the two calls.
class RegularFile {
 public:
  RegularFile(const std::string& path) : path_(path) {
    struct stat before;
    if (::stat(path.c_str(), &before) != 0) throw AdapterError(path + ": cannot open (" + os_reason() + ")");
    if (!S_ISREG(before.st_mode)) throw AdapterError(path + ": not a regular file (" + file_kind(before.st_mode) + ")");
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd_ < 0) throw AdapterError(path + ": cannot open (" + os_reason() + ")");
    if (::fstat(fd_, &st_) != 0 || !S_ISREG(st_.st_mode) || st_.st_dev != before.st_dev || st_.st_ino != before.st_ino) {
      ::close(fd_);
      throw AdapterError(path + ": not a regular file (replaced while being opened)");
    }
  }
  RegularFile(const RegularFile&) = delete;
  RegularFile& operator=(const RegularFile&) = delete;
  ~RegularFile() { ::close(fd_); }
  uint64_t size() const { return uint64_t(st_.st_size); }

  // Reads `n` bytes from the current position into `dst`.
  void read(uint8_t* dst, uint64_t n) {
    uint64_t got = 0;
    while (got < n) {
      const ssize_t k = ::read(fd_, dst + got, size_t(std::min<uint64_t>(n - got, uint64_t(1) << 30)));
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) throw AdapterError(path_ + ": cannot read (" + (k < 0 ? os_reason() : "the file shrank while being read") + ")");
      got += uint64_t(k);
    }
  }

  // A buffer of `n` bytes, or AdapterError when memory runs out (a file may be larger than memory).
  std::vector<uint8_t> buffer(uint64_t n) const {
    try {
      if (n > std::numeric_limits<size_t>::max()) throw std::bad_alloc();
      return std::vector<uint8_t>(size_t(n));
    } catch (const std::bad_alloc&) {
      throw AdapterError(path_ + ": cannot hold its " + std::to_string(n) + " bytes in memory");
    } catch (const std::length_error&) {
      throw AdapterError(path_ + ": cannot hold its " + std::to_string(n) + " bytes in memory");
    }
  }

 private:
  std::string path_;
  int fd_ = -1;
  struct stat st_;
};

}  // namespace

std::vector<uint8_t> read_file_bytes(const std::string& path, uint64_t max_bytes) {
  RegularFile f(path);
  if (f.size() > max_bytes)
    throw AdapterError(path + ": " + std::to_string(f.size()) + " bytes, more than the " + std::to_string(max_bytes) +
                       " expected");
  std::vector<uint8_t> out = f.buffer(f.size());
  f.read(out.data(), out.size());
  return out;
}

SafetensorsFile read_safetensors_header(const std::string& path) {
  RegularFile f(path);
  const uint64_t size = f.size();
  uint8_t prefix[8] = {0};
  if (size >= 8) f.read(prefix, 8);
  const uint64_t n = size >= 8 ? header_length(prefix) : 0;
  std::vector<uint8_t> head(prefix, prefix + (size >= 8 ? 8 : 0));
  if (size >= 8 && n <= kMaxHeaderBytes && n <= size - 8) {
    head.resize(8 + n);
    f.read(head.data() + 8, n);
  }
  return parse_layout(head.data(), head.size(), size, path).file;  // throws unless size == 8 + n + the data
}

std::vector<uint8_t> read_safetensors_file(const std::string& path) {
  RegularFile f(path);
  const uint64_t size = f.size();
  if (size >= 8) {
    // The header first: the file's size must be what the header describes before the whole is read.
    uint8_t prefix[8];
    f.read(prefix, 8);
    const uint64_t n = header_length(prefix);
    std::vector<uint8_t> head;
    if (n <= kMaxHeaderBytes && n <= size - 8) {
      head = f.buffer(8 + n);
      std::memcpy(head.data(), prefix, 8);
      f.read(head.data() + 8, n);
    } else {
      head.assign(prefix, prefix + 8);
    }
    parse_layout(head.data(), head.size(), size, path);  // throws unless size == 8 + n + the data described
    std::vector<uint8_t> out = f.buffer(size);
    std::memcpy(out.data(), head.data(), head.size());
    f.read(out.data() + head.size(), size - head.size());
    return out;
  }
  std::vector<uint8_t> out(size_t(size), 0);
  f.read(out.data(), size);
  return out;
}

namespace {

bool all_of_chars(const std::string& s, size_t from, size_t to, bool (*ok)(char)) {
  for (size_t i = from; i < to; ++i)
    if (!ok(s[i])) return false;
  return true;
}

bool temp_char(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'; }
bool digit(char c) { return c >= '0' && c <= '9'; }

// The target's name as its locked temporaries spell it: its first kTempNameBytes bytes, so that
// `.<stem>.<pid>-<8 chars>.tmp` fits NAME_MAX (255) for any name that does (atomic.py TEMP_NAME_BYTES).
constexpr size_t kTempNameBytes = 233;
std::string temp_stem(const std::string& name) { return name.substr(0, kTempNameBytes); }

// Whether `entry` is `.<head>.<middle>.tmp` with an 8-character [a-z0-9_] tail; b and e bound the middle.
bool temp_shape(const std::string& entry, const std::string& head, size_t& b, size_t& e) {
  const std::string tail = ".tmp";
  if (entry.size() < head.size() + 8 + tail.size() || entry.compare(0, head.size(), head) != 0 ||
      entry.compare(entry.size() - tail.size(), tail.size(), tail) != 0)
    return false;
  b = head.size();
  e = entry.size() - tail.size();
  return all_of_chars(entry, e - 8, e, temp_char);
}

// For a directory entry `entry`: 1 when it is a temporary of target `name` in the locked naming
// (`.<stem>.<pid>-<8 chars>.tmp`, its pid in `pid`), 2 in the older unlocked one (`.<name>.<8
// chars>.tmp`), 0 when it is neither (python/loldu/atomic.py `_temp_patterns`).
int temp_match(const std::string& entry, const std::string& name, std::string& pid) {
  size_t b = 0, e = 0;
  if (temp_shape(entry, "." + temp_stem(name) + ".", b, e) && e - b >= 10 && entry[e - 9] == '-' &&
      all_of_chars(entry, b, e - 9, digit)) {
    pid = entry.substr(b, e - 9 - b);
    return 1;
  }
  return temp_shape(entry, "." + name + ".", b, e) && e - b == 8 ? 2 : 0;
}

bool pid_alive(const std::string& digits) {
  if (digits.size() > 9) return true;  // no pid this large: not ours to judge, as Python's OverflowError
  const long pid = std::stol(digits);
  if (pid == long(::getpid())) return true;
  return ::kill(pid_t(pid), 0) == 0 || errno != ESRCH;
}

// Removes the temporaries of `dir`/`name` that killed writers left, by python/loldu/atomic.py's
// rule (clean_stale_temps), so either language cleans what the other's dead writers left: a file no
// process holds flocked (its writer is gone: the kernel drops a dead process's lock) and non-empty,
// or empty with its writer's pid dead or older than 10 s (a live writer may be between creating and
// locking it); without flock, and for the unlocked older naming, only files older than an hour.
// Best effort: a file that cannot be examined stays.
void clean_stale_temps(const std::string& dir, const std::string& name) {
  constexpr double kStaleEmptySeconds = 10.0, kStaleUnlockedSeconds = 3600.0;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return;
  std::vector<std::pair<std::string, std::string>> found;  // (entry, pid)
  while (const dirent* e = ::readdir(d)) {
    std::string pid;
    const int kind = temp_match(e->d_name, name, pid);
    if (kind) found.emplace_back(e->d_name, kind == 1 ? pid : "");
  }
  ::closedir(d);
  for (const auto& f : found) {
    const std::string p = dir + "/" + f.first;
    const int fd = ::open(p.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) continue;
    struct stat st, now;
    if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
      const double age = double(::time(nullptr) - st.st_mtime);
      int locked = -1;  // -1: no lock to test (older naming, or no flock here)
      if (!f.second.empty()) {
        if (::flock(fd, LOCK_EX | LOCK_NB) == 0) locked = 1;
        else if (errno == EWOULDBLOCK || errno == EAGAIN || errno == EACCES) locked = 0;
      }
      const bool stale = locked == 0   ? false
                         : locked < 0 ? age > kStaleUnlockedSeconds
                                      : st.st_size > 0 || age > kStaleEmptySeconds || !pid_alive(f.second);
      if (stale && ::lstat(p.c_str(), &now) == 0 && now.st_dev == st.st_dev && now.st_ino == st.st_ino)
        ::unlink(p.c_str());  // still the file examined
    }
    ::close(fd);
  }
}

// SIGXFSZ ignored while alive: past a file size limit (ulimit -f) write() then fails with EFBIG,
// which the writer reports and cleans up after, instead of the signal killing the process with
// its temporary left behind. The disposition is process-wide; it is restored on exit.
class IgnoreSigxfsz {
 public:
  IgnoreSigxfsz() {
    struct sigaction ign;
    std::memset(&ign, 0, sizeof ign);
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    ok_ = ::sigaction(SIGXFSZ, &ign, &old_) == 0;
  }
  ~IgnoreSigxfsz() {
    if (ok_) ::sigaction(SIGXFSZ, &old_, nullptr);
  }

 private:
  struct sigaction old_;
  bool ok_ = false;
};

}  // namespace

void write_file_atomic(const std::string& path, const std::vector<uint8_t>& bytes) {
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  struct stat st;
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
    throw AdapterError(path + ": a directory is in the way of the file; nothing was written");
  clean_stale_temps(dir, name);
  // `.<stem>.<pid>-<8 chars>.tmp`, flocked while written: python/loldu/atomic.py's convention, so
  // either language's next write to this target removes what a killed writer of the other left.
  std::random_device rd;
  std::string tmp;
  int fd = -1;
  for (int attempt = 0; attempt < 16 && fd < 0; ++attempt) {
    static const char* chars = "abcdefghijklmnopqrstuvwxyz0123456789";
    std::string tail;
    for (int i = 0; i < 8; ++i) tail += chars[rd() % 36];
    tmp = dir + "/." + temp_stem(name) + "." + std::to_string(::getpid()) + "-" + tail + ".tmp";
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0) throw AdapterError(path + ": cannot create a temporary file in " + dir + " (" + os_reason() + ")");
  ::flock(fd, LOCK_EX);  // blocking: a cleaner examining the new, empty file holds it for a moment only
  // The temporary goes on every path out but the rename (unlinked before closing: it stays locked
  // until it is gone).
  struct Temporary {
    const std::string& path;
    int fd;
    bool renamed = false;
    ~Temporary() {
      if (!renamed) ::unlink(path.c_str());
      ::close(fd);
    }
  } guard{tmp, fd};
  const IgnoreSigxfsz no_sigxfsz;
  auto fail = [&](const std::string& what) {
    throw AdapterError(path + ": cannot " + what + " (" + os_reason() + "); the file there before, if any, is unchanged");
  };
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t k = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (k < 0 && errno == EINTR) continue;
    if (k < 0) fail("write");
    if (k == 0) {
      errno = ENOSPC;
      fail("write");
    }
    done += size_t(k);
  }
  if (::fsync(fd) != 0) fail("fsync");
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail("rename the temporary file over it");
  guard.renamed = true;
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace loldu
