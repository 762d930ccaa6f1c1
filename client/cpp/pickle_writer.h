// The prototype's pickle layout, written as a stream (protocol 4): {layer: {'shape': [1, H, T, T],
// 'tensor': float32 ndarray}}, each array's bytes supplied by the caller as it goes.
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <vector>

#include "absl/status/status.h"

namespace attnscope {

// `write_tensor(i, out)` writes the H*T*T float32 values of layers[i], row-major.
absl::Status WritePrototypePickle(
    std::FILE* out, const std::vector<int64_t>& layers, int64_t heads, int64_t T,
    const std::function<absl::Status(size_t i, std::FILE* out)>& write_tensor);

}  // namespace attnscope
