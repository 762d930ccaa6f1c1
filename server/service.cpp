#include "server/service.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>

#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "model/utf8.h"
#include "server/convert.h"
#include "server/grpc_status.h"

namespace attnscope {
namespace {

using Clock = std::chrono::steady_clock;

double MsBetween(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

void FillTimings(const GenerateResult& r, int64_t prompt_tokens, double queue_ms, v1::Timings* t) {
  t->set_queue_ms(queue_ms);
  t->set_prefill_ms(r.timings.prefill_ms);
  t->set_decode_ms(r.timings.decode_ms);
  if (r.timings.prefill_ms > 0) t->set_prefill_tokens_per_s(prompt_tokens / (r.timings.prefill_ms / 1e3));
  if (r.timings.decode_ms > 0) t->set_decode_tokens_per_s(r.decode_steps / (r.timings.decode_ms / 1e3));
}

// Finishes a unary call, recording it in the metrics.
grpc::ServerUnaryReactor* FinishUnary(Metrics* metrics, const char* method, Clock::time_point received,
                                      grpc::ServerUnaryReactor* reactor, const grpc::Status& status) {
  metrics->RecordRequest(method, status.error_code(), MsBetween(received, Clock::now()) / 1e3);
  reactor->Finish(status);
  return reactor;
}

// Unary generation: keeps statistics, stops when the call is cancelled or past its deadline.
class CollectingSink : public AttentionSink {
 public:
  CollectingSink(grpc::CallbackServerContext* context, CancelToken* cancel, v1::GenerateResponse* response)
      : context_(context), cancel_(cancel), response_(response) {}
  absl::Status OnStatistic(const StatBlock& stat) override {
    FillStatistic(stat, response_->add_statistics());
    return absl::OkStatus();
  }
  absl::Status OnToken(int64_t, int64_t) override {
    if (context_->IsCancelled()) cancel_->Cancel();
    return absl::OkStatus();
  }

 private:
  grpc::CallbackServerContext* context_;
  CancelToken* cancel_;
  v1::GenerateResponse* response_;
};

}  // namespace

// StreamAttention: the engine thread produces messages into a bounded queue; the reactor writes
// one at a time, starting the next from OnWriteDone. A full queue makes the engine thread wait
// (back-pressure); a cancelled call wakes it and stops the generation at its next block or step.
class StreamReactor : public grpc::ServerWriteReactor<v1::StreamAttentionResponse>, public AttentionSink {
 public:
  StreamReactor(AttentionServiceImpl* service, grpc::CallbackServerContext* context, const v1::GenerateRequest* req)
      : service_(service), context_(context), request_(*req), received_(Clock::now()) {
    grpc::Status admitted = service_->Admit(context);
    if (!admitted.ok()) {
      FinishAndRecord(admitted);
      return;
    }
    auto resolved = ResolveRequest(request_, *service_->engine_, service_->options_.model_name,
                                   service_->options_.max_capture_bytes);
    if (!resolved.ok()) {
      FinishAndRecord(ToGrpcStatus(resolved.status()));
      return;
    }
    resolved_ = std::move(*resolved);
    if (!service_->scheduler_->TrySubmit([this] { Run(); })) {
      ++service_->metrics_.rejected_busy;
      FinishAndRecord(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                   "the server is busy: every generation slot and queue place is taken; retry later"));
    }
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.pop_front();  // the message just written
    if (!ok) cancelled_ = true;
    if (!queue_.empty() && !cancelled_) {
      StartWrite(&queue_.front());
    } else {
      writing_ = false;
      MaybeFinishLocked();
    }
    cv_.notify_all();
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
    cancel_.Cancel();
    cv_.notify_all();
  }

  void OnDone() override { delete this; }

