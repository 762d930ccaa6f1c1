// The engine API: request validation, stopping rules, cancellation, concurrency, the fast path
// against the reference path, and the capture size estimate.
#include "engine/engine.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <iterator>
#include <limits>
#include <optional>
#include <thread>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "engine/attention.h"
#include "engine/capture_processor.h"
#include "engine/rope.h"
#include "tests/cpp/tiny_checkpoint.h"

namespace attnscope {
namespace {

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    ASSERT_TRUE(testing::WriteTinyCheckpoint(dir_->path(), testing::TinyLlamaConfig()).ok());
    EngineOptions options;
    options.model_dir = dir_->path();
    auto engine = Engine::Load(options);
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = engine->release();
  }
  static void TearDownTestSuite() {
    delete engine_;
    delete dir_;
  }
  static GenerateRequest Request(int64_t max_new = 8) {
    GenerateRequest r;
    r.prompt_ids = {1, 5, 9, 3, 7, 11, 4};
    r.max_new_tokens = max_new;
    r.ignore_eos = true;
    return r;
  }
  // A request whose greedy continuation meets the eos id (2): the first prompt that leads there.
  static std::optional<GenerateRequest> EosRequest() {
    for (int64_t first = 3; first < 32; ++first) {
      GenerateRequest eos = Request(64 - 7);
      eos.prompt_ids[0] = first;
      eos.ignore_eos = false;
      auto e = engine_->Generate(eos, {}, nullptr, nullptr);
      if (e.ok() && e->finish == FinishReason::kEos) return eos;
    }
    return std::nullopt;
  }
  static testing::TempDir* dir_;
  static Engine* engine_;
};
testing::TempDir* EngineTest::dir_ = nullptr;
Engine* EngineTest::engine_ = nullptr;

// Collects everything; optionally cancels after a given number of tokens.
class RecordingSink : public AttentionSink {
 public:
  absl::Status OnBlock(const Block& b) override {
    bytes += b.header.value_bytes() + b.header.index_bytes();
    if (b.header.kind == BlockKind::kAttention) ++blocks;
    return absl::OkStatus();
  }
  absl::Status OnToken(int64_t step, int64_t id) override {
    tokens.push_back(id);
    if (cancel_after > 0 && static_cast<int64_t>(tokens.size()) == cancel_after) cancel.Cancel();
    return absl::OkStatus();
  }
  std::vector<int64_t> tokens;
  int64_t bytes = 0, blocks = 0, cancel_after = 0;
  CancelToken cancel;
};

TEST_F(EngineTest, ModelInfo) {
  const ModelInfo& info = engine_->info();
  EXPECT_EQ(info.model_type, "llama");
  EXPECT_EQ(info.num_layers, 2);
  EXPECT_EQ(info.num_heads, 4);
  EXPECT_EQ(info.num_kv_heads, 2);
  EXPECT_EQ(info.head_dim, 4);
  EXPECT_EQ(info.vocab_size, 32);
  EXPECT_EQ(info.dtype, "float32");
  EXPECT_EQ(info.device, "cpu");
}

TEST_F(EngineTest, BadRequestsGetPreciseStatuses) {
  CaptureSpec none;
  struct Case {
    std::function<void(GenerateRequest&, CaptureSpec&)> mutate;
    absl::StatusCode code;
    std::string text;
  } cases[] = {
      {[](auto& r, auto&) { r.prompt_ids.clear(); }, absl::StatusCode::kInvalidArgument, "empty"},
      {[](auto& r, auto&) { r.prompt_ids[2] = 32; }, absl::StatusCode::kOutOfRange,
       "token id 32 at position 2"},
      {[](auto& r, auto&) { r.prompt_ids[0] = -1; }, absl::StatusCode::kOutOfRange,
       "outside the vocabulary (0-31)"},
      {[](auto& r, auto&) { r.prompt_ids.assign(65, 1); }, absl::StatusCode::kOutOfRange,
       "max_length"},
      {[](auto& r, auto&) { r.max_new_tokens = -1; }, absl::StatusCode::kOutOfRange,
       "max_new_tokens"},
      {[](auto& r, auto&) { r.sampling.top_p = 0; }, absl::StatusCode::kInvalidArgument, "top_p"},
      {[](auto& r, auto&) { r.sampling.temperature = -1; }, absl::StatusCode::kInvalidArgument,
       "temperature"},
      {[](auto&, auto& c) {
         c.form = Form::kDense;
         c.layers = {2};
       },
       absl::StatusCode::kOutOfRange, "layer 2 requested, model has 2 layers (0-1)"},
      {[](auto&, auto& c) {
         c.form = Form::kDense;
         c.heads = {0, 4};
       },
       absl::StatusCode::kOutOfRange, "head 4 requested, model has 4 attention heads (0-3)"},
      {[](auto&, auto& c) { c.form = Form::kPooled; }, absl::StatusCode::kInvalidArgument, "pool"},
      {[](auto&, auto& c) { c.form = Form::kTopK; }, absl::StatusCode::kInvalidArgument, "top_k"},
      {[](auto&, auto& c) {
         c.form = Form::kDense;
         c.query_ranges = {{2, 9}};
       },
       absl::StatusCode::kOutOfRange, "past the prompt"},
      {[](auto&, auto& c) {
         c.form = Form::kDense;
         c.query_ranges = {{0, 3}, {2, 5}};
       },
       absl::StatusCode::kInvalidArgument, "overlap"},
      {[](auto&, auto& c) {
         c.form = Form::kDense;
         c.prefill = c.decode = false;
       },
       absl::StatusCode::kInvalidArgument, "neither"},
  };
  for (const auto& c : cases) {
    GenerateRequest r = Request();
    CaptureSpec spec = none;
    c.mutate(r, spec);
    auto result = engine_->Generate(r, spec, nullptr, nullptr);
    EXPECT_EQ(result.status().code(), c.code) << result.status();
    EXPECT_NE(result.status().message().find(c.text), std::string::npos) << result.status();
  }
}

