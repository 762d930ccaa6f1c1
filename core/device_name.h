// Device names as the flags take them: "cpu", "cuda", "cuda:N", and the prototype's bare GPU index
// ("--device 0" meant cuda:0). The one normalization, used by the engine and attnscope-capture.
#pragma once

#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/string_view.h"

namespace attnscope {

inline std::string DeviceName(absl::string_view flag) {
  const absl::string_view name = absl::StripAsciiWhitespace(flag);
  bool digits = !name.empty();
  for (char c : name) digits = digits && absl::ascii_isdigit(static_cast<unsigned char>(c));
  if (digits) return "cuda:" + std::string(name);
  return std::string(name);
}

}  // namespace attnscope
