// How the next token is chosen (the Sampler in sampler.h does it).
#pragma once

#include <cstdint>

namespace attnscope {

struct SamplingParams {
  double temperature = 0.0;  // <= 0: greedy (argmax, lowest id on ties)
  int64_t top_k = 0;         // 0: off
  double top_p = 1.0;        // 1: off
  uint64_t seed = 0;         // same seed, same logits -> same tokens
};

}  // namespace attnscope
