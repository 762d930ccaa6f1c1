// The decoder-only transformer forward pass (Llama / Mistral / Qwen2) over a KV cache.
#pragma once

#include <torch/torch.h>

#include <vector>

#include "absl/status/statusor.h"
#include "engine/bounds.h"
#include "engine/capture_processor.h"
#include "engine/checkpoint/config.h"
#include "engine/checkpoint/weights.h"
#include "engine/layer_intervention.h"
#include "engine/rope.h"

namespace attnscope {

struct KVCache {
  std::vector<torch::Tensor> k;  // per layer (kv_heads, slots, head_dim)
  std::vector<torch::Tensor> v;  // per layer (kv_heads, slots, head_dim)
  // Per layer, once a KV policy has compacted it: the position each slot holds, (kv_heads, slots)
  // int64, -1 for padding; and the slots in use. Undefined: slot i holds position i (capacity
  // slots).
  std::vector<torch::Tensor> positions;
  std::vector<int64_t> filled;
  int64_t length = 0;  // positions fed
  int64_t capacity = 0;
  RopeTableCache rope;  // this generation's cos and sin tables

  // The bytes of layer l's keys and values, and of a compacted layer's slot positions.
  int64_t LayerBytes(size_t l) const {
    int64_t bytes = (k[l].numel() + v[l].numel()) * static_cast<int64_t>(k[l].element_size());
    if (l < positions.size() && positions[l].defined()) {
      bytes += positions[l].numel() * static_cast<int64_t>(positions[l].element_size());
    }
    return bytes;
  }
};

struct ForwardOptions {
  int64_t query_block = kQueryBlock;        // attention rows at once on the explicit path
  int64_t block_elements = kBlockElements;  // and at most this many probabilities at once
  int64_t row_multiple = 1;    // query blocks start at multiples of this (pooled capture)
  bool fast_attention = true;  // fused attention for layers whose probabilities are not needed
};

class Transformer {
 public:
  Transformer(ModelConfig config, Weights weights, torch::Device device, torch::ScalarType dtype);

  KVCache NewCache(int64_t capacity) const;

  // Feeds `ids` at positions [cache.length, cache.length + n), appending to the cache; hands the
  // probabilities of the layers `capture` wants to it. Returns the float32 logits (vocab) of the
  // last position.
  // `interventions` (or null) hide keys and ablate heads, or measure what they would hide.
  absl::StatusOr<torch::Tensor> Forward(const std::vector<int64_t>& ids, KVCache* cache,
                                        CaptureProcessor* capture, Phase phase, int64_t step,
                                        const ForwardOptions& options,
                                        ForwardInterventions* interventions = nullptr) const;
  // The same, the ids (int64, n) already on the model's device: decode feeds the token it chose
  // there without a copy from the host (which would wait for the work queued before it).
  absl::StatusOr<torch::Tensor> Forward(const torch::Tensor& ids, KVCache* cache,
                                        CaptureProcessor* capture, Phase phase, int64_t step,
                                        const ForwardOptions& options,
                                        ForwardInterventions* interventions = nullptr) const;

 private:
  torch::Tensor RmsNorm(const torch::Tensor& x, const torch::Tensor& weight) const;

  ModelConfig config_;
  Weights weights_;
  torch::Device device_;
  torch::ScalarType dtype_;
  torch::Tensor inv_freq_;  // (head_dim / 2) float32 on device
};

}  // namespace attnscope
