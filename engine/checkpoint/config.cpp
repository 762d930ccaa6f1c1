#include "engine/checkpoint/config.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "core/files.h"
#include "core/status_macros.h"

namespace attnscope {
namespace {

using json = nlohmann::json;

// config.json and generation_config.json are small; anything larger is not one.
constexpr int64_t kMaxConfigBytes = 16 << 20;

absl::StatusOr<json> ReadJson(const std::string& path, bool required) {
  absl::StatusOr<std::string> text = ReadRegularFile(path, kMaxConfigBytes);
  if (!text.ok()) {
    if (absl::IsNotFound(text.status())) {
      if (required)
        return absl::NotFoundError(absl::StrCat(path, " does not exist or cannot be read"));
      return json();
    }
    return text.status();
  }
  json j = json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a valid JSON object"));
  }
  return j;
}

// Reads the integer `key`; `fallback` when absent or null; an error when present with another type
// or outside [min_value, max_value].
absl::StatusOr<int64_t> GetInt(const json& j, const std::string& path, const char* key,
                               std::optional<int64_t> fallback, int64_t min_value,
                               int64_t max_value) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (fallback) return *fallback;
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": required field '", key, "' is missing"));
  }
  if (!it->is_number_integer()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": field '", key, "' must be an integer"));
  }
  const int64_t v = it->get<int64_t>();
  if (v < min_value || v > max_value) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": field '", key, "' = ", v, " is outside [", min_value, ", ", max_value, "]"));
  }
  return v;
}

absl::StatusOr<double> GetDouble(const json& j, const std::string& path, const char* key,
                                 double fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_number())
    return absl::InvalidArgumentError(absl::StrCat(path, ": field '", key, "' must be a number"));
  const double v = it->get<double>();
  if (!std::isfinite(v))
    return absl::InvalidArgumentError(absl::StrCat(path, ": field '", key, "' must be finite"));
  return v;
}

bool GetBool(const json& j, const char* key, bool fallback) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_boolean()) return fallback;
  return it->get<bool>();
}

void AppendIds(const json& value, std::vector<int64_t>* ids) {
  if (value.is_number_integer()) {
    ids->push_back(value.get<int64_t>());
  } else if (value.is_array()) {
    for (const json& v : value) {
      if (v.is_number_integer()) ids->push_back(v.get<int64_t>());
    }
  }
}