  // AttentionSink, on the engine thread.
  absl::Status OnAttention(const AttentionBlock& block) override {
    for (auto& msg : ChunkAttention(block, resolved_.capture.element_type, service_->options_.chunk_bytes)) {
      const int64_t n = static_cast<int64_t>(msg.attention().data().size() + msg.attention().indices().size());
      absl::Status pushed = Push(std::move(msg));
      if (!pushed.ok()) return pushed;
      bytes_sent_ += n;
      service_->metrics_.attention_bytes += n;
    }
    return absl::OkStatus();
  }
  absl::Status OnStatistic(const StatBlock& stat) override {
    for (auto& msg : ChunkStatistic(stat, service_->options_.chunk_bytes)) {
      const int64_t n = static_cast<int64_t>(msg.statistic().data().size());
      absl::Status pushed = Push(std::move(msg));
      if (!pushed.ok()) return pushed;
      bytes_sent_ += n;
    }
    return absl::OkStatus();
  }
  absl::Status OnToken(int64_t step, int64_t id) override {
    ++service_->metrics_.tokens_generated;
    v1::StreamAttentionResponse msg;
    msg.mutable_token()->set_step(step);
    msg.mutable_token()->set_id(id);
    msg.mutable_token()->set_piece(service_->engine_->Pieces({id})[0]);
    return Push(std::move(msg));
  }

 private:
  void Run() {
    const auto started = Clock::now();
    const Engine& engine = *service_->engine_;
    v1::StreamAttentionResponse header;
    auto* h = header.mutable_header();
    h->set_request_id(absl::StrCat(service_->next_id_++));
    FillModelInfo(engine.info(), service_->options_.model_name, h->mutable_model());
    for (int64_t id : resolved_.generate.prompt_ids) h->add_prompt_token_ids(id);
    for (auto& piece : engine.Pieces(resolved_.generate.prompt_ids)) h->add_prompt_pieces(std::move(piece));
    FillCaptureSpec(resolved_.capture, engine.info().num_layers, engine.info().num_heads, h->mutable_capture());
    h->set_estimated_bytes(resolved_.estimated_bytes);
    h->set_chunk_bytes(service_->options_.chunk_bytes);
    absl::Status pushed_header = Push(std::move(header));
    service_->Register(&cancel_);
    absl::StatusOr<GenerateResult> result =
        pushed_header.ok() ? engine.Generate(resolved_.generate, resolved_.capture, this, &cancel_)
                           : absl::StatusOr<GenerateResult>(pushed_header);
    service_->Unregister(&cancel_);
    grpc::Status final_status = grpc::Status::OK;
    if (result.ok()) {
      service_->metrics_.decode_steps += result->decode_steps;
      if (result->finish == FinishReason::kCancelled) {
        final_status = service_->accepting()
                           ? grpc::Status(grpc::StatusCode::CANCELLED, "the generation was cancelled")
                           : grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                          "the server is shutting down; the generation was stopped");
      } else {
        v1::StreamAttentionResponse trailer;
        auto* t = trailer.mutable_trailer();
        for (int64_t id : result->tokens) t->add_token_ids(id);
        if (engine.info().has_tokenizer) t->set_text(engine.Decode(result->tokens, /*skip_special_tokens=*/true).value());
        t->set_finish_reason(ToProto(result->finish));
        FillTimings(*result, resolved_.generate.prompt_ids.size(), MsBetween(received_, started),
                    t->mutable_timings());
        t->set_bytes_sent(bytes_sent_);
        absl::Status pushed = Push(std::move(trailer));
        if (!pushed.ok()) final_status = ToGrpcStatus(pushed);
      }
    } else {
      final_status = ToGrpcStatus(result.status());
    }
    spdlog::info("StreamAttention peer={} prompt={} tokens={} bytes={} status={} ms={:.1f}", context_->peer(),
                 resolved_.generate.prompt_ids.size(), result.ok() ? result->tokens.size() : 0, bytes_sent_,
                 static_cast<int>(final_status.error_code()), MsBetween(started, Clock::now()));
    std::lock_guard<std::mutex> lock(mu_);
    final_status_ = final_status;
    done_ = true;
    MaybeFinishLocked();
  }

  // Queues a message; waits while the queue is full. CANCELLED once the client is gone.
  absl::Status Push(v1::StreamAttentionResponse msg) {
    std::unique_lock<std::mutex> lock(mu_);
    const size_t limit = static_cast<size_t>(service_->options_.stream_queue_messages);
    cv_.wait(lock, [&] { return cancelled_ || queue_.size() < limit; });
    if (cancelled_) return absl::CancelledError("the client cancelled the stream or disconnected");
    queue_.push_back(std::move(msg));
    service_->metrics_.UpdateQueueHighWater(static_cast<int64_t>(queue_.size()));
    if (!writing_) {
      writing_ = true;
      StartWrite(&queue_.front());
    }
    return absl::OkStatus();
  }

