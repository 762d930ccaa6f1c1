// Unit tests of the server's pieces that need no model: admission (Scheduler), bearer tokens,
// the model registry. The service itself is tested end to end (tests/python).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "server/auth.h"
#include "server/convert.h"
#include "server/registry.h"
#include "server/scheduler.h"

namespace attnscope {
namespace {

// Holds the scheduler's only thread until released.
class Gate {
 public:
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    entered_ = true;
    cv_.notify_all();
    cv_.wait(lock, [&] { return open_; });
  }
  void WaitEntered() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return entered_; });
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool entered_ = false, open_ = false;
};

TEST(SchedulerTest, RefusesBeyondSlotsAndQueueAndWithdrawnJobsFreeTheirPlace) {
  Scheduler scheduler({/*max_concurrent=*/1, /*max_queue=*/2});
  Gate gate;
  std::atomic<int> ran{0};
  ASSERT_NE(scheduler.TrySubmit([&] { gate.Wait(); }), 0u);
  gate.WaitEntered();
  const Scheduler::Ticket a = scheduler.TrySubmit([&] { ++ran; });
  const Scheduler::Ticket b = scheduler.TrySubmit([&] { ++ran; });
  ASSERT_NE(a, 0u);
  ASSERT_NE(b, 0u);
  EXPECT_EQ(scheduler.TrySubmit([&] { ++ran; }), 0u) << "queue full: refused at once";
  EXPECT_EQ(scheduler.queued(), 2);
  // A client that leaves gives its place back; its job never runs.
  EXPECT_TRUE(scheduler.Withdraw(a));
  EXPECT_FALSE(scheduler.Withdraw(a)) << "a ticket is withdrawn once";
  EXPECT_EQ(scheduler.queued(), 1);
  const Scheduler::Ticket c = scheduler.TrySubmit([&] { ++ran; });
  EXPECT_NE(c, 0u);
  gate.Open();
  while (scheduler.queued() > 0 || scheduler.running() > 0)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(ran.load(), 2);  // b and c, not a
  EXPECT_FALSE(scheduler.Withdraw(b)) << "a job that ran cannot be withdrawn";
}

TEST(SchedulerTest, LimitsAreClampedAndShutdownRefuses) {
  Scheduler scheduler({/*max_concurrent=*/1 << 30, /*max_queue=*/-5});
  std::atomic<int> ran{0};
  EXPECT_NE(scheduler.TrySubmit([&] { ++ran; }), 0u);
  scheduler.Shutdown();
  EXPECT_EQ(scheduler.TrySubmit([&] { ++ran; }), 0u);
}

TEST(AuthTest, TokenFileLinesAreTrimmedAndCommentsSkipped) {
  auto tokens =
      BearerTokens::Parse("# lab\n\t  alpha \r\n\n  # indented comment\nbeta\n", "tokens");
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  EXPECT_EQ(tokens->size(), 2u);
  for (absl::string_view ok :
       {"Bearer alpha", "bearer beta", "BEARER\talpha", "  Bearer   alpha  "}) {
    EXPECT_TRUE(tokens->Check(&ok).ok()) << ok;
  }
  for (absl::string_view bad : {"Bearer alph", "Bearer alphaa", "Basic alpha", "alpha", "Bearer",
                                "Bearer ", "Beareralpha", "Bearer # lab"}) {
    absl::Status s = tokens->Check(&bad);
    EXPECT_TRUE(absl::IsUnauthenticated(s)) << bad << ": " << s;
  }
  EXPECT_TRUE(absl::IsUnauthenticated(tokens->Check(nullptr)));
}

TEST(AuthTest, EmptyOrNonAsciiTokenFilesAreRefused) {
  EXPECT_TRUE(absl::IsInvalidArgument(BearerTokens::Parse("# only a comment\n\n", "f").status()));
  EXPECT_TRUE(absl::IsInvalidArgument(BearerTokens::Parse("two words\n", "f").status()));
  EXPECT_TRUE(absl::IsInvalidArgument(BearerTokens::Parse("caf\xc3\xa9\n", "f").status()));
  EXPECT_TRUE(BearerTokens().Check(nullptr).ok()) << "no tokens: no authentication";
}

TEST(AuthTest, ConstantTimeEqualsIsEquality) {
  EXPECT_TRUE(ConstantTimeEquals("secret", "secret"));
  EXPECT_FALSE(ConstantTimeEquals("secret", "secreT"));
  EXPECT_FALSE(ConstantTimeEquals("secret", "secret2"));
  EXPECT_FALSE(ConstantTimeEquals("secret", "secre"));
  EXPECT_FALSE(ConstantTimeEquals("secret", ""));
  EXPECT_FALSE(ConstantTimeEquals("", "x"));
  EXPECT_TRUE(ConstantTimeEquals("", ""));
  EXPECT_FALSE(ConstantTimeEquals("ab", "abab")) << "a repeated prefix is not equal";
}

TEST(RegistryTest, TypedLookupsWithClearErrors) {
  const std::string text =
      R"({"good": {"path": "/m/a", "max_length": 8000}, "bare": {"path": "/m/b"},
                                "num": {"path": 5}, "str": "x", "neg": {"path": "/m", "max_length": -1},
                                "flt": {"path": "/m", "max_length": 1.5}, "empty": {"path": ""}})";
  auto good = LookupModel(text, "good", "r.json");
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_EQ(good->path, "/m/a");
  EXPECT_EQ(good->max_length, 8000);
  EXPECT_EQ(LookupModel(text, "bare", "r.json")->max_length, 0);
  EXPECT_TRUE(absl::IsNotFound(LookupModel(text, "missing", "r.json").status()));
  for (const char* name : {"num", "str", "neg", "flt", "empty"}) {
    absl::Status s = LookupModel(text, name, "r.json").status();
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << name << ": " << s;
    EXPECT_NE(s.message().find(name), absl::string_view::npos) << s;
  }
  EXPECT_TRUE(absl::IsInvalidArgument(LookupModel("[1]", "good", "r.json").status()));
  EXPECT_TRUE(absl::IsInvalidArgument(LookupModel("{", "good", "r.json").status()));
}