TEST_F(EngineTest, StopsAtMaxNewTokensEosAndStopTokens) {
  auto r = engine_->Generate(Request(5), {}, nullptr, nullptr);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->tokens.size(), 5u);
  EXPECT_EQ(r->finish, FinishReason::kLength);
  EXPECT_EQ(r->decode_steps, 4);

  // Stop on the third token, whatever it is.
  GenerateRequest stop = Request(8);
  stop.stop_token_ids = {r->tokens[2]};
  auto s = engine_->Generate(stop, {}, nullptr, nullptr);
  ASSERT_TRUE(s.ok());
  const size_t first =
      std::find(r->tokens.begin(), r->tokens.end(), r->tokens[2]) - r->tokens.begin();
  EXPECT_EQ(s->tokens.size(), first + 1);
  EXPECT_EQ(s->finish, FinishReason::kStopToken);

  // The model's eos id (2) ends generation unless ignored: sample seeds until one meets it (a
  // random 64-token vocabulary meets it within a few), then check both ways on that seed.
  GenerateRequest eos = Request(64 - 7);
  eos.ignore_eos = false;
  eos.sampling.temperature = 1.0;
  bool met = false;
  for (uint64_t seed = 0; seed < 200 && !met; ++seed) {
    eos.sampling.seed = seed;
    auto e = engine_->Generate(eos, {}, nullptr, nullptr);
    ASSERT_TRUE(e.ok());
    if (e->finish != FinishReason::kEos) {
      EXPECT_EQ(std::count(e->tokens.begin(), e->tokens.end(), 2), 0)
          << "eos generated but not stopped at";
      continue;
    }
    met = true;
    EXPECT_EQ(e->tokens.back(), 2);
    EXPECT_EQ(std::count(e->tokens.begin(), e->tokens.end(), 2), 1);
    GenerateRequest ignoring = eos;
    ignoring.ignore_eos = true;
    auto ig = engine_->Generate(ignoring, {}, nullptr, nullptr);
    ASSERT_TRUE(ig.ok());
    EXPECT_NE(ig->finish, FinishReason::kEos);
    EXPECT_GT(ig->tokens.size(), e->tokens.size()) << "ignore_eos went on past the eos";
  }
  EXPECT_TRUE(met) << "no seed in 200 generated the eos id: the stop on eos never ran";
}

TEST_F(EngineTest, ContextFullEndsGeneration) {
  GenerateRequest r = Request(100);  // 7 + 100 > 64 positions
  auto result = engine_->Generate(r, {}, nullptr, nullptr);
  ASSERT_TRUE(result.ok());
  EXPECT_EQ(result->finish, FinishReason::kContextFull);
  EXPECT_EQ(static_cast<int64_t>(result->tokens.size()), 64 - 7 + 1);
}

TEST_F(EngineTest, CancelStopsWithinOneStep) {
  RecordingSink sink;
  sink.cancel_after = 3;
  CaptureSpec spec;
  spec.form = Form::kDense;
  auto r = engine_->Generate(Request(50), spec, &sink, &sink.cancel);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->finish, FinishReason::kCancelled);
  EXPECT_EQ(r->tokens.size(), 3u);
  EXPECT_EQ(r->decode_steps, 2);
}

// Decode lookahead (each greedy step queued before the host reads the token it feeds; on CUDA by
// default, forced on here on the CPU): the same tokens, finish reasons and step counts as reading
// each token first, and the step queued past a stop is dropped.
TEST_F(EngineTest, DecodeLookaheadKeepsTokensAndStops) {
  EngineOptions options;
  options.model_dir = dir_->path();
  options.decode_lookahead = "on";
  auto loaded = Engine::Load(options);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const Engine& ahead = **loaded;
  auto same = [&](const GenerateRequest& r, const CaptureSpec& spec, const char* what) {
    RecordingSink a, b;
    auto x = engine_->Generate(r, spec, &a, nullptr);
    auto y = ahead.Generate(r, spec, &b, nullptr);
    ASSERT_TRUE(x.ok() && y.ok()) << what << ": " << x.status() << " " << y.status();
    EXPECT_EQ(x->tokens, y->tokens) << what;
    EXPECT_EQ(a.tokens, b.tokens) << what;
    EXPECT_EQ(x->finish, y->finish) << what;
    EXPECT_EQ(x->decode_steps, y->decode_steps) << what;
    EXPECT_EQ(a.blocks, b.blocks) << what;
    EXPECT_EQ(a.bytes, b.bytes) << what;
  };
  same(Request(12), {}, "length");
  auto r = engine_->Generate(Request(12), {}, nullptr, nullptr);
  ASSERT_TRUE(r.ok());
  GenerateRequest stop = Request(12);
  stop.stop_token_ids = {r->tokens[3]};
  same(stop, {}, "stop token");
  same(Request(100), {}, "context full");
  CaptureSpec prefill;  // captures only the prompt: lookahead stays on
  prefill.form = Form::kDense;
  prefill.decode = false;
  prefill.stats.row_entropy = true;
  same(stop, prefill, "prefill capture");
  CaptureSpec both;  // decode rows too: each token is read before its rows are computed
  both.form = Form::kDense;
  same(stop, both, "decode capture");
  const std::optional<GenerateRequest> eos = EosRequest();
  ASSERT_TRUE(eos.has_value())
      << "no prompt led greedy decoding to the eos id: the lookahead's eos drop never ran";
  same(*eos, {}, "eos");
  // A cancel during a step: the step queued behind it is dropped.
  RecordingSink sink;
  sink.cancel_after = 3;
  auto c = ahead.Generate(Request(50), {}, &sink, &sink.cancel);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->finish, FinishReason::kCancelled);
  EXPECT_EQ(c->tokens.size(), 3u);
  EXPECT_EQ(c->decode_steps, 2);
  // An unknown setting is refused at load.
  options.decode_lookahead = "sometimes";
  EXPECT_EQ(Engine::Load(options).status().code(), absl::StatusCode::kInvalidArgument);
}

