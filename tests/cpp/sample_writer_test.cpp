// The C++ client's sample writer without a server: a stream of messages in, a file out, read back
// with the checkpoint reader (core/safetensors.h); and each malformed chunk refused by name.
#include "samples/sample_writer.h"

#include <dirent.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/safetensors.h"
#include "core/status_macros.h"
#include "proto/contract.h"
#include "samples/pickle_writer.h"

namespace attnscope {
namespace {

class SampleWriterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/attnscope-writer-XXXXXX";
    dir_ = mkdtemp(tmpl);
    path_ = dir_ + "/sample";
  }
  void TearDown() override { std::system(("rm -rf " + dir_).c_str()); }

  // 2 layers x 2 heads, a 3-token prompt, dense float32 over prefill and decode.
  v1::StreamHeader Header(Form form = Form::kDense) {
    v1::StreamHeader h;
    h.mutable_model()->set_name("tiny");
    h.mutable_model()->set_num_layers(2);
    h.mutable_model()->set_num_heads(2);
    for (int64_t id : {5, 6, 7}) h.add_prompt_token_ids(id);
    CaptureSpec spec;
    spec.form = form;
    spec.top_k = form == Form::kTopK ? 2 : 0;
    spec.stats.row_entropy = 1;
    FillCaptureSpec(spec, 2, 2, h.mutable_capture());
    h.set_max_new_tokens(2);
    return h;
  }
  // A block of `rows` rows at `begin` over `keys` keys, values i + 0.5, cut into `pieces`.
  std::vector<v1::AttentionChunk> Attention(Phase phase, int64_t step, int64_t layer, int64_t begin,
                                            int64_t rows, int64_t keys, int pieces = 1) {
    BlockHeader h;
    h.phase = phase;
    h.step = step;
    h.layer = layer;
    h.heads = {0, 1};
    h.query_begin = begin;
    h.query_end = begin + rows;
    h.key_length = keys;
    h.shape = {2, rows, keys};
    std::vector<float> v(2 * rows * keys);
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i) + 0.5f;
    const std::string bytes(reinterpret_cast<const char*>(v.data()), v.size() * 4);
    std::vector<v1::AttentionChunk> out;
    const size_t per = (v.size() + pieces - 1) / pieces * 4;
    for (size_t at = 0; at < bytes.size(); at += per) {
      v1::AttentionChunk c;
      FillBlockHeader(h, &c);
      c.set_byte_offset(static_cast<int64_t>(at));
      c.set_data(bytes.substr(at, per));
      out.push_back(c);
    }
    return out;
  }
  v1::StatisticChunk Entropy(int64_t layer, int64_t begin, int64_t rows) {
    BlockHeader h;
    h.kind = BlockKind::kStatistic;
    h.stat = StatKind::kRowEntropy;
    h.layer = layer;
    h.heads = {0, 1};
    h.query_begin = begin;
    h.query_end = begin + rows;
    h.key_length = 3;
    h.shape = {2, rows};
    v1::StatisticChunk c;
    FillBlockHeader(h, &c);
    c.set_data(std::string(static_cast<size_t>(2 * rows * 4), '\0'));
    return c;
  }
  v1::TokenEvent Token(int64_t step, int64_t id) {
    v1::TokenEvent t;
    t.set_step(step);
    t.set_id(id);
    t.set_piece("p");
    return t;
  }
  v1::StreamTrailer Trailer() {
    v1::StreamTrailer t;
    t.add_token_ids(8);
    t.add_token_ids(9);
    t.set_text("pp");
    return t;
  }

  // A whole one-layer-pair sample streamed into `w` (the first test's stream); Finish's status.
  absl::Status WriteSample(SampleWriter* w, Form form = Form::kDense) {
    RETURN_IF_ERROR(w->OnHeader(Header(form), 0));
    for (int64_t layer : {0, 1}) {
      for (const auto& c : Attention(Phase::kPrefill, 0, layer, 0, 3, 3, /*pieces=*/2))
        RETURN_IF_ERROR(w->OnAttention(c));
      RETURN_IF_ERROR(w->OnStatistic(Entropy(layer, 0, 3)));
    }
    RETURN_IF_ERROR(w->OnToken(Token(1, 8)));
    for (int64_t layer : {0, 1}) {
      for (const auto& c : Attention(Phase::kDecode, 1, layer, 3, 1, 4))
        RETURN_IF_ERROR(w->OnAttention(c));
    }
    RETURN_IF_ERROR(w->OnToken(Token(2, 9)));
    return w->Finish(Trailer(), "prompt");
  }
  std::string Read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

  std::string dir_, path_;
};

