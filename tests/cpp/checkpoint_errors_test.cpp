// Bad checkpoints give a precise status naming the file and the tensor, and never crash.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "core/safetensors.h"
#include "core/safetensors_writer.h"
#include "engine/checkpoint/arch.h"
#include "engine/checkpoint/config.h"
#include "engine/engine.h"
#include "tests/cpp/tiny_checkpoint.h"

namespace attnscope {
namespace {

using json = nlohmann::json;

json TinyConfig() { return testing::TinyLlamaConfig(); }

class CheckpointTest : public ::testing::Test {
 protected:
  void WriteText(const std::string& name, const std::string& text) {
    std::ofstream(dir_ + "/" + name, std::ios::binary) << text;
  }
  void WriteConfig(const json& cfg) { WriteText("config.json", cfg.dump()); }

  void WriteValid(const json& cfg, const std::string& skip = "", const std::string& dtype = "F32") {
    ASSERT_TRUE(testing::WriteTinyCheckpoint(dir_, cfg, skip, dtype).ok());
  }

  // Writes model.safetensors with a raw header and `data_bytes` zero bytes after it.
  void WriteRaw(const std::string& header, size_t data_bytes, uint64_t claimed_len = 0) {
    std::ofstream out(dir_ + "/model.safetensors", std::ios::binary);
    uint64_t len = claimed_len ? claimed_len : header.size();
    for (int i = 0; i < 8; ++i) out.put(static_cast<char>(len >> (8 * i)));
    out << header << std::string(data_bytes, '\0');
  }

  absl::Status LoadStatus() {
    EngineOptions options;
    options.model_dir = dir_;
    return Engine::Load(options).status();
  }

