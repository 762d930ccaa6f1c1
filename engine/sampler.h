// Next-token choice: greedy, or temperature / top-k / top-p sampling from a seeded generator.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <random>

#include "engine/sampling.h"

namespace attnscope {

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}
  // logits: (vocab) float32 on any device.
  int64_t Next(const torch::Tensor& logits);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

}  // namespace attnscope
