#include "server/registry.h"

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"

namespace attnscope {

absl::StatusOr<RegistryEntry> LookupModel(absl::string_view registry_json, const std::string& name,
                                          const std::string& source) {
  const auto registry = nlohmann::json::parse(registry_json.begin(), registry_json.end(), nullptr,
                                              /*allow_exceptions=*/false);
  if (registry.is_discarded() || !registry.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, " is not a JSON object {name: {\"path\": DIR}}"));
  }
  const auto it = registry.find(name);
  if (it == registry.end())
    return absl::NotFoundError(absl::StrCat("model '", name, "' is not in ", source));
  if (!it->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": entry '", name, "' must be an object with a \"path\""));
  }
  RegistryEntry entry;
  const auto path = it->find("path");
  if (path == it->end() || !path->is_string() || path->get_ref<const std::string&>().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": entry '", name, "' needs \"path\": the checkpoint folder, as a string"));
  }
  entry.path = path->get<std::string>();
  const auto max_length = it->find("max_length");
  if (max_length != it->end() && !max_length->is_null()) {
    if (!max_length->is_number_integer() || max_length->get<int64_t>() < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": entry '", name, "': \"max_length\" must be an integer >= 0"));
    }
    entry.max_length = max_length->get<int64_t>();
  }
  return entry;
}

}  // namespace attnscope
