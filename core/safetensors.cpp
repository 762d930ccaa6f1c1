#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "core/files.h"
#include "core/status_macros.h"

namespace attnscope {
namespace {

using json = nlohmann::json;

// A header larger than this is refused rather than parsed (real ones are well under 1 MiB).
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
// model.safetensors.index.json lists tensor names only; real ones are well under a megabyte.
constexpr int64_t kMaxIndexBytes = 64 << 20;

struct DTypeEntry {
  const char* name;
  StoredDType dtype;
  int64_t size;
};
constexpr DTypeEntry kDTypes[] = {
    {"F32", StoredDType::kF32, 4},        {"F16", StoredDType::kF16, 2},
    {"BF16", StoredDType::kBF16, 2},      {"F64", StoredDType::kF64, 8},
    {"I64", StoredDType::kI64, 8},        {"I32", StoredDType::kI32, 4},
    {"I16", StoredDType::kI16, 2},        {"I8", StoredDType::kI8, 1},
    {"U8", StoredDType::kU8, 1},          {"BOOL", StoredDType::kBool, 1},
    {"F8_E4M3", StoredDType::kF8E4M3, 1}, {"F8_E5M2", StoredDType::kF8E5M2, 1},
};

const DTypeEntry* FindDType(const std::string& name) {
  for (const auto& e : kDTypes) {
    if (name == e.name) return &e;
  }
  return nullptr;
}

std::string Quote(const std::string& s) { return absl::StrCat("'", s, "'"); }

absl::Status Corrupt(const std::string& path, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("safetensors file ", path, ": ", what));
}

}  // namespace

int64_t StoredDTypeSize(StoredDType dtype) {
  for (const auto& e : kDTypes) {
    if (e.dtype == dtype) return e.size;
  }
  return 0;
}

const char* StoredDTypeName(StoredDType dtype) {
  for (const auto& e : kDTypes) {
    if (e.dtype == dtype) return e.name;
  }
  return "?";
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) munmap(map_, map_size_);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  struct stat st {};
  absl::StatusOr<int> opened = OpenRegularFile(path, &st);  // a FIFO is refused, not waited on
  if (!opened.ok()) {
    if (absl::IsNotFound(opened.status())) {
      return absl::NotFoundError(absl::StrCat("checkpoint file ", path, " does not exist"));
    }
    return opened.status();
  }
  const int fd = *opened;
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    return Corrupt(path, absl::StrCat("truncated: ", file_size,
                                      " bytes, shorter than the 8-byte header length"));
  }
  void* map = mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED)
    return absl::InternalError(absl::StrCat("cannot map ", path, ": ", std::strerror(errno)));

  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->map_ = map;
  file->map_size_ = file_size;
  const auto* bytes = static_cast<const unsigned char*>(map);

  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  if (header_len > file_size - 8) {
    return Corrupt(path,
                   absl::StrCat("header length ", header_len, " runs past the end of the file (",
                                file_size, " bytes); the file is truncated or not safetensors"));
  }
  if (header_len > kMaxHeaderBytes) {
    return Corrupt(path, absl::StrCat("header length ", header_len, " exceeds the limit of ",
                                      kMaxHeaderBytes));
  }
  const char* header_begin = reinterpret_cast<const char*>(bytes + 8);
  json header =
      json::parse(header_begin, header_begin + header_len, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) {
    return Corrupt(path, "header is not a valid JSON object");
  }
  const uint64_t data_size = file_size - 8 - header_len;
  const unsigned char* data_begin = bytes + 8 + header_len;

  struct Span {
    uint64_t begin, end;
    std::string name;
  };
  std::vector<Span> spans;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& entry = it.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) return Corrupt(path, "__metadata__ is not an object");
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (m.value().is_string()) file->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = absl::StrCat("tensor ", Quote(name));
    if (!entry.is_object()) return Corrupt(path, absl::StrCat(where, ": entry is not an object"));
    auto dtype_it = entry.find("dtype");
    auto shape_it = entry.find("shape");
    auto offsets_it = entry.find("data_offsets");
    if (dtype_it == entry.end() || !dtype_it->is_string())
      return Corrupt(path, absl::StrCat(where, ": missing dtype"));
    if (shape_it == entry.end() || !shape_it->is_array())
      return Corrupt(path, absl::StrCat(where, ": missing shape"));
    if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2) {
      return Corrupt(path, absl::StrCat(where, ": data_offsets must be [begin, end]"));
    }
    const DTypeEntry* dt = FindDType(dtype_it->get<std::string>());
    if (dt == nullptr) {
      return Corrupt(path,
                     absl::StrCat(where, ": unknown dtype ", Quote(dtype_it->get<std::string>())));
    }
    TensorView view;
    view.name = name;
    view.file = path;
    view.dtype = dt->dtype;
    uint64_t numel = 1;
    for (const json& d : *shape_it) {
      if (!d.is_number_unsigned())
        return Corrupt(path, absl::StrCat(where, ": shape entries must be non-negative integers"));
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / 8 / dim) {
        return Corrupt(path, absl::StrCat(where, ": shape is impossibly large"));
      }
      numel *= dim;
      view.shape.push_back(static_cast<int64_t>(dim));
    }
    const json& b = (*offsets_it)[0];
    const json& e = (*offsets_it)[1];
    if (!b.is_number_unsigned() || !e.is_number_unsigned()) {
      return Corrupt(path, absl::StrCat(where, ": data_offsets must be non-negative integers"));
    }
    const uint64_t begin = b.get<uint64_t>();
    const uint64_t end = e.get<uint64_t>();
    if (begin > end || end > data_size) {
      return Corrupt(path, absl::StrCat(where, ": data_offsets [", begin, ", ", end,
                                        "] lie outside the data section of ", data_size,
                                        " bytes (truncated file?)"));
    }
    const uint64_t expected = numel * static_cast<uint64_t>(dt->size);
    if (end - begin != expected) {
      return Corrupt(path, absl::StrCat(where, ": holds ", end - begin,
                                        " bytes but its shape and dtype need ", expected));
    }
    view.data = data_begin + begin;
    view.nbytes = static_cast<int64_t>(expected);
    if (end > begin) spans.push_back({begin, end, name});
    file->tensors_.emplace(name, std::move(view));
  }
  std::sort(spans.begin(), spans.end(),
            [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < spans.size(); ++i) {
    if (spans[i].begin < spans[i - 1].end) {
      return Corrupt(path, absl::StrCat("tensors ", Quote(spans[i - 1].name), " and ",
                                        Quote(spans[i].name), " overlap in the data section"));
    }
  }
  return file;
}

