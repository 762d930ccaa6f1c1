// The model's weights in compute dtype on the compute device, named as in the checkpoint.
#pragma once

#include <torch/torch.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/checkpoint/config.h"

namespace attnscope {

struct LayerWeights {
  torch::Tensor attn_norm;  // (hidden)
  torch::Tensor wq;         // (heads * head_dim, hidden)
  torch::Tensor bq;         // (heads * head_dim) or undefined
  torch::Tensor wk;         // (kv_heads * head_dim, hidden)
  torch::Tensor bk;         // (kv_heads * head_dim) or undefined
  torch::Tensor wv;         // (kv_heads * head_dim, hidden)
  torch::Tensor bv;         // (kv_heads * head_dim) or undefined
  torch::Tensor wo;         // (hidden, heads * head_dim)
  torch::Tensor bo;         // (hidden) or undefined
  torch::Tensor mlp_norm;   // (hidden)
  torch::Tensor w_gate;     // (intermediate, hidden)
  torch::Tensor w_up;       // (intermediate, hidden)
  torch::Tensor w_down;     // (hidden, intermediate)
};

struct Weights {
  torch::Tensor token_embedding;  // (vocab, hidden)
  torch::Tensor final_norm;       // (hidden)
  torch::Tensor lm_head;          // (vocab, hidden); the embedding itself when tied
  std::vector<LayerWeights> layers;
};

// Reads every tensor the configuration needs from the checkpoint folder, checking names and
// shapes, converting F32/F16/BF16 to `dtype` on `device`.
absl::StatusOr<Weights> LoadWeights(const std::string& dir, const ModelConfig& config,
                                    torch::Device device, torch::ScalarType dtype);

}  // namespace attnscope
