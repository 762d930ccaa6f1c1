// Next-token choice: greedy, or temperature / top-k / top-p sampling from a seeded generator.
#pragma once

#include <cstdint>
#include <random>

#include <torch/torch.h>

namespace attnscope {

struct SamplingParams {
  double temperature = 0.0;  // <= 0: greedy (argmax, lowest id on ties)
  int64_t top_k = 0;         // 0: off
  double top_p = 1.0;        // 1: off
  uint64_t seed = 0;         // same seed, same logits -> same tokens
};

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
