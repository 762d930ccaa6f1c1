// Model hyper-parameters read from a Hugging Face checkpoint folder (config.json and
// generation_config.json).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/checkpoint/arch.h"

namespace attnscope {

enum class RopeScaling { kNone, kLinear, kLlama3 };

struct RopeConfig {
  double theta = 10000.0;
  RopeScaling scaling = RopeScaling::kNone;
  double factor = 1.0;                    // linear and llama3
  double low_freq_factor = 1.0;           // llama3
  double high_freq_factor = 4.0;          // llama3
  int64_t original_max_positions = 8192;  // llama3
};

struct ModelConfig {
  const ArchTraits* arch = nullptr;  // from model_type
  std::string model_type;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;  // config's head_dim when given, else hidden_size / num_heads
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  int64_t max_position_embeddings = 4096;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // bias on q/k/v (and o for Llama's attention_bias)
  bool o_proj_bias = false;
  // Sliding window per layer: 0 = full causal attention. Size num_layers.
  std::vector<int64_t> sliding_window;
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;  // from config.json and generation_config.json, deduplicated
};

// Reads `dir/config.json` (required) and `dir/generation_config.json` (optional).
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir);

}  // namespace attnscope
