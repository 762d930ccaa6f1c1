// A sink that consumes attention blocks the way a server would (reads their size) and keeps
// nothing. With `place_bytes`, it takes dense blocks unmaterialized (as the server's shared-ring
// sink does) and has them written, piece by piece, into one reused buffer of that size.
#pragma once

#include <algorithm>
#include <vector>

#include "core/block.h"

namespace attnscope {

class CountingSink : public AttentionSink {
 public:
  explicit CountingSink(int64_t place_bytes = 0) : buffer_(static_cast<size_t>(place_bytes)) {}
  bool PlacesValues() const override { return !buffer_.empty(); }
  absl::Status OnBlock(const Block& b) override {
    if (b.header.kind != BlockKind::kAttention) return absl::OkStatus();
    bytes += b.header.value_bytes();
    if (b.fill) {
      const int64_t elem = ElementSize(b.header.element_type);
      const int64_t per_piece = std::max<int64_t>(1, static_cast<int64_t>(buffer_.size()) / elem);
      for (int64_t first = 0; first < b.header.numel(); first += per_piece)
        b.fill(first, std::min(per_piece, b.header.numel() - first), buffer_.data());
    }
    return absl::OkStatus();
  }
  int64_t bytes = 0;

 private:
  std::vector<char> buffer_;
};

}  // namespace attnscope
