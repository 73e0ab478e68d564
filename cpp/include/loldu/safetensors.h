// The safetensors format, torch-free: plain bytes <-> tensor records.
//
// A file is an 8-byte little-endian header length n, n bytes of JSON header, then the data. The
// header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
// relative to the end of the header) and may hold "__metadata__", a map of strings to strings.
// parse_safetensors checks every length and offset against the file size: the header must be at
// most kMaxHeaderBytes, UTF-8 JSON starting with '{', nested at most kMaxJsonDepth deep, with known
// dtypes; the tensors' byte ranges must tile the data exactly (no gap, no overlap, nothing past the
// end) and each must hold exactly numel * element size bytes. Violations throw loldu::AdapterError
// naming the file and the field.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <loldu/spec.h>

namespace loldu {

constexpr uint64_t kMaxHeaderBytes = 100000000;  // 100 MB, as the reference implementation
constexpr int kMaxJsonDepth = 8;                 // loldu's headers and configs nest at most 3 deep

// The row of spec::kDtypes named `dtype` ("F32", "I64", ...), nullptr if unknown.
const spec::Dtype* safetensors_dtype(const std::string& dtype);
// Element size in bytes of a safetensors dtype name, 0 if unknown.
size_t safetensors_dtype_size(const std::string& dtype);

// Python's repr of a shape tuple: "()", "(4,)", "(4, 8)" (file hashes and messages spell shapes so).
std::string tuple_repr(const std::vector<int64_t>& shape);

struct SafetensorsTensor {
  std::string dtype;           // "F32", "BF16", "I32", "U8", ...
  std::vector<int64_t> shape;  // empty for a 0-dim tensor
  const uint8_t* data = nullptr;  // into the parsed buffer (parse) or the caller's memory (serialize)
  size_t nbytes = 0;
  int64_t numel() const;
};

struct SafetensorsFile {
  std::map<std::string, std::string> metadata;
  std::map<std::string, SafetensorsTensor> tensors;  // views into the buffer passed to parse
};

// Parses `size` bytes (the whole file); `where` names the file in errors. The tensors point into
// `bytes`, which must outlive the result.
SafetensorsFile parse_safetensors(const uint8_t* bytes, size_t size, const std::string& where);

// The file bytes for `tensors` (each one's data/nbytes must match dtype and shape; throws
// loldu::ShapeError otherwise) and `metadata`. Tensors are laid out by decreasing element size,
// then name, after a header padded with spaces to a multiple of 8 bytes, so every tensor is aligned.
std::vector<uint8_t> serialize_safetensors(const std::map<std::string, SafetensorsTensor>& tensors,
                                           const std::map<std::string, std::string>& metadata);

// Whole-file helpers; errors (AdapterError) name the path and the OS reason. Only regular files
// (or symlinks to them) are read: a FIFO, device, socket or directory is refused before it is opened.
// read_file_bytes refuses a file over `max_bytes`; read_safetensors_file reads the header first
// and refuses a file whose size is not the 8 + header + data bytes its header describes (every
// parse_safetensors check of the header, with the same messages) before it allocates the rest.
std::vector<uint8_t> read_file_bytes(const std::string& path, uint64_t max_bytes = UINT64_MAX);
std::vector<uint8_t> read_safetensors_file(const std::string& path);
// Writes to a temporary file in the same directory, fsyncs it and renames it over `path`, so a
// crash leaves the old file or the new one. The temporary (`.<name>.<pid>-<8 chars>.tmp`, flocked
// while written) is removed on every error, a file size limit (ulimit -f) included: SIGXFSZ is
// ignored while writing, so the write fails with EFBIG instead of the signal killing the process.
// Temporaries that killed writers left (of either language: python/loldu/atomic.py names and
// locks them alike) are removed first, by that module's rule; a live writer's never are.
void write_file_atomic(const std::string& path, const std::vector<uint8_t>& bytes);

}  // namespace loldu