  testing::TempDir tmp_;
  std::string dir_ = tmp_.path();
};

void ExpectError(const absl::Status& s, absl::StatusCode code,
                 std::initializer_list<std::string> parts) {
  EXPECT_EQ(s.code(), code) << s;
  for (const auto& p : parts)
    EXPECT_NE(s.message().find(p), std::string::npos) << "'" << p << "' not in: " << s;
}

TEST_F(CheckpointTest, ValidCheckpointLoads) {
  WriteValid(TinyConfig());
  EXPECT_TRUE(LoadStatus().ok()) << LoadStatus();
}

TEST_F(CheckpointTest, MissingFolderOrConfig) {
  ExpectError(LoadStatus(), absl::StatusCode::kNotFound, {"config.json"});
}

TEST_F(CheckpointTest, MissingWeightsFile) {
  WriteConfig(TinyConfig());
  ExpectError(LoadStatus(), absl::StatusCode::kNotFound, {"model.safetensors", "pickle"});
}

TEST_F(CheckpointTest, BadJsonConfig) {
  WriteText("config.json", "{\"model_type\": \"llama\", ");
  ExpectError(LoadStatus(), absl::StatusCode::kInvalidArgument, {"config.json", "JSON"});
}

TEST_F(CheckpointTest, UnknownModelType) {
  json cfg = TinyConfig();
  cfg["model_type"] = "gpt2";
  WriteConfig(cfg);
  ExpectError(LoadStatus(), absl::StatusCode::kUnimplemented,
              {"gpt2", "llama, mistral, qwen2, qwen3"});
}

TEST_F(CheckpointTest, InconsistentHeads) {
  json cfg = TinyConfig();
  cfg["num_key_value_heads"] = 3;
  WriteConfig(cfg);
  ExpectError(LoadStatus(), absl::StatusCode::kInvalidArgument, {"num_key_value_heads"});
}

TEST_F(CheckpointTest, UnsupportedRopeScaling) {
  json cfg = TinyConfig();
  cfg["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  WriteConfig(cfg);
  ExpectError(LoadStatus(), absl::StatusCode::kUnimplemented, {"yarn"});
}

TEST_F(CheckpointTest, MissingTensor) {
  WriteValid(TinyConfig(), "model.layers.0.mlp.up_proj.weight");
  ExpectError(LoadStatus(), absl::StatusCode::kNotFound,
              {"model.layers.0.mlp.up_proj.weight", "model.safetensors"});
}

TEST_F(CheckpointTest, Qwen3NeedsItsQkNormsAndAttentionBiases) {
  json cfg = TinyConfig();
  cfg["model_type"] = "qwen3";
  cfg["head_dim"] = 6;  // not hidden / heads
  cfg["attention_bias"] = true;
  WriteConfig(cfg);
  auto config = LoadModelConfig(dir_);
  ASSERT_TRUE(config.ok()) << config.status();
  std::vector<std::string> names;  // name:first dimension of each tensor the checkpoint needs
  for (const TensorSpec& spec : ExpectedTensors(*config)) {
    if (spec.required) names.push_back(spec.name + ":" + std::to_string(spec.shape[0]));
  }
  for (const char* want :
       {"model.layers.0.self_attn.q_norm.weight:6", "model.layers.1.self_attn.k_norm.weight:6",
        "model.layers.0.self_attn.o_proj.bias:16", "model.layers.0.self_attn.q_proj.bias:24"})
    EXPECT_NE(std::find(names.begin(), names.end(), want), names.end()) << want;
  WriteValid(cfg);
  EXPECT_TRUE(LoadStatus().ok()) << LoadStatus();
  WriteValid(cfg, "model.layers.1.self_attn.k_norm.weight");
  ExpectError(LoadStatus(), absl::StatusCode::kNotFound,
              {"model.layers.1.self_attn.k_norm.weight", "model.safetensors"});
  cfg["model_type"] = "qwen2";  // no q/k norms
  WriteConfig(cfg);
  for (const TensorSpec& spec : ExpectedTensors(*LoadModelConfig(dir_)))
    EXPECT_FALSE(spec.required && spec.name.find("_norm.weight") != std::string::npos &&
                 spec.name.find("self_attn") != std::string::npos)
        << spec.name;
}

TEST_F(CheckpointTest, WrongShape) {
  WriteValid(TinyConfig());
  json cfg = TinyConfig();
  cfg["intermediate_size"] = 20;  // the stored MLP tensors no longer fit
  WriteConfig(cfg);
  ExpectError(LoadStatus(), absl::StatusCode::kInvalidArgument,
              {"model.layers.0.mlp.gate_proj.weight", "[24, 16]", "[20, 16]", "model.safetensors"});
}

TEST_F(CheckpointTest, NonFloatWeights) {
  WriteValid(TinyConfig(), "", "I32");
  ExpectError(LoadStatus(), absl::StatusCode::kInvalidArgument,
              {"I32", "model.embed_tokens.weight"});
}

TEST_F(CheckpointTest, UnknownDType) {
  WriteRaw(R"({"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}})", 8);
  auto f = SafetensorsFile::Open(dir_ + "/model.safetensors");
  ExpectError(f.status(), absl::StatusCode::kInvalidArgument,
              {"'a'", "unknown dtype", "Q7", "model.safetensors"});
}

TEST_F(CheckpointTest, HeaderLengthPastEndOfFile) {
  WriteRaw(R"({})", 0, /*claimed_len=*/1 << 20);
  auto f = SafetensorsFile::Open(dir_ + "/model.safetensors");
  ExpectError(f.status(), absl::StatusCode::kInvalidArgument,
              {"header length", "model.safetensors"});
}

TEST_F(CheckpointTest, FileShorterThanHeaderLength) {
  WriteText("model.safetensors", "abc");
  auto f = SafetensorsFile::Open(dir_ + "/model.safetensors");
  ExpectError(f.status(), absl::StatusCode::kInvalidArgument, {"truncated"});
}

TEST_F(CheckpointTest, DataOffsetsOutsideFile) {
  WriteRaw(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8);
  auto f = SafetensorsFile::Open(dir_ + "/model.safetensors");
  ExpectError(f.status(), absl::StatusCode::kInvalidArgument, {"'w'", "data_offsets", "truncated"});
}

TEST_F(CheckpointTest, TruncatedRealCheckpoint) {
  WriteValid(TinyConfig());
  const std::string path = dir_ + "/model.safetensors";
  struct stat st {};
  stat(path.c_str(), &st);
  ASSERT_EQ(truncate(path.c_str(), st.st_size - 100), 0);
  ExpectError(LoadStatus(), absl::StatusCode::kInvalidArgument,
              {"model.safetensors", "outside the data section"});
}

TEST_F(CheckpointTest, SizeDisagreesWithShape) {
  WriteRaw(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8);
  auto f = SafetensorsFile::Open(dir_ + "/model.safetensors");
  ExpectError(f.status(), absl::StatusCode::kInvalidArgument, {"'w'", "8 bytes", "12"});
}

TEST_F(CheckpointTest, OverlappingTensors) {
  WriteRaw(
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
      16);
  auto f = SafetensorsFile::Open(dir_ + "/model.safetensors");
  ExpectError(f.status(), absl::StatusCode::kInvalidArgument, {"'a'", "'b'", "overlap"});
}

TEST_F(CheckpointTest, HeaderNotJson) {
  WriteRaw("not json at all", 0);
  auto f = SafetensorsFile::Open(dir_ + "/model.safetensors");
  ExpectError(f.status(), absl::StatusCode::kInvalidArgument, {"JSON"});
}

TEST_F(CheckpointTest, ShardIndexCannotEscapeFolder) {
  WriteConfig(TinyConfig());
  WriteText("model.safetensors.index.json",
            R"({"weight_map":{"model.norm.weight":"../../etc/passwd"}})");
  ExpectError(LoadStatus(), absl::StatusCode::kInvalidArgument,
              {"plain file name", "model.norm.weight"});
}

TEST_F(CheckpointTest, ShardIndexNamesMissingShard) {
  WriteConfig(TinyConfig());
  WriteText("model.safetensors.index.json",
            R"({"weight_map":{"model.norm.weight":"model-00001-of-00002.safetensors"}})");
  ExpectError(LoadStatus(), absl::StatusCode::kNotFound, {"model-00001-of-00002.safetensors"});
}

TEST_F(CheckpointTest, ConfigFieldsAndEosFromGenerationConfig) {
  json cfg = TinyConfig();
  cfg["model_type"] = "mistral";
  cfg["sliding_window"] = 7;
  cfg["head_dim"] = 12;
  cfg["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", 8.0},
                         {"low_freq_factor", 1.0},
                         {"high_freq_factor", 4.0},
                         {"original_max_position_embeddings", 32}};
  WriteConfig(cfg);
  WriteText("generation_config.json", R"({"eos_token_id": [2, 9, 11]})");
  auto c = LoadModelConfig(dir_);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim, 12);
  EXPECT_EQ(c->sliding_window, std::vector<int64_t>({7, 7}));
  EXPECT_EQ(c->eos_token_ids, std::vector<int64_t>({2, 9, 11}));
  EXPECT_EQ(c->rope.scaling, RopeScaling::kLlama3);
  EXPECT_EQ(c->rope.original_max_positions, 32);
}

