// Causal (optionally sliding-window) grouped-query attention over a KV cache.
#pragma once

#include <torch/torch.h>

#include <functional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/bounds.h"

namespace attnscope {

struct AttentionShape {
  int64_t pos0 = 0;    // absolute position of the first query
  int64_t window = 0;  // sliding window (keys with pos > query - window); 0: full causal
  int64_t query_block = kQueryBlock;  // rows of probabilities materialized at once, at most
  int64_t block_elements =
      0;  // > 0: also at most this many probabilities (heads × rows × keys) at once
  int64_t row_multiple = 1;  // block starts are multiples of this (pooled tiles stay whole)
};

// Receives the float32 probabilities [heads, m, computed_keys] of query rows [pos0 + b, pos0 + b +
// m), and the scores they came from (same shape, float32; masked entries hold the lowest finite
// float, so that probs · scores is 0 there and statistics can read the scores without a fill).
using ProbsCallback = std::function<absl::Status(int64_t query_begin, const torch::Tensor& probs,
                                                 const torch::Tensor& scores)>;

// Reference path: explicit softmax(q·kᵀ·scale + mask) in float32, one block of queries at a time,
// so at most heads × query_block × keys (and at most block_elements) probabilities exist at once.
//   q: (heads, n, head_dim); k, v: (kv_heads, pos0 + n, head_dim). Returns (heads, n, head_dim).
absl::StatusOr<torch::Tensor> ExplicitAttention(const torch::Tensor& q, const torch::Tensor& k,
                                                const torch::Tensor& v, const AttentionShape& shape,
                                                const ProbsCallback* on_probs);

// Fast path: fused scaled-dot-product attention where libtorch >= 2.0 has it, else the explicit
// path without capture. Same arguments and result as ExplicitAttention.
torch::Tensor FastAttention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                            const AttentionShape& shape);

// Whether FastAttention uses a fused kernel in this build.
bool HasFusedAttention();

}  // namespace attnscope
