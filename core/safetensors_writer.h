// The one safetensors writer (attnscope-run's output, attnscope-capture's samples), without
// libtorch. Tensors are laid out in the order they are declared; their bytes are either copied in
// (Add) or streamed at Write time by the caller's sources (Declare + AddSource), so a sample of
// many gigabytes is never held in memory. The file appears atomically (core/atomic_file.h): a
// work file under a fresh name beside it, fsynced, then renamed.
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace attnscope {

// A tensor of a safetensors file: its bytes lie at [offset, offset + bytes) of the data section.
struct SafetensorsEntry {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  int64_t offset = 0;
  int64_t bytes = 0;
};

class SafetensorsWriter {
 public:
  // Writes exactly the bytes it was declared with to `out`.
  using ByteSource = std::function<absl::Status(std::FILE* out)>;

  // dtype: a safetensors dtype name ("F32", "F16", "BF16", "I32", "I64", ...). Bytes are copied.
  void Add(const std::string& name, const std::string& dtype, const std::vector<int64_t>& shape,
           const void* data, size_t nbytes);
  // A tensor of `nbytes` whose bytes a source added (before or after) supplies, in order.
  void Declare(const std::string& name, const std::string& dtype, const std::vector<int64_t>& shape,
               int64_t nbytes);
  // The next `nbytes` of the data section. Sources run in the order added.
  void AddSource(int64_t nbytes, ByteSource source);
  void SetMetadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  size_t size() const { return entries_.size(); }
  bool contains(const std::string& name) const { return index_.count(name) > 0; }
  // Writes a work file beside `path`, then renames it to `path`; the work file is removed on
  // failure. Without `replace`, ALREADY_EXISTS when `path` appeared meanwhile (it is kept).
  absl::Status Write(const std::string& path, bool replace = true) const;

 private:
  struct Source {
    int64_t bytes = 0;
    ByteSource write;
  };
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, size_t> index_;
  std::vector<Source> sources_;
  std::vector<std::string> copies_;  // bytes of Add()ed tensors
  int64_t declared_ = 0, supplied_ = 0;
  std::map<std::string, std::string> metadata_;
};

// Writes a work file beside `path` through `write`, then renames it to `path` (AtomicFile; the
// work file removed on any failure): a reader never sees a half-written file.
absl::Status WriteFileAtomically(const std::string& path,
                                 const std::function<absl::Status(std::FILE* out)>& write,
                                 bool replace = true);

}  // namespace attnscope
