// Test helper: writes a tiny random-weight checkpoint folder from the architecture table.
#pragma once

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>

#include "core/safetensors_writer.h"
#include "engine/checkpoint/arch.h"
#include "engine/checkpoint/config.h"

namespace attnscope::testing {

inline nlohmann::json TinyLlamaConfig() {
  return {{"model_type", "llama"},  {"hidden_size", 16},        {"intermediate_size", 24},
          {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"num_key_value_heads", 2},
          {"vocab_size", 32},       {"rms_norm_eps", 1e-5},     {"max_position_embeddings", 64},
          {"eos_token_id", 2}};
}

// Writes config.json and model.safetensors (every required tensor but `skip`, normal(0, 0.5)
// values stored as `dtype`, F32 or I32 bit patterns) into `dir`.
inline absl::Status WriteTinyCheckpoint(const std::string& dir, const nlohmann::json& cfg,
                                        const std::string& skip = "",
                                        const std::string& dtype = "F32", uint32_t seed = 1) {
  {
    std::ofstream out(dir + "/config.json");
    out << cfg.dump();
  }
  auto config = LoadModelConfig(dir);
  if (!config.ok()) return config.status();
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.5f);
  SafetensorsWriter w;
  for (const TensorSpec& spec : ExpectedTensors(*config)) {
    if (!spec.required || spec.name == skip) continue;
    int64_t n = 1;
    for (int64_t d : spec.shape) n *= d;
    std::vector<float> values(n);
    for (float& v : values) v = normal(rng);
    w.Add(spec.name, dtype, spec.shape, values.data(), values.size() * sizeof(float));
  }
  return w.Write(dir + "/model.safetensors");
}

// A fresh temporary folder, removed at destruction.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/attnscope-test-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() {
    if (std::system(("rm -rf '" + path_ + "'").c_str()) != 0)
      std::fprintf(stderr, "could not remove %s\n", path_.c_str());
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace attnscope::testing
