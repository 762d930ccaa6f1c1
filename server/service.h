// The gRPC front door: AttentionService over the callback API. It maps requests to the engine
// API and owns admission, streaming back-pressure, cancellation, stall detection and
// authentication; no tensor math (tensors stay behind convert.h).
//
// Threads: gRPC's callback threads only admit, queue and react; every request's resolution
// (tokenizing, chat rendering, truncation, budget) and generation run on a scheduler thread, so
// they count against --max_concurrent / --max_queue. A call's reactor is freed only in OnDone;
// the engine thread and the reactor share a StreamState that outlives both (stream_reactor.h).
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <condition_variable>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "attnscope/v1/attnscope.grpc.pb.h"
#include "engine/engine.h"
#include "server/auth.h"
#include "server/convert.h"
#include "server/jobs.h"
#include "server/metrics.h"
#include "server/scheduler.h"

namespace attnscope {

struct StreamState;

struct ServiceOptions {
  std::string model_name = "model";  // what requests may name in `model`
  int64_t chunk_bytes = 1 << 20;     // payload bytes per streamed message
  int64_t max_capture_bytes = 0;     // byte budget per request; 0: none
  int64_t default_max_length = 0;    // middle truncation for requests without max_length (the
                                     // model registry's max_length); 0: none
  int stream_queue_messages = 8;  // outgoing messages buffered per stream before generation waits
  double stall_timeout_s = 30;  // a write not taken by the client for this long cancels the stream
  // Largest shared-memory ring a stream may ask the server to write into (same-host output);
  // 0: never. Rings hold values only while the client copies them out.
  int64_t max_shared_bytes = int64_t{1} << 30;
  int64_t shared_chunk_bytes = 4 << 20;  // attention bytes per shared piece (<= ring / 4)
  BearerTokens auth;                     // accepted bearer tokens; empty: no authentication
  SchedulerOptions scheduler;            // generations (and their request resolution)
  SchedulerOptions tokenizer{2, 64};     // Tokenize / Detokenize calls
  std::shared_ptr<JobStore> jobs;        // detached jobs' store (--jobs_dir); null: no jobs
};

// Every method is registered raw (bytes in, bytes out): a request that does not decode is answered
// INVALID_ARGUMENT here, where gRPC itself would answer UNIMPLEMENTED with no message, and streamed
// messages are serialized on the engine thread rather than on gRPC's.
using RawAttentionService = v1::AttentionService::WithRawCallbackMethod_Generate<
    v1::AttentionService::WithRawCallbackMethod_StreamAttention<
        v1::AttentionService::WithRawCallbackMethod_Tokenize<
            v1::AttentionService::WithRawCallbackMethod_Detokenize<
                v1::AttentionService::WithRawCallbackMethod_GetModelInfo<
                    v1::AttentionService::WithRawCallbackMethod_DetectHeads<
                        v1::AttentionService::WithRawCallbackMethod_SubmitJob<
                            v1::AttentionService::WithRawCallbackMethod_GetJob<
                                v1::AttentionService::WithRawCallbackMethod_ListJobs<
                                    v1::AttentionService::WithRawCallbackMethod_CancelJob<
                                        v1::AttentionService::WithRawCallbackMethod_FetchResult<
                                            v1::AttentionService::Service>>>>>>>>>>>;

class AttentionServiceImpl final : public RawAttentionService {
 public:
  AttentionServiceImpl(const Engine* engine, ServiceOptions options);
  ~AttentionServiceImpl() override;

  // GenerateRequest -> GenerateResponse
  grpc::ServerUnaryReactor* Generate(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  // GenerateRequest -> stream of StreamAttentionResponse
  grpc::ServerWriteReactor<grpc::ByteBuffer>* StreamAttention(
      grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) override;
  // TokenizeRequest -> TokenizeResponse
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  // DetokenizeRequest -> DetokenizeResponse
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context,
                                       const grpc::ByteBuffer* request,
                                       grpc::ByteBuffer* response) override;
  // DetectHeadsRequest -> DetectHeadsResponse (on the generation scheduler: it runs the model)
  grpc::ServerUnaryReactor* DetectHeads(grpc::CallbackServerContext* context,
                                        const grpc::ByteBuffer* request,
                                        grpc::ByteBuffer* response) override;
  // GetModelInfoRequest -> ModelInfo
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const grpc::ByteBuffer* request,
                                         grpc::ByteBuffer* response) override;

  // Detached jobs (job_service.cpp): GenerateRequest -> JobInfo; JobRequest -> JobInfo;
  // ListJobsRequest -> ListJobsResponse; JobRequest -> JobInfo; FetchResultRequest -> stream of
  // FetchResultChunk.
  grpc::ServerUnaryReactor* SubmitJob(grpc::CallbackServerContext* context,
                                      const grpc::ByteBuffer* request,
                                      grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* context,
                                   const grpc::ByteBuffer* request,
                                   grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* ListJobs(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* context,
                                      const grpc::ByteBuffer* request,
                                      grpc::ByteBuffer* response) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* FetchResult(grpc::CallbackServerContext* context,
                                                          const grpc::ByteBuffer* request) override;

  // Stops admitting work (new requests get UNAVAILABLE) and cancels every running generation.
  void StopAccepting();
  Metrics& metrics() { return metrics_; }
  const Scheduler& scheduler() const { return *scheduler_; }

 private:
  friend class StreamReactor;
  template <typename Request, typename Response>
  friend class JobReactor;
  absl::Status Admit(grpc::CallbackServerContext* context) const;
  // Running generations, so that a shutdown can cancel them.
  void Register(CancelToken* token);
  void Unregister(CancelToken* token);
  bool accepting() const { return accepting_; }
  ResolveOptions resolve_options() const {
    return {options_.model_name, options_.max_capture_bytes, options_.default_max_length};
  }
  // The job store's owner of the caller (authenticated), or why the call is refused.
  absl::StatusOr<std::string> JobOwner(grpc::CallbackServerContext* context);
  // A job's record with its live progress and queue position.
  v1::JobInfo InfoOf(DetachedJob& job) const;
  // A detached job, on a scheduler thread.
  void RunJob(const std::shared_ptr<DetachedJob>& job);
  // Streams the stall watchdog looks at.
  void Watch(const std::shared_ptr<StreamState>& state);
  void WatchdogLoop();

  const Engine* engine_;
  ServiceOptions options_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<Scheduler> tokenizer_scheduler_;
  Metrics metrics_;
  std::atomic<bool> accepting_{true};
  std::atomic<int64_t> next_id_{1};
  std::atomic<int> open_fetches_{0};
  std::mutex active_mu_;
  std::list<CancelToken*> active_;

  std::mutex watch_mu_;
  std::condition_variable watch_cv_;
  bool watch_stop_ = false;
  std::list<std::weak_ptr<StreamState>> watched_;
  std::thread watchdog_;
};

}  // namespace attnscope
