// The transformer's side of a request's interventions (intervention.h): what one layer hides and
// ablates, and the state it keeps across steps.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "core/block.h"
#include "engine/intervention.h"

namespace attnscope {

class KvPolicyScorer;  // kv_policy.h

// One layer's share of a request's interventions, and the state they keep across steps (the
// prefill's means of mean-ablated heads).
class LayerInterventions {
 public:
  LayerInterventions() = default;
  // Those of `interventions` that touch `layer`.
  LayerInterventions(const Interventions& interventions, int64_t layer, int64_t num_heads);

  // Knockouts, or a KV policy's evictions once it has decided (before that the layer runs as the
  // unmodified model's, on the same kernels).
  bool hides_keys() const { return !rules_.empty() || evicted_at_.defined(); }
  bool knocks_out() const { return !rules_.empty(); }
  const KvPolicy* policy() const { return policy_; }
  bool ablates() const { return !zero_.empty() || !mean_.empty(); }

  // Sets the hidden entries of scores (heads, rows, keys) for query rows starting at first_query
  // to the lowest finite float, as the causal mask does: the policy's evictions and the knockouts.
  void HideKeys(torch::Tensor& scores, int64_t first_query) const;
  // The knockouts' share of HideKeys (a compacted cache no longer holds the evicted keys).
  void HideKnockouts(torch::Tensor& scores, int64_t first_query) const;

  // The mass the row at `position` puts on the keys this layer hides from it, per head:
  // probs_row (heads, keys) float32 → (heads) float32.
  torch::Tensor HiddenMass(const torch::Tensor& probs_row, int64_t position) const;

  // Ablates the heads of attn (heads, n, dim), the attention output of positions [pos0, pos0 + n)
  // before the output projection. A mean-ablated head's mean is taken over the prefill's rows
  // (phase prefill) and kept for the decode steps.
  void Ablate(torch::Tensor& attn, Phase phase);

  // A KV policy's decision: the keys [0, kept.size(1)) not kept by kv head g (kept: (kv_heads,
  // keys) bool) are hidden from query heads [g * group, (g + 1) * group) at every position from
  // `from_position` on (keys evicted by an earlier decision stay hidden from its position on).
  void Evict(const torch::Tensor& kept, int64_t group, int64_t from_position);

 private:
  struct Rule {
    std::vector<int64_t> heads;  // empty: all
    std::vector<PositionRange> keys, queries;
  };
  std::vector<Rule> rules_;
  const KvPolicy* policy_ = nullptr;  // the request's, which outlives the generation
  // (heads, keys) int64, after the policy's decisions: the position from which each key is hidden
  // (the largest int64 for keys still held)
  torch::Tensor evicted_at_;
  std::vector<int64_t> zero_, mean_;
  torch::Tensor means_;  // (mean_.size(), dim), from the prefill
};

// A forward pass's interventions: the intervened run applies them; the reference run (measure)
// applies none and reports, per layer that hides keys, the mass its last row puts on them.
struct ForwardInterventions {
  std::vector<LayerInterventions> layers;  // one per layer
  bool measure = false;
  std::vector<torch::Tensor> hidden_mass;  // out (measure): per layer (heads) float32, or undefined
  std::vector<KvDecision> decisions;       // out: the KV policy's decisions of this pass, per layer
  // The intervened run's KV policy scorers, per layer, from the prefill to the last decision.
  std::vector<std::shared_ptr<KvPolicyScorer>> scorers;
};

}  // namespace attnscope