// Everything a generation hands its sink, in order, with every byte of every block: the measure
// of "the same output" for the queued copies and the lookahead.
class TranscriptSink : public AttentionSink {
 public:
  explicit TranscriptSink(bool places = false) : places_(places) {}
  bool PlacesValues() const override { return places_; }
  absl::Status OnBlock(const Block& b) override {
    const BlockHeader& h = b.header;
    std::string values(static_cast<size_t>(h.value_bytes()), '\0');
    if (b.values != nullptr) {
      std::memcpy(values.data(), b.values, values.size());
    } else {
      b.fill(0, h.numel(), values.data());
    }
    std::string line = absl::StrCat("block ", BlockName(h), " keys ", h.key_length, " shape");
    for (int64_t d : h.shape) absl::StrAppend(&line, " ", d);
    absl::StrAppend(&line, " values ", absl::BytesToHexString(values));
    if (h.has_indices()) {
      absl::StrAppend(&line, " indices ",
                      absl::BytesToHexString(
                          absl::string_view(static_cast<const char*>(b.indices), h.index_bytes())));
    }
    calls.push_back(line);
    return absl::OkStatus();
  }
  absl::Status OnToken(int64_t step, int64_t id) override {
    calls.push_back(absl::StrCat("token ", step, " ", id));
    if (cancel_after > 0 && ++tokens == cancel_after) cancel.Cancel();
    return absl::OkStatus();
  }
  absl::Status OnDivergence(const DivergenceStep& d) override {
    calls.push_back(absl::StrCat("divergence ", d.step, " ", d.token, " ", d.kl));
    return absl::OkStatus();
  }
  absl::Status OnKvDecision(const KvDecision& d) override {
    calls.push_back(absl::StrCat("kv ", d.step, " ", d.layer, " ", d.keys));
    return absl::OkStatus();
  }
  std::vector<std::string> calls;
  int64_t tokens = 0, cancel_after = 0;
  CancelToken cancel;

 private:
  bool places_;
};

