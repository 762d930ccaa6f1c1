// The CLIs' dialects (core/capture_text.h, core/intervention_text.h): --form/--stats/... as one
// whole capture spec on the input's first line, then --ablate, --knockout and --kv_policy on the
// next three. Whatever parses must format back to text that parses to the same formatting (the
// round trip attnscope-run's JSON summary and the stored samples rely on); a mismatch aborts.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "core/capture_text.h"
#include "core/intervention_text.h"
#include "tests/fuzz/fuzz_target.h"

namespace {

[[noreturn]] void Mismatch(const char* what, const std::string& first, const std::string& again) {
  std::fprintf(stderr, "%s does not round-trip:\n  %s\n  %s\n", what, first.c_str(), again.c_str());
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> lines = absl::StrSplit(input, absl::MaxSplits('\n', 3));
  lines.resize(4);
  auto spec = attnscope::ParseCaptureSpec(absl::string_view(lines[0]));
  attnscope::fuzz::Record(spec.status());
  if (spec.ok()) {
    const std::string text = attnscope::FormatCaptureSpec(*spec);
    auto again = attnscope::ParseCaptureSpec(absl::string_view(text));
    if (!again.ok()) Mismatch("capture spec", text, std::string(again.status().message()));
    if (attnscope::FormatCaptureSpec(*again) != text) {
      Mismatch("capture spec", text, attnscope::FormatCaptureSpec(*again));
    }
  }
  attnscope::InterventionsText text;
  text.ablate = lines[1];
  text.knockout = lines[2];
  text.kv_policy = lines[3];
  auto interventions = attnscope::ParseInterventions(text);
  attnscope::fuzz::Record(interventions.status());
  if (interventions.ok()) {
    const attnscope::InterventionsText back = attnscope::FormatInterventions(*interventions);
    auto again = attnscope::ParseInterventions(back);
    const std::string joined = back.ablate + " | " + back.knockout + " | " + back.kv_policy;
    if (!again.ok()) Mismatch("interventions", joined, std::string(again.status().message()));
    const attnscope::InterventionsText twice = attnscope::FormatInterventions(*again);
    if (twice.ablate != back.ablate || twice.knockout != back.knockout ||
        twice.kv_policy != back.kv_policy) {
      Mismatch("interventions", joined,
               twice.ablate + " | " + twice.knockout + " | " + twice.kv_policy);
    }
  }
  return 0;
}
