// The model's weights in compute dtype on the compute device, named as in the checkpoint.
#pragma once

#include <torch/torch.h>

#include <array>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/checkpoint/arch.h"
#include "engine/checkpoint/config.h"

namespace attnscope {

// Tensors by their TensorId (engine/checkpoint/arch.h): the global ones, or one layer's; undefined
// where the configuration has none (biases, q/k norms).
struct TensorSet {
  const torch::Tensor& operator[](TensorId id) const { return t[static_cast<size_t>(id)]; }
  torch::Tensor& operator[](TensorId id) { return t[static_cast<size_t>(id)]; }
  std::array<torch::Tensor, kTensorIdCount> t;
};

struct Weights {
  TensorSet global;  // the embedding, the final norm, the LM head (the embedding itself when tied)
  std::vector<TensorSet> layers;
};

// Reads every tensor the configuration needs from the checkpoint folder, checking names and
// shapes, converting F32/F16/BF16 to `dtype` on `device`.
absl::StatusOr<Weights> LoadWeights(const std::string& dir, const ModelConfig& config,
                                    torch::Device device, torch::ScalarType dtype);

}  // namespace attnscope
