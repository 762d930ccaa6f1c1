// Unit tests of the server's pieces that need no model: admission (Scheduler), bearer tokens,
// the model registry. The service itself is tested end to end (tests/python).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "server/auth.h"
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

}  // namespace
}  // namespace attnscope