absl::StatusOr<std::unique_ptr<CheckpointTensors>> CheckpointTensors::Open(const std::string& dir) {
  auto result = std::unique_ptr<CheckpointTensors>(new CheckpointTensors());
  const std::string single = dir + "/model.safetensors";
  const std::string index_path = dir + "/model.safetensors.index.json";
  std::vector<std::string> shard_names;
  std::map<std::string, std::string> weight_map;
  if (access(index_path.c_str(), F_OK) == 0) {
    ASSIGN_OR_RETURN(std::string index_text, ReadRegularFile(index_path, kMaxIndexBytes));
    json index = json::parse(index_text, nullptr, /*allow_exceptions=*/false);
    if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") ||
        !index["weight_map"].is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": not valid JSON with a weight_map object"));
    }
    std::set<std::string> seen;
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
      if (!it.value().is_string()) {
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map entry ",
                                                       Quote(it.key()), " is not a file name"));
      }
      const std::string shard = it.value().get<std::string>();
      if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..") {
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": shard name ", Quote(shard),
                                                       " for tensor ", Quote(it.key()),
                                                       " must be a plain file name in the folder"));
      }
      weight_map[it.key()] = shard;
      if (seen.insert(shard).second) shard_names.push_back(shard);
    }
    result->description_ = index_path;
  } else if (access(single.c_str(), F_OK) == 0) {
    shard_names.push_back("model.safetensors");
    result->description_ = single;
  } else {
    return absl::NotFoundError(
        absl::StrCat("checkpoint folder ", dir,
                     " has neither model.safetensors nor model.safetensors.index.json "
                     "(pickle checkpoints are not loaded)"));
  }
  for (const std::string& shard : shard_names) {
    ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(dir + "/" + shard));
    for (const auto& [name, view] : file->tensors()) {
      if (!weight_map.empty()) {
        auto w = weight_map.find(name);
        if (w == weight_map.end() || w->second != shard) continue;  // the index decides
      }
      result->index_[name] = &view;
    }
    result->files_.push_back(std::move(file));
  }
  for (const auto& [name, shard] : weight_map) {
    if (!result->index_.count(name)) {
      return absl::NotFoundError(absl::StrCat(index_path, " maps tensor ", Quote(name), " to ",
                                              shard, ", which does not contain it"));
    }
  }
  return result;
}

absl::StatusOr<TensorView> CheckpointTensors::Get(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::NotFoundError(
        absl::StrCat("tensor ", Quote(name), " is missing from ", description_));
  }
  return *it->second;
}

}  // namespace attnscope