// Issue 21.C2: another user who can write to the output folder plants the work files' old fixed
// names as symlinks to a file of the victim's; the capture must neither follow nor truncate them.
TEST_F(SampleWriterTest, PlantedWorkFileNamesAreNeverFollowed) {
  const std::string victim = dir_ + "/victim";
  std::ofstream(victim) << "precious";
  for (const char* suffix : {".data.partial", ".partial"}) {
    ASSERT_EQ(symlink(victim.c_str(), (path_ + suffix).c_str()), 0);
  }
  for (SampleFormat format : {SampleFormat::kSafetensors, SampleFormat::kPickle}) {
    SampleWriter w(path_, format, /*replace=*/true);
    const absl::Status s = WriteSample(&w);
    ASSERT_TRUE(s.ok()) << s;
    EXPECT_EQ(Read(victim), "precious");
    EXPECT_TRUE(CheckStoredSample(path_, format).ok());
  }
}

// Issue 21.C3: two captures of one sample name into one folder; the one that finishes second must
// not replace the first's file and believe it stored its own.
TEST_F(SampleWriterTest, ASampleThatAppearedMeanwhileIsNeverReplaced) {
  for (SampleFormat format : {SampleFormat::kSafetensors, SampleFormat::kPickle}) {
    std::remove(path_.c_str());
    SampleWriter first(path_, format), second(path_, format);
    ASSERT_TRUE(second.OnHeader(Header(), 0).ok());  // started before the first one finished
    ASSERT_TRUE(WriteSample(&first).ok());
    const std::string stored = Read(path_);
    SampleWriter late(path_, format);
    const absl::Status s = WriteSample(&late);
    EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists) << s;
    EXPECT_NE(s.message().find("appeared while this run wrote it"), std::string::npos) << s;
    EXPECT_EQ(Read(path_), stored);
    SampleWriter again(path_, format, /*replace=*/true);  // --overwrite replaces it
    EXPECT_TRUE(WriteSample(&again).ok());
  }
  // No work file is left behind.
  for (const auto& name : {std::string("sample")}) {
    std::string listing;
    for (auto* d = opendir(dir_.c_str()); d != nullptr;) {
      dirent* e = readdir(d);
      if (e == nullptr) {
        closedir(d);
        break;
      }
      if (e->d_name[0] != '.') listing += std::string(e->d_name) + " ";
    }
    EXPECT_EQ(listing, name + " ");
  }
}

// Issue 21.C9: a rerun skips only a whole sample; one cut short (or not a sample) is redone.
TEST_F(SampleWriterTest, OnlyAWholeSampleCountsAsStored) {
  for (SampleFormat format : {SampleFormat::kSafetensors, SampleFormat::kPickle}) {
    std::remove(path_.c_str());
    EXPECT_EQ(CheckStoredSample(path_, format).code(), absl::StatusCode::kNotFound);
    SampleWriter w(path_, format);
    ASSERT_TRUE(WriteSample(&w).ok());
    EXPECT_TRUE(CheckStoredSample(path_, format).ok());
    const std::string whole = Read(path_);
    for (size_t cut : {size_t{0}, size_t{5}, size_t{100}, whole.size() - 1}) {
      std::ofstream(path_, std::ios::binary | std::ios::trunc) << whole.substr(0, cut);
      EXPECT_EQ(CheckStoredSample(path_, format).code(), absl::StatusCode::kDataLoss) << cut;
    }
    std::ofstream(path_, std::ios::binary | std::ios::trunc) << whole << "x";
    EXPECT_EQ(CheckStoredSample(path_, format).code(), absl::StatusCode::kDataLoss);
  }
  // A header whose offsets claim more than any file holds (the sum must not overflow).
  const std::string header =
      R"({"__metadata__": {"attnscope": "{}"}, "t": {"dtype": "U8", "shape": [1], )"
      R"("data_offsets": [0, 18446744073709551615]}})";
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  std::ofstream(path_, std::ios::binary | std::ios::trunc) << file << header << "x";
  EXPECT_EQ(CheckStoredSample(path_, SampleFormat::kSafetensors).code(),
            absl::StatusCode::kDataLoss);
}

