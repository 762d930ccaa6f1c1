// --help for attnscope's programs: a usage line, then every flag the program defines (its own file
// and the shared flag files it links), grouped by file with their defaults; Abseil's own flags
// stay under --helpfull. absl's default matches flags only in a file named like the program, so
// without this --help printed "No flags matched".
#pragma once

#include <string>

#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace attnscope {

inline void SetUsage(const char* program, const char* what, const char* synopsis) {
  absl::SetProgramUsageMessage(
      absl::StrCat(what, "\n\nUsage: ", program, " ", synopsis,
                   "\n\nFlags (grouped by the file that defines them; --helpfull adds Abseil's):"));
  absl::FlagsUsageConfig config;
  config.contains_help_flags = [](absl::string_view file) {
    return !absl::StrContains(file, "absl/") && !absl::StrContains(file, "absl\\");
  };
  config.contains_helpshort_flags = config.contains_help_flags;
  config.normalize_filename = [](absl::string_view file) {
    // Paths relative to the repository (the part from server/, client/, cli/, tools/, bench/ on).
    for (const char* root : {"server/", "client/", "cli/", "tools/", "bench/"}) {
      const size_t at = file.rfind(root);
      if (at != absl::string_view::npos) return std::string(file.substr(at));
    }
    return std::string(file);
  };
  absl::SetFlagsUsageConfig(config);
}

}  // namespace attnscope
