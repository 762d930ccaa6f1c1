#include "engine/checkpoint/arch.h"

#include "absl/strings/str_cat.h"
#include "engine/checkpoint/config.h"

namespace attnscope {
namespace {

constexpr ArchTraits kArchs[] = {
    // model_type qkv_bias bias_from_config qk_norm sliding rope_theta chat_format
    {"llama", false, true, false, SlidingWindowRule::kNever, 10000.0, ChatFormat::kLlama2},
    {"mistral", false, false, false, SlidingWindowRule::kAllLayers, 10000.0, ChatFormat::kMistral},
    {"qwen2", true, false, false, SlidingWindowRule::kQwenFlagged, 10000.0, ChatFormat::kChatML},
    {"qwen3", false, true, true, SlidingWindowRule::kQwenFlagged, 10000.0, ChatFormat::kChatML},
};

// The sizes a tensor's shape is made of.
enum class Dim { kVocab, kHidden, kIntermediate, kQ, kKV, kHeadDim };
// When a tensor is in the checkpoint.
enum class Needed {
  kAlways,
  kUntied,   // the LM head: not with tie_word_embeddings
  kQkvBias,  // q/k/v biases: ModelConfig::attention_bias
  kOBias,    // the output projection's bias: ModelConfig::o_proj_bias
  kQkNorm,   // the architecture's qk_norm
};

struct TensorRow {
  TensorId id;
  const char* name;  // "%" stands for the layer index
  bool per_layer;
  int rank;
  Dim shape[2];
  Needed needed;
};

constexpr TensorRow kTensors[] = {
    {TensorId::kTokenEmbedding,
     "model.embed_tokens.weight",
     false,
     2,
     {Dim::kVocab, Dim::kHidden},
     Needed::kAlways},
    {TensorId::kFinalNorm, "model.norm.weight", false, 1, {Dim::kHidden}, Needed::kAlways},
    {TensorId::kLmHead, "lm_head.weight", false, 2, {Dim::kVocab, Dim::kHidden}, Needed::kUntied},
    {TensorId::kAttnNorm,
     "model.layers.%.input_layernorm.weight",
     true,
     1,
     {Dim::kHidden},
     Needed::kAlways},
    {TensorId::kWq,
     "model.layers.%.self_attn.q_proj.weight",
     true,
     2,
     {Dim::kQ, Dim::kHidden},
     Needed::kAlways},
    {TensorId::kBq, "model.layers.%.self_attn.q_proj.bias", true, 1, {Dim::kQ}, Needed::kQkvBias},
    {TensorId::kWk,
     "model.layers.%.self_attn.k_proj.weight",
     true,
     2,
     {Dim::kKV, Dim::kHidden},
     Needed::kAlways},
    {TensorId::kBk, "model.layers.%.self_attn.k_proj.bias", true, 1, {Dim::kKV}, Needed::kQkvBias},
    {TensorId::kWv,
     "model.layers.%.self_attn.v_proj.weight",
     true,
     2,
     {Dim::kKV, Dim::kHidden},
     Needed::kAlways},
    {TensorId::kBv, "model.layers.%.self_attn.v_proj.bias", true, 1, {Dim::kKV}, Needed::kQkvBias},
    {TensorId::kQNorm,
     "model.layers.%.self_attn.q_norm.weight",
     true,
     1,
     {Dim::kHeadDim},
     Needed::kQkNorm},
    {TensorId::kKNorm,
     "model.layers.%.self_attn.k_norm.weight",
     true,
     1,
     {Dim::kHeadDim},
     Needed::kQkNorm},
    {TensorId::kWo,
     "model.layers.%.self_attn.o_proj.weight",
     true,
     2,
     {Dim::kHidden, Dim::kQ},
     Needed::kAlways},
    {TensorId::kBo,
     "model.layers.%.self_attn.o_proj.bias",
     true,
     1,
     {Dim::kHidden},
     Needed::kOBias},
    {TensorId::kMlpNorm,
     "model.layers.%.post_attention_layernorm.weight",
     true,
     1,
     {Dim::kHidden},
     Needed::kAlways},
    {TensorId::kWGate,
     "model.layers.%.mlp.gate_proj.weight",
     true,
     2,
     {Dim::kIntermediate, Dim::kHidden},
     Needed::kAlways},
    {TensorId::kWUp,
     "model.layers.%.mlp.up_proj.weight",
     true,
     2,
     {Dim::kIntermediate, Dim::kHidden},
     Needed::kAlways},
    {TensorId::kWDown,
     "model.layers.%.mlp.down_proj.weight",
     true,
     2,
     {Dim::kHidden, Dim::kIntermediate},
     Needed::kAlways},
};
static_assert(sizeof(kTensors) / sizeof(kTensors[0]) == kTensorIdCount, "a row per TensorId");

std::string LayerName(const char* pattern, int64_t layer) {
  std::string s = pattern;
  const auto pos = s.find('%');
  if (pos != std::string::npos) s.replace(pos, 1, std::to_string(layer));
  return s;
}

int64_t SizeOf(Dim d, const ModelConfig& c) {
  switch (d) {
    case Dim::kVocab:
      return c.vocab_size;
    case Dim::kHidden:
      return c.hidden_size;
    case Dim::kIntermediate:
      return c.intermediate_size;
    case Dim::kQ:
      return c.num_heads * c.head_dim;
    case Dim::kKV:
      return c.num_kv_heads * c.head_dim;
    case Dim::kHeadDim:
      return c.head_dim;
  }
  return 0;
}

bool IsNeeded(Needed n, const ModelConfig& c) {
  switch (n) {
    case Needed::kAlways:
      return true;
    case Needed::kUntied:
      return !c.tie_word_embeddings;
    case Needed::kQkvBias:
      return c.attention_bias;
    case Needed::kOBias:
      return c.o_proj_bias;
    case Needed::kQkNorm:
      return c.arch != nullptr && c.arch->qk_norm;
  }
  return true;
}

TensorSpec SpecOf(const TensorRow& row, const ModelConfig& c, int64_t layer) {
  std::vector<int64_t> shape;
  for (int i = 0; i < row.rank; ++i) shape.push_back(SizeOf(row.shape[i], c));
  return {row.id, layer >= 0 ? LayerName(row.name, layer) : row.name, std::move(shape),
          IsNeeded(row.needed, c), layer};
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
  std::vector<TensorSpec> specs;
  for (const auto& row : kTensors) {
    if (!row.per_layer) specs.push_back(SpecOf(row, c, -1));
  }
  for (int64_t l = 0; l < c.num_layers; ++l) {
    for (const auto& row : kTensors) {
      if (row.per_layer) specs.push_back(SpecOf(row, c, l));
    }
  }
  return specs;
}

}  // namespace attnscope
