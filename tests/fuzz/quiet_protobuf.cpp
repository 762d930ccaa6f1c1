#include <google/protobuf/stubs/logging.h>

#include "tests/fuzz/fuzz_target.h"

namespace attnscope::fuzz {

bool SilenceProtobufLogs() {
  google::protobuf::SetLogHandler(
      [](google::protobuf::LogLevel, const char*, int, const std::string&) {});
  return true;
}

}  // namespace attnscope::fuzz
