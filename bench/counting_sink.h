// A sink that consumes attention blocks the way a server would (reads their size) and keeps
// nothing.
#pragma once

#include "model/capture/block.h"

namespace attnscope {

class CountingSink : public AttentionSink {
 public:
  absl::Status OnBlock(const Block& b) override {
    if (b.header.kind == BlockKind::kAttention) bytes += b.header.value_bytes();
    return absl::OkStatus();
  }
  int64_t bytes = 0;
};

}  // namespace attnscope
