// Causal (optionally sliding-window) grouped-query attention over a KV cache.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/bounds.h"
#include "engine/cpu_flash.h"
#include "engine/layer_intervention.h"

namespace attnscope {

struct AttentionShape {
  int64_t pos0 = 0;    // absolute position of the first query
  int64_t window = 0;  // sliding window (keys with pos > query - window); 0: full causal
  int64_t query_block = kQueryBlock;  // rows of probabilities materialized at once, at most
  int64_t block_elements =
      0;  // > 0: also at most this many probabilities (heads × rows × keys) at once
  int64_t row_multiple = 1;  // block starts are multiples of this (pooled tiles stay whole)
  // Keys a knockout hides, masked like the causal mask (the explicit path only: FusedAttention
  // takes the explicit path when set).
  const LayerInterventions* knockout = nullptr;
};

// Receives the float32 probabilities [heads, m, computed_keys] of query rows [pos0 + b, pos0 + b +
// m), the scores they came from (same shape, float32; masked entries hold the lowest finite float,
// so that probs · scores is 0 there and statistics can read the scores without a fill), and, on the
// fused path, each row's log-sum-exp [heads, m] float32 (the softmax's log-normaliser: probs =
// exp(scores - lse)); undefined on the explicit path.
using ProbsCallback =
    std::function<absl::Status(int64_t query_begin, const torch::Tensor& probs,
                               const torch::Tensor& scores, const torch::Tensor& lse)>;

// Rows (of q, 0-based) whose probabilities a callback needs; blocks that hold none of them are not
// materialized. Empty: every row.
using RowRanges = std::vector<std::pair<int64_t, int64_t>>;

// Reference path: explicit softmax(q·kᵀ·scale + mask) in float32, one block of queries at a time,
// so at most heads × query_block × keys (and at most block_elements) probabilities exist at once.
// The output is probs·v, so every block is computed whatever `rows` says.
//   q: (heads, n, head_dim); k, v: (kv_heads, pos0 + n, head_dim). Returns (heads, n, head_dim).
absl::StatusOr<torch::Tensor> ExplicitAttention(const torch::Tensor& q, const torch::Tensor& k,
                                                const torch::Tensor& v, const AttentionShape& shape,
                                                const ProbsCallback* on_probs);

// Statistics computed inside the attention pass itself (CpuFlashAttention), where
// StatisticsInPass says the pass can.
struct PassStatistics {
  FlashStatistics wanted;  // what to compute
  FlashResult result;      // FusedAttention's pass: the statistics as wanted
};

// Production path: one fused scaled-dot-product kernel (libtorch >= 2.0: the flash kernel on the
// CPU, the memory-efficient kernel on CUDA) gives every row's output and, when on_probs is set, its
// log-sum-exp; the probabilities of the blocks of rows that hold `rows` are then recomputed exactly
// as exp(scale·q·kᵀ - lse) in float32 (one matrix product and one elementwise pass: no softmax, no
// second reduction), one block at a time with the same bounds as the explicit path. Without a fused
// kernel (libtorch 1.x, or a device or type it lacks) it is the explicit path. Same arguments and
// result as ExplicitAttention. With `pass` (only where StatisticsInPass holds) the kernel is
// CpuFlashAttention, which also fills pass->result with the statistics pass->wanted asks for.
absl::StatusOr<torch::Tensor> FusedAttention(const torch::Tensor& q, const torch::Tensor& k,
                                             const torch::Tensor& v, const AttentionShape& shape,
                                             const ProbsCallback* on_probs,
                                             const RowRanges& rows = {},
                                             PassStatistics* pass = nullptr);

// Whether FusedAttention can run CpuFlashAttention for these arguments (and so compute statistics
// inside its pass).
bool StatisticsInPass(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                      const AttentionShape& shape);

// Attention over a layer whose cache a KV policy compacted: slots instead of positions.
//   k, v: (kv_heads, slots, head_dim); positions: (kv_heads, slots) int64, the position each slot
//   holds (-1: padding, where a layer's kv heads keep different numbers of keys). q holds the rows
//   at positions [pos0, pos0 + n) (decode steps: n is 1, so the probabilities are one row per
//   head). The callback receives them as on the other paths, in position space (heads, n, pos0 +
//   n): 0, and the lowest float as score, at the positions the layer no longer holds. Knockouts
//   (shape.knockout's, not its evictions, which are gone) are masked as on the explicit path.
absl::StatusOr<torch::Tensor> CompactedAttention(const torch::Tensor& q, const torch::Tensor& k,
                                                 const torch::Tensor& v,
                                                 const torch::Tensor& positions,
                                                 const AttentionShape& shape,
                                                 const ProbsCallback* on_probs);

// Whether FusedAttention uses a fused kernel in this build.
bool HasFusedAttention();

}  // namespace attnscope