  void MaybeFinishLocked() {
    if (done_ && !writing_ && !finished_) {
      finished_ = true;
      FinishAndRecord(cancelled_ && final_status_.ok() ? grpc::Status(grpc::StatusCode::CANCELLED, "cancelled")
                                                       : final_status_);
    }
  }

  void FinishAndRecord(const grpc::Status& status) {
    service_->metrics_.RecordRequest("StreamAttention", status.error_code(),
                                     MsBetween(received_, Clock::now()) / 1e3);
    Finish(status);
  }

  AttentionServiceImpl* service_;
  grpc::CallbackServerContext* context_;
  v1::GenerateRequest request_;
  ResolvedRequest resolved_;
  Clock::time_point received_;
  CancelToken cancel_;
  int64_t bytes_sent_ = 0;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<v1::StreamAttentionResponse> queue_;  // front is in flight while writing_
  bool writing_ = false;
  bool cancelled_ = false;
  bool done_ = false;
  bool finished_ = false;
  grpc::Status final_status_;
};

AttentionServiceImpl::AttentionServiceImpl(const Engine* engine, ServiceOptions options)
    : engine_(engine), options_(std::move(options)), scheduler_(std::make_unique<Scheduler>(options_.scheduler)) {}

AttentionServiceImpl::~AttentionServiceImpl() = default;

void AttentionServiceImpl::StopAccepting() {
  accepting_ = false;
  std::lock_guard<std::mutex> lock(active_mu_);
  for (CancelToken* token : active_) token->Cancel();
}

void AttentionServiceImpl::Register(CancelToken* token) {
  std::lock_guard<std::mutex> lock(active_mu_);
  active_.insert(token);
  if (!accepting_) token->Cancel();
}

void AttentionServiceImpl::Unregister(CancelToken* token) {
  std::lock_guard<std::mutex> lock(active_mu_);
  active_.erase(token);
}

grpc::Status AttentionServiceImpl::Admit(grpc::CallbackServerContext* context) const {
  if (!accepting_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down");
  if (options_.auth_tokens.empty()) return grpc::Status::OK;
  const auto& md = context->client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata");
  }
  const std::string value(it->second.data(), it->second.size());
  const std::string prefix = "Bearer ";
  if (value.compare(0, prefix.size(), prefix) != 0 || !options_.auth_tokens.count(value.substr(prefix.size()))) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "the bearer token is not valid for this server");
  }
  return grpc::Status::OK;
}

grpc::ServerUnaryReactor* AttentionServiceImpl::Generate(grpc::CallbackServerContext* context,
                                                         const v1::GenerateRequest* request,
                                                         v1::GenerateResponse* response) {
  const auto received = Clock::now();
  auto* reactor = context->DefaultReactor();
  grpc::Status admitted = Admit(context);
  if (!admitted.ok()) return FinishUnary(&metrics_, "Generate", received, reactor, admitted);
  auto resolved = ResolveRequest(*request, *engine_, options_.model_name, options_.max_capture_bytes);
  if (!resolved.ok()) return FinishUnary(&metrics_, "Generate", received, reactor, ToGrpcStatus(resolved.status()));
  // Generate returns statistics only.
  resolved->capture.form = Form::kNone;
  auto job = [this, context, response, reactor, received, r = std::move(*resolved)]() mutable {
    const auto started = Clock::now();
    CancelToken cancel;
    CollectingSink sink(context, &cancel, response);
    Register(&cancel);
    auto result = engine_->Generate(r.generate, r.capture, &sink, &cancel);
    Unregister(&cancel);
    grpc::Status status = ToGrpcStatus(result.status());
    if (result.ok()) {
      metrics_.tokens_generated += static_cast<int64_t>(result->tokens.size());
      metrics_.decode_steps += result->decode_steps;
      for (int64_t id : result->tokens) response->add_token_ids(id);
      for (auto& piece : engine_->Pieces(result->tokens)) response->add_pieces(std::move(piece));
      if (engine_->info().has_tokenizer) response->set_text(engine_->Decode(result->tokens, true).value());
      response->set_finish_reason(ToProto(result->finish));
      response->set_prompt_tokens(static_cast<int64_t>(r.generate.prompt_ids.size()));
      FillTimings(*result, r.generate.prompt_ids.size(), MsBetween(received, started), response->mutable_timings());
      if (result->finish == FinishReason::kCancelled) {
        status = accepting_ ? grpc::Status(grpc::StatusCode::CANCELLED, "the generation was cancelled")
                            : grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down");
      }
    }
    spdlog::info("Generate peer={} prompt={} tokens={} status={} ms={:.1f}", context->peer(),
                 r.generate.prompt_ids.size(), result.ok() ? result->tokens.size() : 0,
                 static_cast<int>(status.error_code()), MsBetween(started, Clock::now()));
    FinishUnary(&metrics_, "Generate", received, reactor, status);
  };
  if (!scheduler_->TrySubmit(std::move(job))) {
    ++metrics_.rejected_busy;
    FinishUnary(&metrics_, "Generate", received, reactor,
                grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                             "the server is busy: every generation slot and queue place is taken; retry later"));
  }
  return reactor;
}