TEST(ConvertTest, CaptureSpecRoundTripsAndUnknownEnumsAreRefused) {
  v1::CaptureSpec p;
  p.add_layers(3);
  p.add_heads(1);
  p.add_phases(v1::PHASE_DECODE);
  p.set_form(v1::FORM_POOLED);
  p.set_pool(8);
  p.set_pool_op(v1::POOL_MAX);
  p.set_element_type(v1::ELEMENT_BFLOAT16);
  p.mutable_statistics()->set_sink_mass(4);
  auto spec = ToCaptureSpec(p);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_TRUE(!spec->prefill && spec->decode && spec->form == Form::kPooled && spec->pool == 8);
  EXPECT_TRUE(spec->pool_op == PoolOp::kMax && spec->element_type == ElementType::kBFloat16);
  v1::CaptureSpec back;
  FillCaptureSpec(*spec, /*num_layers=*/4, /*num_heads=*/2, &back);
  EXPECT_EQ(back.SerializeAsString(), p.SerializeAsString());

  for (auto mutate : std::vector<void (*)(v1::CaptureSpec*)>{
           [](v1::CaptureSpec* c) { c->set_form(static_cast<v1::Form>(99)); },
           [](v1::CaptureSpec* c) { c->set_element_type(static_cast<v1::ElementType>(99)); },
           [](v1::CaptureSpec* c) { c->set_pool_op(static_cast<v1::PoolOp>(99)); },
           [](v1::CaptureSpec* c) { c->add_phases(static_cast<v1::Phase>(99)); },
           [](v1::CaptureSpec* c) { c->set_max_bytes(-1); }}) {
    v1::CaptureSpec bad = p;
    mutate(&bad);
    EXPECT_TRUE(absl::IsInvalidArgument(ToCaptureSpec(bad).status())) << bad.ShortDebugString();
  }
}

TEST(ConvertTest, TruncateMiddleKeepsBothEnds) {
  const std::vector<int64_t> ids = {1, 2, 3, 4, 5, 6, 7};
  EXPECT_EQ(TruncateMiddle(ids, 4), (std::vector<int64_t>{1, 2, 6, 7}));
  EXPECT_EQ(TruncateMiddle(ids, 5), (std::vector<int64_t>{1, 2, 5, 6, 7}));
  EXPECT_EQ(TruncateMiddle(ids, 0), ids);
  EXPECT_EQ(TruncateMiddle(ids, 7), ids);
}

TEST(ConvertTest, ChunksReassembleToTheBlockAndRespectTheChunkSize) {
  std::vector<float> values(2 * 3 * 50);
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i) * 0.5f;
  Block block;
  BlockHeader& h = block.header;
  h.phase = Phase::kPrefill;
  h.layer = 2;
  h.heads = {0, 1};
  h.query_begin = 10;
  h.query_end = 13;
  h.key_length = 50;
  h.form = Form::kDense;
  h.shape = {2, 3, 50};
  block.values = values.data();
  std::string joined;
  int messages = 0;
  absl::Status s =
      ChunkBlock(block, /*chunk_bytes=*/256, [&](const v1::StreamAttentionResponse& m) {
        const auto& c = m.attention();
        EXPECT_LE(c.data().size(), 256u);
        EXPECT_EQ(c.byte_offset(), static_cast<int64_t>(joined.size()));
        EXPECT_EQ(c.block_bytes(), h.value_bytes());
        EXPECT_EQ(c.layer(), 2);
        EXPECT_EQ(c.query_begin(), 10);
        auto back = BlockHeaderOf(c);
        EXPECT_TRUE(back.ok()) << back.status();
        if (back.ok()) {
          EXPECT_EQ(back->shape, h.shape);
          EXPECT_EQ(back->heads, h.heads);
          EXPECT_EQ(BlockName(*back), "attention.prefill.2.0.10");
        }
        joined += c.data();
        ++messages;
        return absl::OkStatus();
      });
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(messages, (1200 + 255) / 256);
  EXPECT_EQ(joined, std::string(reinterpret_cast<const char*>(values.data()), values.size() * 4));

  // A sink error stops the chunking at once.
  messages = 0;
  s = ChunkBlock(block, 256, [&](const v1::StreamAttentionResponse&) {
    ++messages;
    return absl::CancelledError("gone");
  });
  EXPECT_TRUE(absl::IsCancelled(s));
  EXPECT_EQ(messages, 1);

  // An empty statistic still sends one message, so that readers see the block.
  Block empty;
  empty.header.kind = BlockKind::kStatistic;
  empty.header.stat = StatKind::kSinkMass;
  empty.header.heads = {0, 1};
  empty.header.shape = {2, 0};
  messages = 0;
  s = ChunkBlock(empty, 256, [&](const v1::StreamAttentionResponse& m) {
    EXPECT_TRUE(m.statistic().data().empty());
    EXPECT_EQ(m.statistic().kind(), "sink_mass");
    ++messages;
    return absl::OkStatus();
  });
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(messages, 1);
}

}  // namespace
}  // namespace attnscope