// Queued copies (on CUDA by default, forced on here on the CPU, where blocks then wait for the
// engine's flushes) and the lookahead over decode steps that capture statistics: the sink gets
// the same calls in the same order with the same bytes as when each block is handed over at
// once; a step queued past a stop leaves nothing behind.
TEST_F(EngineTest, QueuedCopiesHandTheSameBlocksInOrder) {
  auto load = [&](const char* queued, const char* lookahead, const char* warmup) {
    EngineOptions options;
    options.model_dir = dir_->path();
    options.queued_copies = queued;
    options.decode_lookahead = lookahead;
    options.warmup = warmup;
    auto loaded = Engine::Load(options);
    EXPECT_TRUE(loaded.ok()) << loaded.status();
    return std::move(loaded).value();
  };
  // The second engine also warms up at load (on CUDA by default): nothing of it stays behind.
  const std::unique_ptr<Engine> queued = load("on", "off", "off"), ahead = load("on", "on", "on");
  auto same = [&](const GenerateRequest& r, const CaptureSpec& spec, const std::string& what,
                  bool places = false, int64_t cancel_after = 0) {
    TranscriptSink want(places);
    want.cancel_after = cancel_after;
    auto x = engine_->Generate(r, spec, &want, &want.cancel);
    ASSERT_TRUE(x.ok()) << what << ": " << x.status();
    ASSERT_FALSE(want.calls.empty()) << what;
    for (const Engine* e : {queued.get(), ahead.get()}) {
      TranscriptSink got(places);
      got.cancel_after = cancel_after;
      auto y = e->Generate(r, spec, &got, &got.cancel);
      ASSERT_TRUE(y.ok()) << what << ": " << y.status();
      EXPECT_EQ(x->tokens, y->tokens) << what;
      EXPECT_EQ(x->finish, y->finish) << what;
      EXPECT_EQ(x->decode_steps, y->decode_steps) << what;
      ASSERT_EQ(want.calls.size(), got.calls.size()) << what;
      for (size_t i = 0; i < want.calls.size(); ++i) {
        ASSERT_EQ(want.calls[i], got.calls[i]) << what << ", call " << i;
      }
    }
  };
  CaptureSpec stats;  // decode statistics only: the lookahead holds them for the stop check
  stats.form = Form::kNone;
  stats.stats.row_entropy = true;
  stats.stats.sink_mass = 2;
  stats.stats.local_mass = 3;
  stats.stats.key_score = 4;
  same(Request(12), stats, "statistics, length");
  auto r = engine_->Generate(Request(12), {}, nullptr, nullptr);
  ASSERT_TRUE(r.ok());
  GenerateRequest stop = Request(12);
  stop.stop_token_ids = {r->tokens[3]};
  same(stop, stats, "statistics, stop token");
  same(Request(100), stats, "statistics, context full");
  same(Request(50), stats, "statistics, cancel", false, 3);
  const std::optional<GenerateRequest> eos = EosRequest();
  ASSERT_TRUE(eos.has_value());
  same(*eos, stats, "statistics, eos");
  CaptureSpec variance = stats;  // summed across steps: no lookahead
  variance.stats.key_score_variance = true;
  same(stop, variance, "key-score variance");
  CaptureSpec dense = stats;  // matrices in both phases, and the statistics
  dense.form = Form::kDense;
  same(stop, dense, "dense");
  same(stop, dense, "dense, placed by the sink", /*places=*/true);
  dense.heads = {3, 1};
  dense.element_type = ElementType::kBFloat16;
  same(stop, dense, "dense, two heads, bfloat16");
  CaptureSpec top = stats;
  top.form = Form::kTopK;
  top.top_k = 3;
  same(stop, top, "top-k");
  CaptureSpec pooled;
  pooled.form = Form::kPooled;
  pooled.pool = 2;
  same(stop, pooled, "pooled");
  CaptureSpec mean;
  mean.form = Form::kHeadMean;
  mean.decode = false;
  same(stop, mean, "head mean, prefill only");
  GenerateRequest what_if = Request(8);  // kv decisions between the blocks
  what_if.interventions.kv_policy.kind = KvPolicyKind::kH2o;
  what_if.interventions.kv_policy.budget = 4;
  what_if.interventions.kv_policy.decode_interval = 2;
  same(what_if, stats, "h2o every 2 steps");
  what_if.capture_reference = true;
  same(what_if, stats, "h2o, the reference captured");
  // An unknown setting is refused at load.
  EngineOptions options;
  options.model_dir = dir_->path();
  options.queued_copies = "later";
  EXPECT_EQ(Engine::Load(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.queued_copies = "auto";
  options.warmup = "twice";
  EXPECT_EQ(Engine::Load(options).status().code(), absl::StatusCode::kInvalidArgument);
}

// The processor's own queue: blocks wait for Flush, a held step waits even past the byte bound,
// Drop forgets the held step, and past the bound the oldest blocks go first.
TEST(CaptureProcessorTest, QueuedBlocksWaitForFlushHoldAndTheBound) {
  CaptureSpec spec;
  spec.form = Form::kNone;
  spec.stats.row_entropy = true;
  TranscriptSink sink;
  const int64_t heads = 2, prompt = 3;
  auto row = [&](int64_t keys) {  // one decode row of uniform probabilities
    return torch::full({heads, 1, keys}, 1.0f / static_cast<float>(keys));
  };
  auto decode = [&](CaptureProcessor& p, int64_t step) {
    const int64_t keys = prompt + step;
    const torch::Tensor probs = row(keys);
    const torch::Tensor scores = torch::zeros({heads, 1, keys});
    return p.OnProbs(Phase::kDecode, step, 0, keys - 1, probs, scores, torch::Tensor(), keys);
  };
  {
    CaptureProcessor p(spec, 1, heads, prompt, &sink, /*queued_copies=*/true);
    ASSERT_TRUE(decode(p, 1).ok());
    ASSERT_TRUE(decode(p, 2).ok());
    EXPECT_TRUE(sink.calls.empty());
    p.HoldFrom(3);
    ASSERT_TRUE(decode(p, 3).ok());
    ASSERT_TRUE(p.Flush(2).ok());
    EXPECT_EQ(sink.calls.size(), 2u);
    p.Drop(3);
    ASSERT_TRUE(p.Finish().ok());
    EXPECT_EQ(sink.calls.size(), 2u);
  }
  sink.calls.clear();
  {
    // Each block is 8 bytes (2 heads x 1 float32): a bound of 12 hands one over as the second
    // arrives, and never one of a held step.
    CaptureProcessor p(spec, 1, heads, prompt, &sink, /*queued_copies=*/true,
                       /*max_queued_bytes=*/12);
    ASSERT_TRUE(decode(p, 1).ok());
    EXPECT_TRUE(sink.calls.empty());
    ASSERT_TRUE(decode(p, 2).ok());
    ASSERT_EQ(sink.calls.size(), 1u);
    EXPECT_NE(sink.calls[0].find("statistic.row_entropy.decode.0.1."), std::string::npos)
        << sink.calls[0];
    p.HoldFrom(2);
    ASSERT_TRUE(decode(p, 3).ok());
    EXPECT_EQ(sink.calls.size(), 1u);
    ASSERT_TRUE(p.Flush().ok());
    ASSERT_EQ(sink.calls.size(), 3u);
    EXPECT_NE(sink.calls[2].find("statistic.row_entropy.decode.0.3."), std::string::npos)
        << sink.calls[2];
  }
  sink.calls.clear();
  {
    // A block over the bound is handed over at once, after the ones waiting, unless held.
    CaptureProcessor p(spec, 1, heads, prompt, &sink, /*queued_copies=*/true,
                       /*max_queued_bytes=*/8);
    ASSERT_TRUE(decode(p, 1).ok());
    EXPECT_TRUE(sink.calls.empty());
    spec.stats.row_entropy = false;
    spec.form = Form::kDense;  // a decode row: 2 heads x (3 + step) keys x 4 bytes
    CaptureProcessor dense(spec, 1, heads, prompt, &sink, /*queued_copies=*/true,
                           /*max_queued_bytes=*/8);
    ASSERT_TRUE(decode(dense, 1).ok());  // 16 bytes: at once
    ASSERT_EQ(sink.calls.size(), 1u);
    EXPECT_NE(sink.calls[0].find("attention.decode.0.1."), std::string::npos) << sink.calls[0];
    dense.HoldFrom(2);
    ASSERT_TRUE(decode(dense, 2).ok());  // held, whatever its size
    EXPECT_EQ(sink.calls.size(), 1u);
    dense.Drop(2);
    ASSERT_TRUE(dense.Finish().ok());
    EXPECT_EQ(sink.calls.size(), 1u);
    ASSERT_TRUE(p.Finish().ok());
    ASSERT_EQ(sink.calls.size(), 2u);
    EXPECT_NE(sink.calls[1].find("statistic.row_entropy.decode.0.1."), std::string::npos)
        << sink.calls[1];
  }
}

// max_new_tokens 0 is a forward pass over the prompt: its prefill blocks, no token (issue 21.A3:
// it used to become 16 tokens).
TEST_F(EngineTest, ZeroNewTokensIsThePromptOnly) {
  RecordingSink sink;
  CaptureSpec spec;
  spec.form = Form::kDense;
  auto r = engine_->Generate(Request(0), spec, &sink, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->tokens.empty());
  EXPECT_TRUE(sink.tokens.empty());
  EXPECT_EQ(r->decode_steps, 0);
  EXPECT_EQ(r->finish, FinishReason::kLength);
  const int64_t P = static_cast<int64_t>(Request().prompt_ids.size());
  EXPECT_EQ(sink.bytes, 2 * 4 * P * P * 4);  // both layers' [heads, P, P] prefill, nothing more
  EXPECT_EQ(sink.bytes, EstimateCaptureBytes(spec, 2, 4, P, 0));
}

TEST_F(EngineTest, SinkErrorAbortsGeneration) {
  class Failing : public AttentionSink {
    absl::Status OnBlock(const Block&) override { return absl::CancelledError("client went away"); }
  } sink;
  CaptureSpec spec;
  spec.form = Form::kDense;
  auto r = engine_->Generate(Request(), spec, &sink, nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled);
}

TEST_F(EngineTest, ConcurrentGenerationsMatchSequential) {
  GenerateRequest base = Request(10);
  base.sampling.temperature = 0.8;
  std::vector<std::vector<int64_t>> expected(4);
  for (int i = 0; i < 4; ++i) {
    GenerateRequest r = base;
    r.sampling.seed = i;
    expected[i] = engine_->Generate(r, {}, nullptr, nullptr)->tokens;
  }
  std::vector<std::vector<int64_t>> got(4);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      GenerateRequest r = base;
      r.sampling.seed = i;
      CaptureSpec spec;
      spec.form = Form::kDense;
      RecordingSink sink;
      got[i] = engine_->Generate(r, spec, &sink, nullptr)->tokens;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(got, expected);
}

TEST_F(EngineTest, EstimateMatchesBytesProduced) {
  struct Shape {
    Form form;
    int64_t pool, top_k, last;
  } shapes[] = {{Form::kDense, 0, 0, 0}, {Form::kHeadMean, 0, 0, 0}, {Form::kPooled, 3, 0, 0},
                {Form::kTopK, 0, 4, 0},  {Form::kDense, 0, 0, 2},    {Form::kNone, 0, 0, 0}};
  for (const auto& s : shapes) {
    CaptureSpec spec;
    spec.form = s.form;
    spec.pool = s.pool;
    spec.top_k = s.top_k;
    spec.last_queries = s.last;
    spec.heads = {1, 3};
    spec.element_type = ElementType::kFloat16;
    spec.stats.row_entropy = true;
    spec.stats.key_score = 3;
    spec.stats.key_score_variance = true;
    RecordingSink sink;
    GenerateRequest r = Request(6);
    ASSERT_TRUE(engine_->Generate(r, spec, &sink, nullptr).ok());
    EXPECT_EQ(sink.bytes, EstimateCaptureBytes(spec, 2, 4, 7, 6)) << FormName(s.form);
  }
}

// Whether this build and processor must compute statistics inside the pass (CpuFlashAttention):
// libtorch 2.x (whose x86 builds carry the sgemm it uses) on an x86 processor with AVX2 and FMA.
bool PassStatisticsExpected() {
#if defined(__x86_64__)
  return HasFusedAttention() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// Independent float64 attention: q (heads, n, d) at positions pos0..pos0+n-1 over k, v (kv_heads,
// pos0 + n, d), causal with an optional sliding window (keys with pos > query - window). Returns
// the output (heads, n, d) and the probabilities (heads, n, keys).
std::pair<torch::Tensor, torch::Tensor> ReferenceAttention64(const torch::Tensor& q,
                                                             const torch::Tensor& k,
                                                             const torch::Tensor& v, int64_t pos0,
                                                             int64_t window) {
  const int64_t heads = q.size(0), n = q.size(1), keys = k.size(1), group = heads / k.size(0);
  torch::Tensor q64 = q.to(torch::kFloat64), out = torch::zeros_like(q64);
  torch::Tensor probs = torch::zeros({heads, n, keys}, torch::kFloat64);
  torch::Tensor k64 = k.to(torch::kFloat64), v64 = v.to(torch::kFloat64);
  for (int64_t h = 0; h < heads; ++h) {
    torch::Tensor scores = q64[h].matmul(k64[h / group].t()) / std::sqrt(double(q.size(2)));
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < keys; ++j) {
        const int64_t pos = pos0 + i;
        if (j > pos || (window > 0 && j <= pos - window))
          scores[i][j] = -std::numeric_limits<double>::infinity();
      }
    }
    probs[h] = torch::softmax(scores, -1);
    out[h] = probs[h].matmul(v64[h / group]);
  }
  return {out, probs};
}

// pos0: 0 (prefill), 20 (a prompt continued past a cache: the masked branch every uncaptured layer
// takes in production), 36 (one decode row); window 0 (full), 5 and 64 (wider than the keys).
class AttentionPaths : public ::testing::TestWithParam<std::tuple<int64_t, int64_t>> {
 protected:
  // 8 query heads over 2 key/value heads, 37 keys; the queries from position pos0 on.
  void SetUp() override {
    std::tie(shape_.pos0, shape_.window) = GetParam();
    shape_.query_block = 8;
    torch::manual_seed(0);
    const int64_t keys = 37;
    // Scaled so that rows are neither uniform nor one-hot (scores of a few units).
    q_ = torch::randn({8, keys - shape_.pos0, 16}) * 2.0;
    k_ = torch::randn({2, keys, 16});
    v_ = torch::randn({2, keys, 16});
    std::tie(want_, want_probs_) = ReferenceAttention64(q_, k_, v_, shape_.pos0, shape_.window);
  }
  double MaxDiff(const torch::Tensor& got) const {
    return (got.to(torch::kFloat64) - want_).abs().max().item<double>();
  }
  // Runs `path` with a callback that collects every block's probabilities into (heads, n, keys)
  // (keys past a block's computed ones stay 0) and checks each block's entropy identity.
  template <typename Path>
  torch::Tensor Collect(Path path, torch::Tensor* out) {
    const int64_t n = q_.size(1), keys = k_.size(1);
    torch::Tensor got = torch::zeros({8, n, keys}, torch::kFloat64);
    ProbsCallback cb = [&](int64_t b, const torch::Tensor& probs, const torch::Tensor& scores,
                           const torch::Tensor& lse) {
      EXPECT_EQ(probs.scalar_type(), torch::kFloat32);
      got.narrow(1, b, probs.size(1)).narrow(2, 0, probs.size(2)).copy_(probs);
      if (lse.defined()) {  // probs = exp(scores - lse), rows summing to one
        EXPECT_LT((probs.sum(-1) - 1).abs().max().item<double>(), 1e-5);
      }
      return absl::OkStatus();
    };
    *out = path(&cb).value();
    return got;
  }
  AttentionShape shape_;
  torch::Tensor q_, k_, v_, want_, want_probs_;
};

TEST_P(AttentionPaths, ExplicitPathMatchesFloat64Reference) {
  EXPECT_LT(MaxDiff(ExplicitAttention(q_, k_, v_, shape_, nullptr).value()), 1e-5);
  torch::Tensor out;
  torch::Tensor probs = Collect(
      [&](const ProbsCallback* cb) { return ExplicitAttention(q_, k_, v_, shape_, cb); }, &out);
  EXPECT_LT((probs - want_probs_).abs().max().item<double>(), 1e-5);
  EXPECT_LT(MaxDiff(out), 1e-5);
}

TEST_P(AttentionPaths, FusedPathMatchesFloat64Reference) {
  if (!HasFusedAttention())
    GTEST_SKIP() << "libtorch < 2.0: the fused path is the explicit path itself";
  const double diff = MaxDiff(FusedAttention(q_, k_, v_, shape_, nullptr).value());
  torch::Tensor out;
  torch::Tensor probs = Collect(
      [&](const ProbsCallback* cb) { return FusedAttention(q_, k_, v_, shape_, cb); }, &out);
  const double pdiff = (probs - want_probs_).abs().max().item<double>();
  std::printf("pos0 %ld window %ld: max |fused - float64| output %.2e, probabilities %.2e\n",
              static_cast<long>(shape_.pos0), static_cast<long>(shape_.window), diff, pdiff);
  EXPECT_LT(diff, 1e-5);
  EXPECT_LT(MaxDiff(out), 1e-5);
  EXPECT_LT(pdiff, 1e-5);
  // Masked entries exactly 0, as on the explicit path.
  torch::Tensor masked = probs.masked_select(want_probs_ == 0);
  if (masked.numel() > 0) EXPECT_EQ(masked.abs().max().item<double>(), 0.0);
}

// bfloat16 compute: the fused path's probabilities are no further from float64 than the explicit
// (eager) path's, which is what eager transformers computes in bfloat16.
TEST_P(AttentionPaths, FusedPathInBfloat16NoFurtherThanEager) {
  if (!HasFusedAttention()) GTEST_SKIP() << "libtorch < 2.0: no fused path";
  torch::Tensor q = q_.to(torch::kBFloat16), k = k_.to(torch::kBFloat16),
                v = v_.to(torch::kBFloat16);
  auto [want, want_probs] = ReferenceAttention64(q, k, v, shape_.pos0, shape_.window);
  std::swap(q_, q);
  std::swap(k_, k);
  std::swap(v_, v);
  torch::Tensor out_eager, out_fused;
  torch::Tensor eager =
      Collect([&](const ProbsCallback* cb) { return ExplicitAttention(q_, k_, v_, shape_, cb); },
              &out_eager);
  torch::Tensor fused = Collect(
      [&](const ProbsCallback* cb) { return FusedAttention(q_, k_, v_, shape_, cb); }, &out_fused);
  const double d_eager = (eager - want_probs).abs().max().item<double>();
  const double d_fused = (fused - want_probs).abs().max().item<double>();
  std::printf("bfloat16 pos0 %ld window %ld: max |p - float64| eager %.2e, fused %.2e\n",
              static_cast<long>(shape_.pos0), static_cast<long>(shape_.window), d_eager, d_fused);
  EXPECT_LE(d_fused, d_eager + 1e-6);
  const double o_eager = (out_eager.to(torch::kFloat64) - want).abs().max().item<double>();
  const double o_fused = (out_fused.to(torch::kFloat64) - want).abs().max().item<double>();
  EXPECT_LE(o_fused, 2 * o_eager + 1e-6);
}

// Rows the callback does not need are not materialized; the rows it gets are the same.
TEST_P(AttentionPaths, FusedPathComputesOnlyWantedBlocks) {
  if (!HasFusedAttention()) GTEST_SKIP() << "libtorch < 2.0: no fused path";
  const int64_t n = q_.size(1);
  std::vector<int64_t> begins;
  ProbsCallback cb = [&](int64_t b, const torch::Tensor&, const torch::Tensor&,
                         const torch::Tensor&) {
    begins.push_back(b);
    return absl::OkStatus();
  };
  const RowRanges last_row = {{n - 1, n}};
  ASSERT_TRUE(FusedAttention(q_, k_, v_, shape_, &cb, last_row).ok());
  ASSERT_EQ(begins.size(), 1u);
  EXPECT_EQ(begins[0], (n - 1) / shape_.query_block * shape_.query_block);
  begins.clear();
  ASSERT_TRUE(FusedAttention(q_, k_, v_, shape_, &cb, RowRanges{{0, 0}}).ok());
  EXPECT_TRUE(begins.empty());
}

// Statistics inside the pass (CpuFlashAttention): output, lse, entropy, sink, local mass and key
// score against the float64 reference, masked positions included.
TEST_P(AttentionPaths, PassStatisticsMatchFloat64Reference) {
  if (!PassStatisticsExpected()) GTEST_SKIP() << "no in-pass statistics: libtorch < 2.0 or no AVX2";
  ASSERT_TRUE(StatisticsInPass(q_, k_, v_, shape_)) << "libtorch 2.x on AVX2: the pass must run";
  const int64_t n = q_.size(1);
  PassStatistics pass;
  pass.wanted = {true, 4, 3, std::max<int64_t>(0, n - 6), n};
  torch::Tensor out = FusedAttention(q_, k_, v_, shape_, nullptr, {}, &pass).value();
  const torch::Tensor& p = want_probs_;  // (heads, n, keys) float64
  torch::Tensor entropy = -(p * torch::where(p > 0, p.log(), torch::zeros_like(p))).sum(-1);
  torch::Tensor sink = p.narrow(2, 0, 4).sum(-1);
  auto opts = torch::TensorOptions().dtype(torch::kInt64);
  torch::Tensor back = torch::arange(shape_.pos0, shape_.pos0 + n, opts).unsqueeze(1) -
                       torch::arange(0, p.size(2), opts).unsqueeze(0);  // (n, keys): pos - key
  torch::Tensor local = (p * (back >= 0).logical_and(back < 3)).sum(-1);
  torch::Tensor key_score =
      p.narrow(1, pass.wanted.key_score_begin, n - pass.wanted.key_score_begin).sum(1);
  auto diff = [](const torch::Tensor& got, const torch::Tensor& want) {
    return (got.to(torch::kFloat64) - want).abs().max().item<double>();
  };
  const double d_entropy = diff(pass.result.entropy, entropy);
  std::printf("pos0 %ld window %ld: max |pass - float64| output %.2e, entropy %.2e\n",
              static_cast<long>(shape_.pos0), static_cast<long>(shape_.window), MaxDiff(out),
              d_entropy);
  EXPECT_LT(MaxDiff(out), 1e-5);
  EXPECT_LT(d_entropy, 1e-5);
  EXPECT_LT(diff(pass.result.sink, sink), 1e-6);
  EXPECT_LT(diff(pass.result.local, local), 1e-6);
  EXPECT_LT(diff(pass.result.key_score, key_score), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(PositionsAndWindows, AttentionPaths,
                         ::testing::Combine(::testing::Values(0, 20, 36),
                                            ::testing::Values(0, 5, 64)));

// The CPU's one-pass RoPE against the tensor expression it replaces (x·cos, rotate_half(x)·sin,
// each rounded, then their sum), bit for bit: queries strided as the projections leave them,
// contiguous keys, one decode row, head dims 64 and 128, values up to 1e4; and against float64.
TEST(Rope, CpuPassEqualsTheTensorExpressionBitForBit) {
  torch::manual_seed(3);
  RopeConfig config;
  for (int64_t dim : {64, 128}) {
    const torch::Tensor inv_freq = RopeInverseFrequencies(config, dim);
    for (int64_t n : {1, 7, 300}) {
      for (bool strided : {true, false}) {
        const int64_t heads = strided ? 8 : 4, pos0 = 1000;
        torch::Tensor x = strided ? (torch::randn({n, heads, dim}) * 1e4).transpose(0, 1)
                                  : torch::randn({heads, n, dim});
        auto [cos, sin] = RopeTables(inv_freq, pos0, n, torch::kFloat32);
        const int64_t half = dim / 2;
        torch::Tensor rotated = torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
        const torch::Tensor expected = x * cos + rotated * sin;
        const torch::Tensor got = ApplyRope(x, cos, sin);
        ASSERT_EQ(got.sizes(), x.sizes());
        EXPECT_TRUE(torch::equal(got, expected))
            << "dim " << dim << " n " << n << " strided " << strided;
        const torch::Tensor x64 = x.to(torch::kFloat64), r64 = rotated.to(torch::kFloat64);
        const torch::Tensor reference =
            x64 * cos.to(torch::kFloat64) + r64 * sin.to(torch::kFloat64);
        EXPECT_LE((got.to(torch::kFloat64) - reference).abs().max().item<double>(),
                  1e-6 * x.abs().max().item<double>());
      }
    }
    // Another type or a table that does not fit x: the expression itself.
    torch::Tensor xb = torch::randn({2, 5, dim}).to(torch::kBFloat16);
    auto [cos, sin] = RopeTables(inv_freq, 0, 5, torch::kBFloat16);
    torch::Tensor rb =
        torch::cat({-xb.narrow(-1, dim / 2, dim / 2), xb.narrow(-1, 0, dim / 2)}, -1);
    EXPECT_TRUE(torch::equal(ApplyRope(xb, cos, sin), xb * cos + rb * sin));
  }
}

// A generation's tables: a prefill's table serves the next kAhead decode steps, rows are those of
// the table that holds them and agree with a float64 cos and sin of the same angles, and a pass
// behind or past the table gets a new one.
TEST(Rope, TableCacheServesDecodeStepsFromThePrefillTable) {
  RopeConfig config;
  const int64_t dim = 64;
  const torch::Tensor inv_freq = RopeInverseFrequencies(config, dim);
  RopeTableCache cache;
  const auto check = [&](int64_t pos0, int64_t n) {
    auto [cos, sin] = cache.Rows(inv_freq, pos0, n, torch::kFloat32);
    ASSERT_EQ(cos.sizes(), (std::vector<int64_t>{n, dim}));
    ASSERT_EQ(sin.sizes(), (std::vector<int64_t>{n, dim}));
    // The angle as the tables make it (a float32 product), its cos and sin in float64.
    torch::Tensor pos = torch::arange(pos0, pos0 + n, torch::kFloat32);
    torch::Tensor freqs = torch::outer(pos, inv_freq).to(torch::kFloat64);
    torch::Tensor angles = torch::cat({freqs, freqs}, -1);
    EXPECT_LE((cos.to(torch::kFloat64) - angles.cos()).abs().max().item<double>(), 3e-7);
    EXPECT_LE((sin.to(torch::kFloat64) - angles.sin()).abs().max().item<double>(), 3e-7);
  };
  check(0, 100);
  EXPECT_EQ(cache.tables_made(), 1);
  for (int64_t p = 100; p < 100 + RopeTableCache::kAhead; ++p) check(p, 1);
  EXPECT_EQ(cache.tables_made(), 1);  // every decode step from the prefill's table
  check(100 + RopeTableCache::kAhead, 1);
  EXPECT_EQ(cache.tables_made(), 2);
  check(100 + RopeTableCache::kAhead + 1, 3);
  EXPECT_EQ(cache.tables_made(), 2);
  check(5, 2);  // behind the table (a new generation's positions): a new one
  EXPECT_EQ(cache.tables_made(), 3);
  auto [c16, s16] = cache.Rows(inv_freq, 5, 2, torch::kBFloat16);  // another type: a new one
  EXPECT_EQ(c16.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(cache.tables_made(), 4);
}

// In-pass statistics at shapes that cross the kernel's tiles (stacked rows of 128, keys of 512):
// 700 rows after 100 cached positions, grouped heads, the query rows strided as the engine's
// projections leave them; full causal and a window of 300.
TEST(PassStatistics, MatchFloat64ReferenceAcrossTiles) {
  const int64_t heads = 8, kv_heads = 2, dim = 32, pos0 = 100, n = 700, keys = pos0 + n;
  torch::manual_seed(1);
  torch::Tensor q = (torch::randn({n, heads, dim}) * 2.0).transpose(0, 1);  // (heads, n, dim)
  torch::Tensor k = torch::randn({kv_heads, keys + 9, dim});  // a cache with room after the keys
  torch::Tensor v = torch::randn({kv_heads, keys + 9, dim});
  for (int64_t window : {0, 300}) {
    AttentionShape shape;
    shape.pos0 = pos0;
    shape.window = window;
    if (!PassStatisticsExpected())
      GTEST_SKIP() << "no in-pass statistics: libtorch < 2.0 or no AVX2";
    ASSERT_TRUE(StatisticsInPass(q, k, v, shape)) << "libtorch 2.x on AVX2: the pass must run";
    PassStatistics pass;
    pass.wanted = {true, 4, 64, n - 64, n};
    torch::Tensor out = FusedAttention(q, k, v, shape, nullptr, {}, &pass).value();
    // float64 reference, all rows at once
    torch::Tensor k64 = k.narrow(1, 0, keys).to(torch::kFloat64).repeat_interleave(4, 0);
    torch::Tensor v64 = v.narrow(1, 0, keys).to(torch::kFloat64).repeat_interleave(4, 0);
    torch::Tensor s = q.to(torch::kFloat64).matmul(k64.transpose(1, 2)) / std::sqrt(32.0);
    auto opts = torch::TensorOptions().dtype(torch::kInt64);
    torch::Tensor back = torch::arange(pos0, keys, opts).unsqueeze(1) -
                         torch::arange(0, keys, opts).unsqueeze(0);  // (n, keys): pos - key
    torch::Tensor masked = back < 0;
    if (window > 0) masked = masked.logical_or(back >= window);
    s.masked_fill_(masked, -std::numeric_limits<double>::infinity());
    torch::Tensor lse = torch::logsumexp(s, -1);
    torch::Tensor p = torch::exp(s - lse.unsqueeze(-1));
    auto diff = [](const torch::Tensor& got, const torch::Tensor& want) {
      return (got.to(torch::kFloat64) - want).abs().max().item<double>();
    };
    const double d_out = diff(out, p.matmul(v64)), d_lse = diff(pass.result.lse, lse);
    const double d_entropy = diff(
        pass.result.entropy, -(p * torch::where(p > 0, p.log(), torch::zeros_like(p))).sum(-1));
    std::printf("window %ld: max |pass - float64| output %.2e, lse %.2e, entropy %.2e\n",
                static_cast<long>(window), d_out, d_lse, d_entropy);
    EXPECT_LT(d_out, 1e-5);
    EXPECT_LT(d_lse, 1e-5);
    EXPECT_LT(d_entropy, 1e-5);
    EXPECT_LT(diff(pass.result.sink, p.narrow(2, 0, 4).sum(-1)), 1e-6);
    EXPECT_LT(diff(pass.result.local, (p * (back >= 0).logical_and(back < 64)).sum(-1)), 1e-6);
    EXPECT_LT(diff(pass.result.key_score, p.narrow(1, n - 64, 64).sum(1)), 1e-5);
    // Without statistics asked for, the same output and lse.
    PassStatistics bare;
    torch::Tensor out_bare = FusedAttention(q, k, v, shape, nullptr, {}, &bare).value();
    EXPECT_TRUE(torch::equal(out_bare, out));
    EXPECT_FALSE(bare.result.entropy.defined());
  }
}

// A sink that takes dense blocks unmaterialized (as the server's shared-ring sink does) and has
// them written in irregular pieces: every byte must equal the materialized block's.
class PlacingSink : public AttentionSink {
 public:
  explicit PlacingSink(bool places) : places_(places) {}
  bool PlacesValues() const override { return places_; }
  absl::Status OnBlock(const Block& b) override {
    if (b.header.kind != BlockKind::kAttention) return absl::OkStatus();
    std::string bytes(static_cast<size_t>(b.header.value_bytes()), '\x7f');
    if (b.values != nullptr) {
      EXPECT_FALSE(b.fill);
      std::memcpy(bytes.data(), b.values, bytes.size());
    } else {
      EXPECT_TRUE(places_ && b.fill && b.header.form == Form::kDense);
      ++filled;
      const int64_t elem = ElementSize(b.header.element_type);
      const int64_t count = b.header.numel();
      const int64_t row = b.header.shape.back();
      // Every way a piece can start and end: the whole block at once (whole heads); one row less
      // one element at a time (parts of rows); one row, then two rows at a time (whole rows from
      // any row of a head, and across heads); 1, 2, 3, ... elements, then the rest (starts inside
      // rows, then whole rows up to a head's end and whole heads). Each into its own buffer, each
      // equal to the first.
      const std::function<int64_t(int64_t)> schedules[] = {
          [&](int64_t) { return count; },
          [&](int64_t) { return std::max<int64_t>(1, row - 1); },
          [&](int64_t k) { return k == 0 ? row : 2 * row; },
          [&](int64_t k) { return k < 5 ? k + 1 : count; },
      };
      for (size_t s = 0; s < std::size(schedules); ++s) {
        std::string piecewise(bytes.size(), '\x7f');
        int64_t first = 0;
        for (int64_t k = 0; first < count; ++k) {
          const int64_t take = std::min(schedules[s](k), count - first);
          b.fill(first, take, piecewise.data() + first * elem);
          first += take;
        }
        if (s == 0) {
          bytes = piecewise;
        } else {
          EXPECT_EQ(piecewise, bytes) << BlockName(b.header) << ", schedule " << s;
        }
      }
    }
    blocks.push_back(BlockName(b.header) + ":" + std::to_string(b.header.shape.back()));
    values.push_back(std::move(bytes));
    return absl::OkStatus();
  }
  std::vector<std::string> blocks, values;
  int64_t filled = 0;  // blocks that came with `fill`

 private:
  bool places_;
};

TEST_F(EngineTest, DenseBlocksWrittenInPlaceEqualMaterializedOnes) {
  // Query blocks of 3 rows: prefill blocks whose keys are padded, and decode rows.
  testing::TempDir dir;
  ASSERT_TRUE(testing::WriteTinyCheckpoint(dir.path(), testing::TinyLlamaConfig()).ok());
  EngineOptions options;
  options.model_dir = dir.path();
  options.query_block = 3;
  auto engine = Engine::Load(options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  for (ElementType type : {ElementType::kFloat32, ElementType::kFloat16, ElementType::kBFloat16}) {
    CaptureSpec spec;
    spec.form = Form::kDense;
    spec.element_type = type;
    spec.heads = {1, 3};
    PlacingSink materialized(false), placed(true);
    ASSERT_TRUE((*engine)->Generate(Request(4), spec, &materialized, nullptr).ok());
    ASSERT_TRUE((*engine)->Generate(Request(4), spec, &placed, nullptr).ok());
    ASSERT_EQ(materialized.blocks, placed.blocks);
    ASSERT_GT(materialized.blocks.size(), 4u);
    EXPECT_EQ(materialized.filled, 0);
    EXPECT_EQ(placed.filled, static_cast<int64_t>(placed.blocks.size()));
    for (size_t i = 0; i < placed.values.size(); ++i)
      EXPECT_EQ(materialized.values[i], placed.values[i]) << placed.blocks[i];
  }
}

}  // namespace
}  // namespace attnscope
