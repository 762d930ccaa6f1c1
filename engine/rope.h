// Rotary position embeddings, with Llama 3 and linear frequency scaling.
#pragma once

#include <torch/torch.h>

#include "engine/checkpoint/config.h"

namespace attnscope {

// Inverse frequencies, float32 (head_dim / 2), after the configuration's scaling.
torch::Tensor RopeInverseFrequencies(const RopeConfig& rope, int64_t head_dim);

// cos and sin tables for positions [pos0, pos0 + n): each (n, head_dim) in `dtype`.
std::pair<torch::Tensor, torch::Tensor> RopeTables(const torch::Tensor& inv_freq, int64_t pos0,
                                                   int64_t n, torch::ScalarType dtype);

// x: (heads, n, head_dim) rotated in place of a copy: x·cos + rotate_half(x)·sin.
torch::Tensor ApplyRope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);

}  // namespace attnscope
