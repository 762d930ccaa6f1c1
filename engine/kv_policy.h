// A KV policy's scores and choice for one layer at the end of the prefill, as kvpress's presses
// make them (intervention.h names the policies; DESIGN.md says which rows each score sums):
//   streaming_llm  1 for the first n_sink keys and the most recent ones, 0 for the pruned middle;
//   h2o            the attention a key receives, summed over every prefill row and divided by the
//                  rows that see it (n - j: kvpress's observed attention), mean over the kv head's
//                  query heads; the last recent_size keys always kept;
//   snapkv         the mean attention of the last window_size rows on the keys before the window,
//                  average-pooled over keys (kernel_size, zero padding counted), mean over the kv
//                  head's query heads; the window always kept;
//   pyramidkv      snapkv's scores, with budgets falling with depth (KeptKeys).
// Each kv head keeps its top KeptKeys scores; adaptive (Ada-KV) protects each head's top
// int(kept * alpha_safeguard) keys and evicts the layer's lowest scores across all its heads.
#pragma once

#include <torch/torch.h>

#include <cstdint>

#include "core/block.h"
#include "engine/attention.h"
#include "engine/intervention.h"

namespace attnscope {

class KvPolicyScorer {
 public:
  KvPolicyScorer(const KvPolicy& policy, int64_t layer, int64_t num_layers, int64_t num_heads,
                 int64_t num_kv_heads, int64_t n);

  // Whether the scores read probabilities (streaming_llm's do not), and of which prefill rows.
  bool NeedsProbs() const { return sums_.defined(); }
  RowRanges Rows() const;
  // Probabilities (heads, m, keys) float32 of prefill rows [begin, begin + m).
  void OnProbs(int64_t begin, const torch::Tensor& probs);

  struct Choice {
    torch::Tensor scores;  // (kv_heads, n) float32
    torch::Tensor kept;    // (kv_heads, n) bool
  };
  Choice Decide() const;

 private:
  KvPolicy policy_;
  int64_t layer_, num_layers_, heads_, kv_heads_, n_;
  torch::Tensor
      sums_;  // float64: h2o (heads, n) column sums; snapkv (heads, n - window) window sums
};

// The decision's wire form: kept bits packed, per-head counts, scores when asked, and the bytes
// the evicted keys and values take in a cache whose entries are `bytes_per_key` (k and v, all of
// a position's head_dim) per kv head.
KvDecision ToKvDecision(int64_t layer, const KvPolicyScorer::Choice& choice, bool with_scores,
                        int64_t bytes_per_key);

}  // namespace attnscope
