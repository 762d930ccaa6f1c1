// Writes a safetensors file atomically (temporary file, then rename), without libtorch.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace attnscope {

class SafetensorsWriter {
 public:
  // dtype: a safetensors dtype name ("F32", "F16", "BF16", "I32", "I64", ...). Bytes are copied.
  void Add(const std::string& name, const std::string& dtype, const std::vector<int64_t>& shape,
           const void* data, size_t nbytes);
  void SetMetadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  size_t size() const { return entries_.size(); }
  // Writes `path` + ".tmp", then renames it to `path`.
  absl::Status Write(const std::string& path) const;

 private:
  struct Entry {
    std::string dtype;
    std::vector<int64_t> shape;
    std::string bytes;
  };
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace attnscope