absl::Status ParseRope(const json& j, const std::string& path, RopeConfig* rope) {
  auto it = j.find("rope_scaling");
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_object())
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": rope_scaling must be an object or null"));
  std::string type;
  if (it->contains("rope_type") && (*it)["rope_type"].is_string())
    type = (*it)["rope_type"].get<std::string>();
  else if (it->contains("type") && (*it)["type"].is_string())
    type = (*it)["type"].get<std::string>();
  if (type == "default" || type.empty()) return absl::OkStatus();
  ASSIGN_OR_RETURN(rope->factor, GetDouble(*it, path, "factor", 1.0));
  if (!(rope->factor > 0))
    return absl::InvalidArgumentError(absl::StrCat(path, ": rope_scaling.factor must be > 0"));
  if (type == "linear") {
    rope->scaling = RopeScaling::kLinear;
  } else if (type == "llama3") {
    rope->scaling = RopeScaling::kLlama3;
    ASSIGN_OR_RETURN(rope->low_freq_factor, GetDouble(*it, path, "low_freq_factor", 1.0));
    ASSIGN_OR_RETURN(rope->high_freq_factor, GetDouble(*it, path, "high_freq_factor", 4.0));
    ASSIGN_OR_RETURN(
        rope->original_max_positions,
        GetInt(*it, path, "original_max_position_embeddings", 8192, 1, int64_t{1} << 40));
    if (!(rope->low_freq_factor > 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": llama3 rope_scaling needs low_freq_factor > 0"));
    }
    if (!(rope->high_freq_factor > rope->low_freq_factor)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": llama3 rope_scaling needs high_freq_factor > low_freq_factor"));
    }
  } else {
    return absl::UnimplementedError(
        absl::StrCat(path, ": rope_scaling type '", type,
                     "' is not supported (supported: default, linear, llama3)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir) {
  const std::string path = dir + "/config.json";
  ASSIGN_OR_RETURN(json j, ReadJson(path, /*required=*/true));
  ModelConfig c;
  if (!j.contains("model_type") || !j["model_type"].is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": required field 'model_type' is missing"));
  }
  c.model_type = j["model_type"].get<std::string>();
  c.arch = FindArch(c.model_type);
  if (c.arch == nullptr) {
    return absl::UnimplementedError(
        absl::StrCat(path, ": model_type '", c.model_type,
                     "' is not supported (supported: ", SupportedModelTypes(), ")"));
  }
  constexpr int64_t kBig = int64_t{1} << 31;
  ASSIGN_OR_RETURN(c.vocab_size, GetInt(j, path, "vocab_size", std::nullopt, 1, kBig));
  ASSIGN_OR_RETURN(c.hidden_size, GetInt(j, path, "hidden_size", std::nullopt, 1, 1 << 20));
  ASSIGN_OR_RETURN(c.intermediate_size,
                   GetInt(j, path, "intermediate_size", std::nullopt, 1, 1 << 22));
  ASSIGN_OR_RETURN(c.num_layers, GetInt(j, path, "num_hidden_layers", std::nullopt, 1, 4096));
  ASSIGN_OR_RETURN(c.num_heads, GetInt(j, path, "num_attention_heads", std::nullopt, 1, 4096));
  ASSIGN_OR_RETURN(c.num_kv_heads, GetInt(j, path, "num_key_value_heads", c.num_heads, 1, 4096));
  if (c.num_heads % c.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": num_attention_heads (", c.num_heads,
                                                   ") is not a multiple of num_key_value_heads (",
                                                   c.num_kv_heads, ")"));
  }
  if (j.contains("head_dim") && !j["head_dim"].is_null()) {
    ASSIGN_OR_RETURN(c.head_dim, GetInt(j, path, "head_dim", std::nullopt, 2, 1 << 16));
  } else {
    if (c.hidden_size % c.num_heads != 0) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": hidden_size (", c.hidden_size,
                                                     ") is not a multiple of num_attention_heads (",
                                                     c.num_heads, ") and no head_dim is given"));
    }
    c.head_dim = c.hidden_size / c.num_heads;
  }
  if (c.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": head_dim ", c.head_dim, " must be even for rotary embeddings"));
  }
  ASSIGN_OR_RETURN(c.rms_norm_eps, GetDouble(j, path, "rms_norm_eps", 1e-6));
  ASSIGN_OR_RETURN(c.rope.theta, GetDouble(j, path, "rope_theta", c.arch->default_rope_theta));
  // Both appear under a root or a logarithm: zero or negative values make every output NaN.
  if (!(c.rms_norm_eps > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": rms_norm_eps = ", c.rms_norm_eps, " must be > 0"));
  }
  if (!(c.rope.theta > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": rope_theta = ", c.rope.theta, " must be > 0"));
  }
  RETURN_IF_ERROR(ParseRope(j, path, &c.rope));
  ASSIGN_OR_RETURN(c.max_position_embeddings,
                   GetInt(j, path, "max_position_embeddings", 4096, 1, int64_t{1} << 40));
  c.tie_word_embeddings = GetBool(j, "tie_word_embeddings", false);
  if (c.arch->qkv_bias) c.attention_bias = true;
  if (c.arch->bias_from_config && GetBool(j, "attention_bias", false)) {
    c.attention_bias = true;
    c.o_proj_bias = true;
  }

  c.sliding_window.assign(c.num_layers, 0);
  ASSIGN_OR_RETURN(const int64_t window, GetInt(j, path, "sliding_window", 0, 0, int64_t{1} << 40));
  switch (c.arch->sliding) {
    case SlidingWindowRule::kNever:
      break;
    case SlidingWindowRule::kAllLayers:
      std::fill(c.sliding_window.begin(), c.sliding_window.end(), window);
      break;
    case SlidingWindowRule::kQwenFlagged:
      if (GetBool(j, "use_sliding_window", false) && window > 0) {
        ASSIGN_OR_RETURN(const int64_t first,
                         GetInt(j, path, "max_window_layers", c.num_layers, 0, 4096));
        for (int64_t l = first; l < c.num_layers; ++l) c.sliding_window[l] = window;
      }
      break;
  }

  if (j.contains("bos_token_id") && j["bos_token_id"].is_number_integer())
    c.bos_token_id = j["bos_token_id"].get<int64_t>();
  if (j.contains("eos_token_id")) AppendIds(j["eos_token_id"], &c.eos_token_ids);

  ASSIGN_OR_RETURN(json gen, ReadJson(dir + "/generation_config.json", /*required=*/false));
  if (gen.is_object()) {
    if (gen.contains("eos_token_id")) AppendIds(gen["eos_token_id"], &c.eos_token_ids);
    if (!c.bos_token_id && gen.contains("bos_token_id") &&
        gen["bos_token_id"].is_number_integer()) {
      c.bos_token_id = gen["bos_token_id"].get<int64_t>();
    }
  }
  std::sort(c.eos_token_ids.begin(), c.eos_token_ids.end());
  c.eos_token_ids.erase(std::unique(c.eos_token_ids.begin(), c.eos_token_ids.end()),
                        c.eos_token_ids.end());
  return c;
}

}  // namespace attnscope
