// What every fuzz target shares: the libFuzzer entry point, and a tally of outcomes (which
// status each input ended in) that the mutation-loop driver prints. Under libFuzzer the tally is
// kept but never printed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>

#include "absl/status/status.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace attnscope::fuzz {

inline std::map<std::string, int64_t>& Outcomes() {
  static std::map<std::string, int64_t> outcomes;
  return outcomes;
}

inline void Record(const absl::Status& status) {
  ++Outcomes()[status.ok() ? std::string("OK") : absl::StatusCodeToString(status.code())];
}

// Drops protobuf's log lines; returns true (for use in a static initializer).
bool SilenceProtobufLogs();

// A scratch file per process for targets whose parser reads a path.
std::string WriteScratch(const std::string& name, const uint8_t* data, size_t size);

}  // namespace attnscope::fuzz
