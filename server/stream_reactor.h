// The StreamAttention call: its reactor (gRPC's callback threads), its job (an engine thread,
// through the scheduler) and what they and the stall watchdog (service.cpp) share.
#pragma once

#include <grpcpp/grpcpp.h>

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>

#include "absl/status/status.h"
#include "attnscope/v1/attnscope.pb.h"
#include "engine/engine.h"
#include "server/call.h"
#include "server/convert.h"
#include "server/scheduler.h"
#include "server/shared_output.h"

namespace attnscope {

class AttentionServiceImpl;
class StreamReactor;

// What a stream's reactor (gRPC threads), its job (an engine thread) and the stall watchdog share.
// Each holds a shared_ptr, so the state outlives the reactor, which gRPC frees in OnDone.
//
// Lifetime rules: the reactor may be finished only when the job will not touch it again
// (`job_done`), no write is in flight (`writing`) and no other thread is using its context
// (`pinned`); whoever sees all three first sets `finishing` under the lock and calls Finish after
// releasing it, as its last use of the reactor. Nothing touches `reactor` or `context` once
// `finishing` is set.
struct StreamState {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<grpc::ByteBuffer> queue;  // encoded messages; front is in flight while `writing`
  bool writing = false;
  bool cancelled = false;  // the client left, or the server stopped the stream
  bool stalled = false;    // stopped because the client took no message for stall_timeout_s
  bool job_done = false;   // the job has ended (or was withdrawn before it started)
  int pinned = 0;          // threads using `context` outside the lock
  bool finishing = false;
  absl::Status final_status;
  Clock::time_point last_progress = Clock::now();  // last write started or completed
  StreamReactor* reactor = nullptr;
  grpc::CallbackServerContext* context = nullptr;
  CancelToken cancel;

  // Under `mu`: whether the caller must now finish the call, with `*status`.
  bool TakeFinish(absl::Status* status) {
    if (!job_done || writing || pinned > 0 || finishing) return false;
    finishing = true;
    *status = cancelled && final_status.ok() ? absl::CancelledError("the stream was cancelled")
                                             : final_status;
    return true;
  }
};

// StreamAttention: the job produces messages into a bounded queue; the reactor writes one at a
// time, starting the next from OnWriteDone. A full queue makes the job wait (back-pressure); a
// cancelled or stalled call wakes it and stops the generation at its next block or step.
class StreamReactor : public grpc::ServerWriteReactor<grpc::ByteBuffer>, public AttentionSink {
 public:
  StreamReactor(AttentionServiceImpl* service, grpc::CallbackServerContext* context,
                const grpc::ByteBuffer* raw);

  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override { delete this; }

  // AttentionSink, on the engine thread.
  absl::Status OnBlock(const Block& block) override;
  absl::Status OnToken(int64_t step, int64_t id) override;
  absl::Status OnDivergence(const DivergenceStep& step) override;
  absl::Status OnKvDecision(const KvDecision& decision) override;
  // Dense blocks come unmaterialized when they go to the mapped ring (ChunkBlock has them written
  // there piece by piece).
  bool PlacesValues() const override { return shared_.mapped(); }

  // Under state->mu: the call is over for the generation (client gone, stalled, shut down).
  static void Stop(StreamState* state);
  // Ends the call; the caller's last use of this reactor.
  void FinishAndRecord(const absl::Status& status);

 private:
  // Refusal in the constructor: no job exists, nothing else can race.
  void FinishBeforeJob(const absl::Status& status);
  // The job, on an engine thread.
  void Run();
  // Resolves the request, then streams header, blocks, tokens and trailer. Returns how the call
  // ends.
  absl::Status Stream();
  // Why a generation that saw its cancel token ended.
  absl::Status StoppedStatus();
  // Queues a message; waits while the queue is full. An error once the stream is stopped.
  absl::Status Push(const v1::StreamAttentionResponse& msg);

  AttentionServiceImpl* service_;
  v1::GenerateRequest request_;
  const Clock::time_point received_;
  std::shared_ptr<StreamState> state_;
  Scheduler::Ticket ticket_ = 0;
  std::optional<ResolvedRequest> resolved_;  // the job's
  int64_t bytes_sent_ = 0;                   // the job's
  int64_t tokens_ = 0;   // the job's: tokens generated, also when the stream ends early
  SharedOutput shared_;  // the job's: the client's region, when used
};

}  // namespace attnscope
