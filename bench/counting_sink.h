// A sink that consumes attention blocks the way a server would (reads their size) and keeps
// nothing.
#pragma once

#include "model/capture_types.h"

namespace attnscope {

class CountingSink : public AttentionSink {
 public:
  absl::Status OnAttention(const AttentionBlock& b) override {
    bytes += b.values.bytes;
    return absl::OkStatus();
  }
  int64_t bytes = 0;
};

}  // namespace attnscope
