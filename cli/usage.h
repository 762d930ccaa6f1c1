// --help, --version and flag parsing for attnscope's programs. ParseFlags replaces
// absl::ParseCommandLine: --help (-h, --helpshort, --help=SUBSTRING) prints a usage line, then
// every flag the program defines (its own file and the shared flag files it links), grouped by file
// with their defaults, to stdout and exits 0; --helpfull adds Abseil's own flags; --version prints
// the project version, the build type and the libtorch the build was made with, and exits 0.
// Without SetUsage, absl matched flags only in a file named like the program, so --help printed
// "No flags matched", and absl's --help and --version exit 1.
#pragma once

#include <string>
#include <vector>

#include "absl/types/span.h"

namespace attnscope {

// The usage text: "WHAT\n\nUsage: PROGRAM SYNOPSIS", and the program's name for --version.
void SetUsage(const char* program, const char* what, const char* synopsis);

// The --version line: "PROGRAM VERSION (BUILD_TYPE build, libtorch X)".
std::string VersionLine();

// absl::ParseCommandLine with the help and version flags above; returns the positional arguments
// (argv[0] first).
std::vector<char*> ParseFlags(int argc, char** argv);

// Of the flags `names` (without --), those whose value is not their default, in order.
std::vector<std::string> ChangedFlags(absl::Span<const char* const> names);

}  // namespace attnscope
