// The model registry: the prototype's model names resolved to checkpoint folders.
//   {"llama3.1-8b-128k": {"path": "/models/Meta-Llama-3.1-8B-Instruct", "max_length": 127500}, ...}
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace attnscope {

struct RegistryEntry {
  std::string path;        // checkpoint folder
  int64_t max_length = 0;  // the prototype's prompt limit for the model; 0: none given
};

// Looks `name` up in the registry text (read from `source`): NOT_FOUND when absent,
// INVALID_ARGUMENT (naming the field) when the file or the entry is malformed.
absl::StatusOr<RegistryEntry> LookupModel(absl::string_view registry_json, const std::string& name,
                                          const std::string& source);

}  // namespace attnscope
