// The gRPC front door: AttentionService over the callback API. It maps requests to the engine
// API, owns admission, streaming back-pressure, cancellation and authentication; no tensor math.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <set>
#include <string>

#include <grpcpp/grpcpp.h>

#include "attnscope/v1/attnscope.grpc.pb.h"
#include "model/engine.h"
#include "server/metrics.h"
#include "server/scheduler.h"

namespace attnscope {

struct ServiceOptions {
  std::string model_name = "model";    // what requests may name in `model`
  int64_t chunk_bytes = 1 << 20;       // payload bytes per streamed message
  int64_t max_capture_bytes = 0;       // byte budget per request; 0: none
  int stream_queue_messages = 8;       // outgoing messages buffered per stream before generation waits
  std::set<std::string> auth_tokens;   // bearer tokens accepted; empty: no authentication
  SchedulerOptions scheduler;
};

class AttentionServiceImpl final : public v1::AttentionService::CallbackService {
 public:
  AttentionServiceImpl(const Engine* engine, ServiceOptions options);
  ~AttentionServiceImpl() override;

  grpc::ServerUnaryReactor* Generate(grpc::CallbackServerContext* context, const v1::GenerateRequest* request,
                                     v1::GenerateResponse* response) override;
  grpc::ServerWriteReactor<v1::StreamAttentionResponse>* StreamAttention(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context, const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context, const v1::DetokenizeRequest* request,
                                       v1::DetokenizeResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request, v1::ModelInfo* response) override;

  // Stops admitting work (new requests get UNAVAILABLE) and cancels every running generation.
  void StopAccepting();
  Metrics& metrics() { return metrics_; }
  const Scheduler& scheduler() const { return *scheduler_; }

 private:
  friend class StreamReactor;
  grpc::Status Admit(grpc::CallbackServerContext* context) const;
  // Running generations, so that a shutdown can cancel them.
  void Register(CancelToken* token);
  void Unregister(CancelToken* token);
  bool accepting() const { return accepting_; }

  const Engine* engine_;
  ServiceOptions options_;
  std::unique_ptr<Scheduler> scheduler_;
  Metrics metrics_;
  std::atomic<bool> accepting_{true};
  std::atomic<int64_t> next_id_{1};
  std::mutex active_mu_;
  std::set<CancelToken*> active_;
};

}  // namespace attnscope
