// The tables of architectures, one row each: what differs between Llama, Mistral, Qwen2 and Qwen3
// (biases, q/k norms, sliding windows, RoPE base, the built-in chat format), and the checkpoint
// tensors with their names, shapes and when each is needed. Adding an architecture is a row in
// kArchs (arch.cpp); a new kind of tensor is a TensorId, a row in kTensors, and its use in
// engine/transformer.cpp (weights are bound by TensorId: engine/checkpoint/weights.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "text/chat/chat.h"

namespace attnscope {

struct ModelConfig;

enum class SlidingWindowRule {
  kNever,        // Llama: full causal attention
  kAllLayers,    // Mistral: `sliding_window` applies to every layer when set
  kQwenFlagged,  // Qwen2, Qwen3: only with `use_sliding_window`, on layers >= `max_window_layers`
};

struct ArchTraits {
  std::string_view model_type;
  bool qkv_bias;          // q/k/v projections always carry a bias (Qwen2)
  bool bias_from_config;  // `attention_bias` in config.json adds q/k/v/o biases (Llama, Qwen3)
  bool qk_norm;           // per-head RMSNorm of q and k before RoPE (Qwen3)
  SlidingWindowRule sliding;
  double default_rope_theta;
  // The built-in chat format of a checkpoint without a chat template whose tokenizer does not
  // say otherwise (text/chat/chat.h DetectChatFormat).
  ChatFormat chat_format;
};

// nullptr when `model_type` is not supported.
const ArchTraits* FindArch(std::string_view model_type);
std::string SupportedModelTypes();

enum class TensorId {
  kTokenEmbedding,  // (vocab, hidden)
  kFinalNorm,       // (hidden)
  kLmHead,          // (vocab, hidden); absent with tied embeddings
  kAttnNorm,        // (hidden)
  kWq,              // (heads * head_dim, hidden)
  kBq,              // (heads * head_dim)
  kWk,              // (kv_heads * head_dim, hidden)
  kBk,              // (kv_heads * head_dim)
  kWv,              // (kv_heads * head_dim, hidden)
  kBv,              // (kv_heads * head_dim)
  kQNorm,           // (head_dim)
  kKNorm,           // (head_dim)
  kWo,              // (hidden, heads * head_dim)
  kBo,              // (hidden)
  kMlpNorm,         // (hidden)
  kWGate,           // (intermediate, hidden)
  kWUp,             // (intermediate, hidden)
  kWDown,           // (hidden, intermediate)
  kCount,
};
inline constexpr size_t kTensorIdCount = static_cast<size_t>(TensorId::kCount);

struct TensorSpec {
  TensorId id;
  std::string name;            // checkpoint key, e.g. "model.layers.3.self_attn.q_proj.weight"
  std::vector<int64_t> shape;  // expected shape
  bool required;               // false: optional for this configuration (skipped)
  int64_t layer;               // -1 for global tensors
};

// Every tensor the configuration needs: global ones, then layer by layer.
std::vector<TensorSpec> ExpectedTensors(const ModelConfig& config);

}  // namespace attnscope
