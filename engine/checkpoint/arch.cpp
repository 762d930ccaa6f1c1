#include "engine/checkpoint/arch.h"

#include "absl/strings/str_cat.h"
#include "engine/checkpoint/config.h"

namespace attnscope {
namespace {

constexpr ArchTraits kArchs[] = {
    // model_type  qkv_bias bias_from_config sliding                           rope_theta
    {"llama", false, true, SlidingWindowRule::kNever, 10000.0},
    {"mistral", false, false, SlidingWindowRule::kAllLayers, 10000.0},
    {"qwen2", true, false, SlidingWindowRule::kQwenFlagged, 10000.0},
};

struct NameEntry {
  TensorId id;
  const char* name;  // "%" stands for the layer index
  bool per_layer;
};

constexpr NameEntry kTensorNames[] = {
    {TensorId::kTokenEmbedding, "model.embed_tokens.weight", false},
    {TensorId::kFinalNorm, "model.norm.weight", false},
    {TensorId::kLmHead, "lm_head.weight", false},
    {TensorId::kAttnNorm, "model.layers.%.input_layernorm.weight", true},
    {TensorId::kWq, "model.layers.%.self_attn.q_proj.weight", true},
    {TensorId::kBq, "model.layers.%.self_attn.q_proj.bias", true},
    {TensorId::kWk, "model.layers.%.self_attn.k_proj.weight", true},
    {TensorId::kBk, "model.layers.%.self_attn.k_proj.bias", true},
    {TensorId::kWv, "model.layers.%.self_attn.v_proj.weight", true},
    {TensorId::kBv, "model.layers.%.self_attn.v_proj.bias", true},
    {TensorId::kWo, "model.layers.%.self_attn.o_proj.weight", true},
    {TensorId::kBo, "model.layers.%.self_attn.o_proj.bias", true},
    {TensorId::kMlpNorm, "model.layers.%.post_attention_layernorm.weight", true},
    {TensorId::kWGate, "model.layers.%.mlp.gate_proj.weight", true},
    {TensorId::kWUp, "model.layers.%.mlp.up_proj.weight", true},
    {TensorId::kWDown, "model.layers.%.mlp.down_proj.weight", true},
};

std::string LayerName(const char* pattern, int64_t layer) {
  std::string s = pattern;
  const auto pos = s.find('%');
  if (pos != std::string::npos) s.replace(pos, 1, std::to_string(layer));
  return s;
}

}  // namespace

const ArchTraits* FindArch(std::string_view model_type) {
  for (const auto& a : kArchs) {
    if (a.model_type == model_type) return &a;
  }
  return nullptr;
}

std::string SupportedModelTypes() {
  std::string out;
  for (const auto& a : kArchs)
    absl::StrAppend(&out, out.empty() ? "" : ", ", std::string(a.model_type));
  return out;
}

std::vector<TensorSpec> ExpectedTensors(const ModelConfig& c) {
  const int64_t q_dim = c.num_heads * c.head_dim;
  const int64_t kv_dim = c.num_kv_heads * c.head_dim;
  auto shape_of = [&](TensorId id) -> std::vector<int64_t> {
    switch (id) {
      case TensorId::kTokenEmbedding:
        return {c.vocab_size, c.hidden_size};
      case TensorId::kLmHead:
        return {c.vocab_size, c.hidden_size};
      case TensorId::kFinalNorm:
      case TensorId::kAttnNorm:
      case TensorId::kMlpNorm:
      case TensorId::kBo:
        return {c.hidden_size};
      case TensorId::kWq:
        return {q_dim, c.hidden_size};
      case TensorId::kBq:
        return {q_dim};
      case TensorId::kWk:
      case TensorId::kWv:
        return {kv_dim, c.hidden_size};
      case TensorId::kBk:
      case TensorId::kBv:
        return {kv_dim};
      case TensorId::kWo:
        return {c.hidden_size, q_dim};
      case TensorId::kWGate:
      case TensorId::kWUp:
        return {c.intermediate_size, c.hidden_size};
      case TensorId::kWDown:
        return {c.hidden_size, c.intermediate_size};
    }
    return {};
  };
  auto required = [&](TensorId id) {
    switch (id) {
      case TensorId::kLmHead:
        return !c.tie_word_embeddings;
      case TensorId::kBq:
      case TensorId::kBk:
      case TensorId::kBv:
        return c.attention_bias;
      case TensorId::kBo:
        return c.o_proj_bias;
      default:
        return true;
    }
  };
  std::vector<TensorSpec> specs;
  for (const auto& e : kTensorNames) {
    if (!e.per_layer) specs.push_back({e.id, e.name, shape_of(e.id), required(e.id), -1});
  }
  for (int64_t l = 0; l < c.num_layers; ++l) {
    for (const auto& e : kTensorNames) {
      if (e.per_layer)
        specs.push_back({e.id, LayerName(e.name, l), shape_of(e.id), required(e.id), l});
    }
  }
  return specs;
}

}  // namespace attnscope