TEST_F(SampleWriterTest, StoresEveryBlockUnderItsNameAndTheSpecAsText) {
  SampleWriter w(path_, SampleFormat::kSafetensors);
  ASSERT_TRUE(w.OnHeader(Header(), 0).ok());
  for (int64_t layer : {0, 1}) {
    for (const auto& c : Attention(Phase::kPrefill, 0, layer, 0, 3, 3, /*pieces=*/4))
      ASSERT_TRUE(w.OnAttention(c).ok());
    ASSERT_TRUE(w.OnStatistic(Entropy(layer, 0, 3)).ok());
  }
  ASSERT_TRUE(w.OnToken(Token(1, 8)).ok());
  for (int64_t layer : {0, 1}) {
    for (const auto& c : Attention(Phase::kDecode, 1, layer, 3, 1, 4))
      ASSERT_TRUE(w.OnAttention(c).ok());
  }
  ASSERT_TRUE(w.OnToken(Token(2, 9)).ok());
  absl::Status done = w.Finish(Trailer(), "prompt");
  ASSERT_TRUE(done.ok()) << done;

  auto file = SafetensorsFile::Open(path_);
  ASSERT_TRUE(file.ok()) << file.status();
  const auto& t = (*file)->tensors();
  for (const char* name :
       {"attention.prefill.0.0.0", "attention.prefill.1.0.0", "attention.decode.0.1.3",
        "attention.decode.1.1.3", "statistic.row_entropy.prefill.1.0.0", "prompt_token_ids",
        "token_ids"}) {
    EXPECT_TRUE(t.count(name)) << name;
  }
  const TensorView& decode = t.at("attention.decode.1.1.3");
  EXPECT_EQ(decode.shape, (std::vector<int64_t>{2, 1, 4}));
  float last;
  std::memcpy(&last, static_cast<const char*>(decode.data) + decode.nbytes - 4, 4);
  EXPECT_EQ(last, 7.5f);
  const TensorView& prefill = t.at("attention.prefill.0.0.0");
  float values[18];
  std::memcpy(values, prefill.data, sizeof(values));
  for (int i = 0; i < 18; ++i) EXPECT_EQ(values[i], i + 0.5f);
  const auto meta = nlohmann::json::parse((*file)->metadata().at("attnscope"));
  // The resolved spec once, as the proto's JSON (every field, proto field names).
  EXPECT_EQ(meta["format_version"], 2);
  EXPECT_FALSE(meta.contains("capture_spec"));
  const auto& capture = meta["capture"];
  EXPECT_EQ(capture["form"], "FORM_DENSE");
  EXPECT_EQ(capture["layers"], nlohmann::json::array({0, 1}));
  EXPECT_EQ(capture["heads"], nlohmann::json::array({0, 1}));
  EXPECT_EQ(capture["statistics"]["row_entropy"], true);
  EXPECT_EQ(capture["statistics"]["sink_mass"], "0");  // int64: a string in the proto's JSON
  EXPECT_EQ(capture["pool_op"], "POOL_MEAN");
  EXPECT_EQ(capture["last_queries"], "0");
  EXPECT_EQ(meta["token_pieces"].size(), 2u);
}