TEST_F(CheckpointTest, QwenSlidingWindowOnlyWhenFlagged) {
  json cfg = TinyConfig();
  cfg["model_type"] = "qwen2";
  cfg["num_hidden_layers"] = 3;
  cfg["num_key_value_heads"] = 4;
  cfg["sliding_window"] = 5;
  cfg["max_window_layers"] = 1;
  WriteConfig(cfg);
  auto off = LoadModelConfig(dir_);
  ASSERT_TRUE(off.ok());
  EXPECT_EQ(off->sliding_window, std::vector<int64_t>({0, 0, 0}));
  EXPECT_TRUE(off->attention_bias);
  cfg["use_sliding_window"] = true;
  WriteConfig(cfg);
  auto on = LoadModelConfig(dir_);
  ASSERT_TRUE(on.ok());
  EXPECT_EQ(on->sliding_window, std::vector<int64_t>({0, 5, 5}));
}

TEST_F(CheckpointTest, TokenIdModeRefusesText) {
  WriteValid(TinyConfig());
  EngineOptions options;
  options.model_dir = dir_;
  auto engine = Engine::Load(options);
  ASSERT_TRUE(engine.ok());
  ExpectError((*engine)->Encode("hello").status(), absl::StatusCode::kFailedPrecondition,
              {"token ids"});
}

}  // namespace
}  // namespace attnscope
