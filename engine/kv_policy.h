// A KV policy's scores and choice for one layer at the end of the prefill, as kvpress's presses
// make them, and at its later decisions (decode_interval) (intervention.h names the policies;
// DESIGN.md says which rows each score sums):
//   streaming_llm  1 for the first n_sink keys and the most recent ones, 0 for the pruned middle;
//   h2o            the attention a key receives, summed over every prefill row and divided by the
//                  rows that see it (n - j: kvpress's observed attention), mean over the kv head's
//                  query heads; the last recent_size keys always kept; at a decode decision the
//                  sums run over every row so far (the intervened run's) and divide by length - j;
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
  // One layer's scorer for a whole generation over a prompt of n tokens.
  KvPolicyScorer(const KvPolicy& policy, int64_t layer, int64_t num_layers, int64_t num_heads,
                 int64_t num_kv_heads, int64_t n);

  // Whether the scores read the probabilities of this phase's rows (streaming_llm's never do; only
  // h2o's, with decode_interval, read decode rows), and which prefill rows.
  bool NeedsProbs(Phase phase) const;
  RowRanges Rows() const;
  // Probabilities (heads, m, keys) float32 of the rows at positions [position, position + m).
  void OnProbs(int64_t position, const torch::Tensor& probs);

  struct Choice {
    torch::Tensor scores;  // (kv_heads, length) float32; -inf for keys evicted before
    torch::Tensor kept;    // (kv_heads, length) bool
    torch::Tensor alive;   // (kv_heads, length) bool: the keys held before this decision
  };
  // Decides among the keys [0, length) still held (every one at the first decision): each kv
  // head keeps its budget, KeptKeys of the prompt.
  Choice Decide(int64_t length);

 private:
  KvPolicy policy_;
  int64_t layer_, num_layers_, heads_, kv_heads_, n_, kept_;
  bool reads_prefill_ = false, reads_decode_ = false;
  // float64 on the probabilities' device: h2o (heads, positions) column sums of every row read;
  // snapkv (heads, n - window) window sums.
  torch::Tensor sums_;
  torch::Tensor kept_before_;  // (kv_heads, length) bool: the last decision's
};

// The decision's wire form: kept bits packed, per-head counts, scores when asked, and the bytes
// the keys and values it evicted take in a cache whose entries are `bytes_per_key` (k and v, all
// of a position's head_dim) per kv head.
KvDecision ToKvDecision(int64_t step, int64_t layer, const KvPolicyScorer::Choice& choice,
                        bool with_scores, int64_t bytes_per_key);

}  // namespace attnscope
