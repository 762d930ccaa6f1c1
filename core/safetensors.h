// Read-only, bounds-checked access to safetensors files (single or sharded checkpoints).
//
// Files are memory-mapped; every header field is validated against the file before any tensor
// byte is touched, so a corrupt or hostile file yields a Status, never an out-of-bounds read.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace attnscope {

enum class StoredDType {
  kF32,
  kF16,
  kBF16,
  kF64,
  kI64,
  kI32,
  kI16,
  kI8,
  kU8,
  kBool,
  kF8E4M3,
  kF8E5M2
};

// Bytes per element of a stored dtype.
int64_t StoredDTypeSize(StoredDType dtype);
const char* StoredDTypeName(StoredDType dtype);

// A tensor inside a mapped file. `data` stays valid while the owning SafetensorsFile lives.
struct TensorView {
  std::string name;
  std::string file;  // path of the file holding it, for messages
  StoredDType dtype = StoredDType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  int64_t nbytes = 0;
};

// One memory-mapped .safetensors file.
class SafetensorsFile {
 public:
  // Maps and validates `path`: header length, JSON, dtypes, shapes, offsets inside the data
  // section, sizes matching shapes, no overlapping tensors.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a checkpoint folder: `model.safetensors`, or the shards listed by
// `model.safetensors.index.json`.
class CheckpointTensors {
 public:
  static absl::StatusOr<std::unique_ptr<CheckpointTensors>> Open(const std::string& dir);

  bool Has(const std::string& name) const { return index_.count(name) > 0; }
  // NOT_FOUND naming the tensor and the file(s) searched when absent.
  absl::StatusOr<TensorView> Get(const std::string& name) const;

 private:
  std::string description_;  // files searched, for messages
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> index_;
};

}  // namespace attnscope