grpc::ServerWriteReactor<v1::StreamAttentionResponse>* AttentionServiceImpl::StreamAttention(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  return new StreamReactor(this, context, request);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::Tokenize(grpc::CallbackServerContext* context,
                                                         const v1::TokenizeRequest* request,
                                                         v1::TokenizeResponse* response) {
  const auto received = Clock::now();
  grpc::Status admitted = Admit(context);
  if (!admitted.ok()) return FinishUnary(&metrics_, "Tokenize", received, context->DefaultReactor(), admitted);
  if (!utf8::IsValid(request->text())) {
    return FinishUnary(&metrics_, "Tokenize", received, context->DefaultReactor(),
                       grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "the text is not valid UTF-8"));
  }
  auto ids = engine_->Encode(request->text(), request->add_special_tokens());
  if (!ids.ok()) return FinishUnary(&metrics_, "Tokenize", received, context->DefaultReactor(), ToGrpcStatus(ids.status()));
  for (int64_t id : *ids) response->add_ids(id);
  for (auto& piece : engine_->Pieces(*ids)) response->add_pieces(std::move(piece));
  return FinishUnary(&metrics_, "Tokenize", received, context->DefaultReactor(), grpc::Status::OK);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::Detokenize(grpc::CallbackServerContext* context,
                                                           const v1::DetokenizeRequest* request,
                                                           v1::DetokenizeResponse* response) {
  const auto received = Clock::now();
  grpc::Status admitted = Admit(context);
  if (!admitted.ok()) return FinishUnary(&metrics_, "Detokenize", received, context->DefaultReactor(), admitted);
  for (int64_t id : request->ids()) {
    if (id < 0 || id >= engine_->info().vocab_size) {
      return FinishUnary(&metrics_, "Detokenize", received, context->DefaultReactor(), grpc::Status(grpc::StatusCode::OUT_OF_RANGE,
                                             absl::StrCat("token id ", id, " is outside the vocabulary (0-",
                                                          engine_->info().vocab_size - 1, ")")));
    }
  }
  auto text = engine_->Decode({request->ids().begin(), request->ids().end()}, request->skip_special_tokens());
  if (!text.ok()) return FinishUnary(&metrics_, "Detokenize", received, context->DefaultReactor(), ToGrpcStatus(text.status()));
  response->set_text(*text);
  return FinishUnary(&metrics_, "Detokenize", received, context->DefaultReactor(), grpc::Status::OK);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::GetModelInfo(grpc::CallbackServerContext* context,
                                                             const v1::GetModelInfoRequest*, v1::ModelInfo* response) {
  const auto received = Clock::now();
  grpc::Status admitted = Admit(context);
  if (!admitted.ok()) return FinishUnary(&metrics_, "GetModelInfo", received, context->DefaultReactor(), admitted);
  FillModelInfo(engine_->info(), options_.model_name, response);
  return FinishUnary(&metrics_, "GetModelInfo", received, context->DefaultReactor(), grpc::Status::OK);
}

}  // namespace attnscope
