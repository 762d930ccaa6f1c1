#include "cli/usage.h"

#include <algorithm>
#include <cstdlib>
#include <iostream>
#include <map>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cli/version.h"

namespace attnscope {
namespace {

std::string& ProgramName() {
  static std::string name = "attnscope";
  return name;
}

bool IsAbseilFile(absl::string_view file) {
  return absl::StrContains(file, "absl/") || absl::StrContains(file, "absl\\");
}

// Paths relative to the repository (the part from server/, client/, cli/, tools/, bench/ on).
std::string RepositoryPath(absl::string_view file) {
  for (const char* root : {"server/", "client/", "cli/", "tools/", "bench/"}) {
    const size_t at = file.rfind(root);
    if (at != absl::string_view::npos) return std::string(file.substr(at));
  }
  return std::string(file);
}

// Every flag of the program (with Abseil's when `full`) whose name contains `filter`, grouped by
// the file that defines it, each with its help and default.
void PrintHelp(bool full, absl::string_view filter) {
  std::map<std::string, std::map<std::string, const absl::CommandLineFlag*>> by_file;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (!full && IsAbseilFile(flag->Filename())) continue;
    if (!filter.empty() && !absl::StrContains(name, filter)) continue;
    by_file[RepositoryPath(flag->Filename())][std::string(name)] = flag;
  }
  std::cout << absl::ProgramUsageMessage() << "\n";
  if (by_file.empty()) std::cout << "\n  no flag's name contains \"" << filter << "\"\n";
  for (const auto& [file, flags] : by_file) {
    std::cout << "\n  " << file << ":\n";
    for (const auto& [name, flag] : flags) {
      const std::string value = flag->DefaultValue();
      std::cout << "    --" << name << " (" << flag->Help() << "); default: "
                << (flag->IsOfType<std::string>() ? absl::StrCat("\"", value, "\"") : value)
                << ";\n";
    }
  }
  std::cout << "\n  --help, --helpfull (with Abseil's flags), --help=SUBSTRING, --version"
            << std::endl;
}

}  // namespace

void SetUsage(const char* program, const char* what, const char* synopsis) {
  ProgramName() = program;
  absl::SetProgramUsageMessage(
      absl::StrCat(what, "\n\nUsage: ", program, " ", synopsis,
                   "\n\nFlags (grouped by the file that defines them; --helpfull adds Abseil's):"));
  absl::FlagsUsageConfig config;
  config.contains_help_flags = [](absl::string_view file) { return !IsAbseilFile(file); };
  config.contains_helpshort_flags = config.contains_help_flags;
  config.normalize_filename = [](absl::string_view file) { return RepositoryPath(file); };
  config.version_string = [] { return VersionLine() + "\n"; };
  absl::SetFlagsUsageConfig(config);
}

std::string VersionLine() {
  return absl::StrCat(ProgramName(), " ", ATTNSCOPE_VERSION, " (", ATTNSCOPE_BUILD_TYPE,
                      " build, libtorch ", ATTNSCOPE_LIBTORCH, ")");
}

std::vector<char*> ParseFlags(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const absl::string_view arg = argv[i];
    if (arg == "--") break;
    // One dash or two, as absl accepts.
    const absl::string_view name = absl::StartsWith(arg, "--")  ? arg.substr(2)
                                   : absl::StartsWith(arg, "-") ? arg.substr(1)
                                                                : absl::string_view();
    if (name == "help" || name == "h" || name == "helpshort" || name == "helpfull" ||
        absl::StartsWith(name, "help=")) {
      PrintHelp(name == "helpfull", absl::StartsWith(name, "help=") ? name.substr(5) : "");
      std::exit(0);
    }
    if (name == "version") {
      std::cout << VersionLine() << std::endl;
      std::exit(0);
    }
  }
  return absl::ParseCommandLine(argc, argv);
}

std::vector<std::string> ChangedFlags(absl::Span<const char* const> names) {
  std::vector<std::string> out;
  for (const char* name : names) {
    const absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    if (flag != nullptr && flag->CurrentValue() != flag->DefaultValue()) out.push_back(name);
  }
  return out;
}

}  // namespace attnscope
