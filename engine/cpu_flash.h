// The CPU flash-attention pass that also yields row statistics: one pass over tiles of keys gives
// each query row's output, log-sum-exp, entropy, sink mass and local mass, and never holds more
// probabilities than one tile per thread (FlashAttention's online softmax, with the entropy's
// Σ p·(s - max) carried across changes of the running max). The fused path's statistics for every
// prompt row cost this pass instead of a second product over all keys.
#pragma once

#include <torch/torch.h>

#include <cstdint>

namespace attnscope {

// What the pass computes besides the output and the log-sum-exp.
struct FlashStatistics {
  bool entropy = false;  // -Σ p log p over each row's keys
  int64_t sink = 0;      // > 0: mass on keys [0, sink)
  int64_t local = 0;     // > 0: mass on keys (i - local, i] for the row at position i
  // Rows [key_score_begin, key_score_end) of the pass (0-based) whose probabilities are summed per
  // key (the key score), from the pass's log-sum-exp; none when empty.
  int64_t key_score_begin = 0;
  int64_t key_score_end = 0;
  bool any() const { return entropy || sink > 0 || local > 0 || key_score_end > key_score_begin; }
};

struct FlashResult {
  torch::Tensor out;        // (heads, n, dim), the input's type
  torch::Tensor lse;        // (heads, n) float32: the softmax's log-normaliser of each row
  torch::Tensor entropy;    // (heads, n) float32, defined when asked for
  torch::Tensor sink;       // (heads, n) float32, defined when asked for
  torch::Tensor local;      // (heads, n) float32, defined when asked for
  torch::Tensor key_score;  // (heads, pos0 + n) float32, defined when asked for
};

// Whether CpuFlashAttention runs for these tensors here: float32 on the CPU, equal head sizes, a
// processor with AVX2 and FMA, and the BLAS sgemm of libtorch's build.
bool CpuFlashSupports(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v);

// Causal (window > 0: sliding-window) grouped-query attention of query rows at positions
// [pos0, pos0 + n) over keys [0, pos0 + n), with scores scale·q·kᵀ in float32 (scale 1/sqrt(dim)).
//   q: (heads, n, dim); k, v: (kv_heads, >= pos0 + n, dim), rows of dim contiguous.
// Requires CpuFlashSupports(q, k, v).
FlashResult CpuFlashAttention(const torch::Tensor& q, const torch::Tensor& k,
                              const torch::Tensor& v, int64_t pos0, int64_t window,
                              const FlashStatistics& stats);

}  // namespace attnscope