TEST_F(SampleWriterTest, PickleAssemblesFullMatrices) {
  SampleWriter w(path_ + ".pkl", SampleFormat::kPickle);
  ASSERT_TRUE(w.OnHeader(Header(), 0).ok());
  for (int64_t layer : {0, 1}) {
    for (const auto& c : Attention(Phase::kPrefill, 0, layer, 0, 3, 3, 2))
      ASSERT_TRUE(w.OnAttention(c).ok());
  }
  ASSERT_TRUE(w.OnToken(Token(1, 8)).ok());
  ASSERT_TRUE(w.Finish(Trailer(), "").ok());
  std::ifstream in(path_ + ".pkl", std::ios::binary);
  std::stringstream bytes;
  bytes << in.rdbuf();
  const std::string pickle = bytes.str();
  EXPECT_EQ(pickle.substr(0, 2), std::string("\x80\x04", 2));
  EXPECT_EQ(pickle.back(), '.');
  EXPECT_NE(pickle.find("_reconstruct"), std::string::npos);
  // One token of two: T = 3 rows, not the 4 the header allowed, so the matrices were compacted in
  // place. Two [1, 2, 3, 3] float32 tensors, each block value where the layout puts it.
  const PrototypePickleLayout layout{2, 2, 3};
  ASSERT_EQ(static_cast<int64_t>(pickle.size()), layout.FileSize());
  for (int64_t slot = 0; slot < 2; ++slot) {
    EXPECT_EQ(
        pickle.substr(layout.DataOffset(slot) - layout.Head(slot).size(), layout.Head(slot).size()),
        layout.Head(slot));
    for (int i = 0; i < 18; ++i) {
      float v;
      std::memcpy(&v, pickle.data() + layout.DataOffset(slot) + 4 * i, 4);
      EXPECT_EQ(v, i + 0.5f) << "layer " << slot << " element " << i;
    }
  }
}

// Matrices larger than the writer's 4 MiB staging buffer and its compaction batches: a 1000-token
// prompt whose blocks come in pieces that end mid-row, 59 decode rows of a generation that stopped
// at 60 of 113 tokens (compacted from 1112 rows to 1059; at 1112 keys a row, the buffer fills in
// the zeros after a prompt row's 1000 values). Every value where the prototype's layout
// puts it, every other entry 0.
TEST_F(SampleWriterTest, PickleOfAShortGenerationAcrossStagingAndCompactionBatches) {
  const int64_t P = 1000, max_new = 113, tokens = 60, T = P + tokens - 1;
  v1::StreamHeader header = Header();
  header.clear_prompt_token_ids();
  for (int64_t i = 0; i < P; ++i) header.add_prompt_token_ids(5);
  header.set_max_new_tokens(max_new);
  SampleWriter w(path_ + ".pkl", SampleFormat::kPickle);
  ASSERT_TRUE(w.OnHeader(header, 0).ok());
  for (int64_t layer : {0, 1}) {
    for (const auto& c : Attention(Phase::kPrefill, 0, layer, 0, P, P, 7))
      ASSERT_TRUE(w.OnAttention(c).ok());
  }
  for (int64_t step = 1; step <= tokens; ++step) {
    ASSERT_TRUE(w.OnToken(Token(step, 8)).ok());
    if (step == tokens) break;  // the last token's row is never computed
    for (int64_t layer : {0, 1}) {
      for (const auto& c : Attention(Phase::kDecode, step, layer, P + step - 1, 1, P + step))
        ASSERT_TRUE(w.OnAttention(c).ok());
    }
  }
  ASSERT_TRUE(w.Finish(Trailer(), "").ok());
  std::ifstream in(path_ + ".pkl", std::ios::binary);
  std::stringstream bytes;
  bytes << in.rdbuf();
  const std::string pickle = bytes.str();
  const PrototypePickleLayout layout{2, 2, T};
  ASSERT_EQ(static_cast<int64_t>(pickle.size()), layout.FileSize());
  EXPECT_EQ(pickle.back(), '.');
  int64_t wrong = 0;
  for (int64_t slot = 0; slot < 2; ++slot) {
    EXPECT_EQ(
        pickle.substr(layout.DataOffset(slot) - layout.Head(slot).size(), layout.Head(slot).size()),
        layout.Head(slot));
    const char* data = pickle.data() + layout.DataOffset(slot);
    for (int64_t h = 0; h < 2; ++h) {
      for (int64_t r = 0; r < T; ++r) {
        const int64_t keys = r < P ? P : r + 1;  // the block's keys: the prompt's, or a step's
        for (int64_t k = 0; k < T; ++k) {
          float v;
          std::memcpy(&v, data + ((h * T + r) * T + k) * 4, 4);
          const float want =
              k >= keys ? 0.0f
                        : static_cast<float>(r < P ? (h * P + r) * P + k : h * keys + k) + 0.5f;
          if (v != want && ++wrong <= 5) {
            ADD_FAILURE() << "layer " << slot << " head " << h << " row " << r << " key " << k
                          << ": " << v << ", want " << want;
          }
        }
      }
    }
  }
  EXPECT_EQ(wrong, 0);
}

TEST_F(SampleWriterTest, RefusesMalformedChunksByName) {
  struct Case {
    const char* want;
    std::function<void(v1::AttentionChunk*)> spoil;
  };
  const Case cases[] = {
      {"not captured", [](v1::AttentionChunk* c) { c->set_layer(5); }},
      {"expected [2, 3, 3]", [](v1::AttentionChunk* c) { c->set_shape(2, 4); }},
      {"form or element type differs", [](v1::AttentionChunk* c) { c->set_form(v1::FORM_POOLED); }},
      {"unknown value", [](v1::AttentionChunk* c) { c->set_phase(static_cast<v1::Phase>(7)); }},
      {"block_bytes", [](v1::AttentionChunk* c) { c->set_block_bytes(8); }},
      {"rows [", [](v1::AttentionChunk* c) { c->set_query_end(100); }},
      {"starts mid-way",
       [](v1::AttentionChunk* c) {
         c->set_byte_offset(8);
         c->set_data(c->data().substr(8));
       }},
      {"indices in a block that is not top_k",
       [](v1::AttentionChunk* c) { c->set_indices("xxxx"); }},
  };
  for (const Case& k : cases) {
    SampleWriter w(path_, SampleFormat::kSafetensors);
    ASSERT_TRUE(w.OnHeader(Header(), 0).ok());
    v1::AttentionChunk c = Attention(Phase::kPrefill, 0, 0, 0, 3, 3)[0];
    k.spoil(&c);
    absl::Status s = w.OnAttention(c);
    EXPECT_TRUE(absl::IsDataLoss(s)) << k.want << ": " << s;
    EXPECT_NE(s.message().find(k.want), absl::string_view::npos) << s.message();
  }
  // An incomplete block is refused at the end; a chunk before the header at once.
  SampleWriter w(path_, SampleFormat::kSafetensors);
  EXPECT_TRUE(absl::IsDataLoss(w.OnAttention(Attention(Phase::kPrefill, 0, 0, 0, 3, 3)[0])));
  ASSERT_TRUE(w.OnHeader(Header(), 0).ok());
  ASSERT_TRUE(w.OnAttention(Attention(Phase::kPrefill, 0, 0, 0, 3, 3, 2)[0]).ok());
  absl::Status s = w.Finish(Trailer(), "");
  EXPECT_NE(s.message().find("is incomplete"), absl::string_view::npos) << s;
  EXPECT_NE(access(path_.c_str(), F_OK), 0);
  v1::StatisticChunk bad = Entropy(0, 0, 3);
  bad.set_kind("perplexity");  // beside statistic ROW_ENTROPY
  EXPECT_NE(w.OnStatistic(bad).message().find("row_entropy and kind 'perplexity' disagree"),
            absl::string_view::npos);
  bad.clear_statistic();  // a server before 0.2 sends the name only
  EXPECT_NE(w.OnStatistic(bad).message().find("unknown statistic 'perplexity'"),
            absl::string_view::npos);
}

TEST_F(SampleWriterTest, TopKIndicesAreCheckedAgainstTheKeys) {
  SampleWriter w(path_, SampleFormat::kSafetensors);
  ASSERT_TRUE(w.OnHeader(Header(Form::kTopK), 0).ok());
  BlockHeader h;
  h.heads = {0, 1};
  h.query_end = 3;
  h.key_length = 3;
  h.form = Form::kTopK;
  h.shape = {2, 3, 2};
  v1::AttentionChunk c;
  FillBlockHeader(h, &c);
  c.set_data(std::string(48, '\0'));
  std::vector<int32_t> idx(12, 1);
  idx[5] = 3;  // past the 3 keys
  c.set_indices(std::string(reinterpret_cast<const char*>(idx.data()), 48));
  EXPECT_NE(w.OnAttention(c).message().find("top_k index 3 outside the keys"),
            absl::string_view::npos);
}

}  // namespace
}  // namespace attnscope
