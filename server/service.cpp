// The handlers: admission, the stall watchdog, and what each RPC does (the reactors that run them
// are stream_reactor.h and unary_reactor.h).
#include "server/service.h"

#include <spdlog/spdlog.h>

#include <chrono>

#include "core/status_macros.h"
#include "server/call.h"
#include "server/convert.h"
#include "server/stream_reactor.h"
#include "server/unary_reactor.h"

namespace attnscope {
namespace {

// Unary generation keeps statistics only.
class CollectingSink : public AttentionSink {
 public:
  explicit CollectingSink(v1::GenerateResponse* response) : response_(response) {}
  absl::Status OnBlock(const Block& block) override {
    if (block.header.kind == BlockKind::kStatistic)
      FillStatistic(block, response_->add_statistics());
    return absl::OkStatus();
  }
  absl::Status OnDivergence(const DivergenceStep& step) override {
    FillDivergence(step, response_->add_divergence());
    return absl::OkStatus();
  }
  absl::Status OnKvDecision(const KvDecision& decision) override {
    FillKvDecision(decision, response_->add_kv_decisions());
    return absl::OkStatus();
  }

 private:
  v1::GenerateResponse* response_;
};

}  // namespace

AttentionServiceImpl::AttentionServiceImpl(const Engine* engine, ServiceOptions options)
    : engine_(engine),
      options_(std::move(options)),
      scheduler_(std::make_unique<Scheduler>(options_.scheduler)),
      tokenizer_scheduler_(std::make_unique<Scheduler>(options_.tokenizer)) {
  watchdog_ = std::thread([this] { WatchdogLoop(); });
}

AttentionServiceImpl::~AttentionServiceImpl() {
  // Detached jobs outlive their RPCs: they are stopped (a running one ends with a status) and
  // their threads joined while everything they use still exists.
  StopAccepting();
  scheduler_.reset();
  tokenizer_scheduler_.reset();
  {
    std::lock_guard<std::mutex> lock(watch_mu_);
    watch_stop_ = true;
  }
  watch_cv_.notify_all();
  watchdog_.join();
}

void AttentionServiceImpl::StopAccepting() {
  accepting_ = false;
  std::lock_guard<std::mutex> lock(active_mu_);
  for (CancelToken* token : active_) token->Cancel();
}

void AttentionServiceImpl::Register(CancelToken* token) {
  std::lock_guard<std::mutex> lock(active_mu_);
  active_.push_back(token);
  if (!accepting_) token->Cancel();
}

void AttentionServiceImpl::Unregister(CancelToken* token) {
  std::lock_guard<std::mutex> lock(active_mu_);
  active_.remove(token);
}

void AttentionServiceImpl::Watch(const std::shared_ptr<StreamState>& state) {
  std::lock_guard<std::mutex> lock(watch_mu_);
  watched_.push_back(state);
}

void AttentionServiceImpl::WatchdogLoop() {
  const auto stall = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(std::max(0.05, options_.stall_timeout_s)));
  const auto tick = std::min<Clock::duration>(std::chrono::seconds(1), stall / 4);
  std::unique_lock<std::mutex> lock(watch_mu_);
  while (!watch_stop_) {
    watch_cv_.wait_for(lock, tick);
    const auto now = Clock::now();
    for (auto it = watched_.begin(); it != watched_.end();) {
      std::shared_ptr<StreamState> state = it->lock();
      if (state == nullptr) {
        it = watched_.erase(it);
        continue;
      }
      grpc::CallbackServerContext* context = nullptr;
      {
        std::lock_guard<std::mutex> state_lock(state->mu);
        if (state->finishing) {
          it = watched_.erase(it);
          continue;
        }
        if (state->writing && !state->stalled && now - state->last_progress > stall) {
          state->stalled = true;
          StreamReactor::Stop(state.get());
          ++state->pinned;  // the reactor stays unfinished while its context is in use below
          context = state->context;
        }
      }
      ++it;
      if (context == nullptr) continue;
      ++metrics_.stalled_streams;
      spdlog::warn(
          "StreamAttention peer={}: no message taken for {} s; stopping the stream and freeing its "
          "slot",
          context->peer(), options_.stall_timeout_s);
      // Fails the pending write (OnWriteDone(false)), possibly on this thread: called unlocked.
      context->TryCancel();
      absl::Status status;
      {
        std::lock_guard<std::mutex> state_lock(state->mu);
        --state->pinned;
        if (!state->TakeFinish(&status)) continue;
      }
      state->reactor->FinishAndRecord(status);
    }
  }
}

absl::Status AttentionServiceImpl::Admit(grpc::CallbackServerContext* context) const {
  if (!accepting_) return absl::UnavailableError("the server is shutting down");
  if (options_.auth.empty()) return absl::OkStatus();
  const auto& md = context->client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) return options_.auth.Check(nullptr);
  const absl::string_view value(it->second.data(), it->second.size());
  return options_.auth.Check(&value);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::Generate(grpc::CallbackServerContext* context,
                                                         const grpc::ByteBuffer* raw_request,
                                                         grpc::ByteBuffer* raw_response) {
  const auto received = Clock::now();
  auto work = [this, context, received](const v1::GenerateRequest& request,
                                        v1::GenerateResponse* response,
                                        const CancelToken& cancel) -> absl::Status {
    const auto started = Clock::now();
    ResolveOptions options = resolve_options();
    options.statistics_only = true;  // Generate returns statistics only
    ASSIGN_OR_RETURN(ResolvedRequest r, ResolveRequest(request, *engine_, options));
    const GenerateRequest& generate = r.generate.request();
    CollectingSink sink(response);
    auto result = engine_->Generate(r.generate, &sink, &cancel);
    absl::Status status = result.status();
    if (result.ok()) {
      metrics_.tokens_generated += static_cast<int64_t>(result->tokens.size());
      metrics_.decode_steps += result->decode_steps;
      for (int64_t id : result->tokens) response->add_token_ids(id);
      for (auto& piece : engine_->Pieces(result->tokens)) response->add_pieces(std::move(piece));
      if (engine_->info().has_tokenizer) {
        auto text = engine_->Decode(result->tokens, /*skip_special_tokens=*/true);
        if (text.ok()) response->set_text(*text);
      }
      response->set_finish_reason(ToProto(result->finish));
      response->set_prompt_tokens(static_cast<int64_t>(generate.prompt_ids.size()));
      FillTimings(*result, generate.prompt_ids.size(), MsBetween(received, started),
                  response->mutable_timings());
      if (result->finish == FinishReason::kCancelled) status = CancelledStatus(accepting_);
    }
    spdlog::info("Generate peer={} prompt={} tokens={} status={} ms={:.1f}", context->peer(),
                 generate.prompt_ids.size(), result.ok() ? result->tokens.size() : 0,
                 static_cast<int>(status.code()), MsBetween(started, Clock::now()));
    return status;
  };
  return new JobReactor<v1::GenerateRequest, v1::GenerateResponse>(
      this, context, "Generate", scheduler_.get(), raw_request, raw_response, std::move(work));
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* AttentionServiceImpl::StreamAttention(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  return new StreamReactor(this, context, request);
}

grpc::ServerUnaryReactor* AttentionServiceImpl::Tokenize(grpc::CallbackServerContext* context,
                                                         const grpc::ByteBuffer* raw_request,
                                                         grpc::ByteBuffer* raw_response) {
  auto work = [this](const v1::TokenizeRequest& request, v1::TokenizeResponse* response,
                     const CancelToken&) -> absl::Status {
    ASSIGN_OR_RETURN(std::vector<int64_t> ids,
                     engine_->Encode(request.text(), request.add_special_tokens()));
    for (int64_t id : ids) response->add_ids(id);
    for (auto& piece : engine_->Pieces(ids)) response->add_pieces(std::move(piece));
    return absl::OkStatus();
  };
  return new JobReactor<v1::TokenizeRequest, v1::TokenizeResponse>(
      this, context, "Tokenize", tokenizer_scheduler_.get(), raw_request, raw_response,
      std::move(work));
}

grpc::ServerUnaryReactor* AttentionServiceImpl::Detokenize(grpc::CallbackServerContext* context,
                                                           const grpc::ByteBuffer* raw_request,
                                                           grpc::ByteBuffer* raw_response) {
  auto work = [this](const v1::DetokenizeRequest& request, v1::DetokenizeResponse* response,
                     const CancelToken&) -> absl::Status {
    ASSIGN_OR_RETURN(std::string text, engine_->Decode({request.ids().begin(), request.ids().end()},
                                                       request.skip_special_tokens()));
    response->set_text(std::move(text));
    return absl::OkStatus();
  };
  return new JobReactor<v1::DetokenizeRequest, v1::DetokenizeResponse>(
      this, context, "Detokenize", tokenizer_scheduler_.get(), raw_request, raw_response,
      std::move(work));
}

grpc::ServerUnaryReactor* AttentionServiceImpl::DetectHeads(grpc::CallbackServerContext* context,
                                                            const grpc::ByteBuffer* raw_request,
                                                            grpc::ByteBuffer* raw_response) {
  auto work = [this, context](const v1::DetectHeadsRequest& request,
                              v1::DetectHeadsResponse* response,
                              const CancelToken& cancel) -> absl::Status {
    const auto started = Clock::now();
    ASSIGN_OR_RETURN(const HeadProbe probe, ToHeadProbe(request, options_.model_name));
    auto detection = attnscope::DetectHeads(*engine_, probe, &cancel);
    absl::Status status = detection.status();
    if (status.ok()) {
      FillHeadDetection(*detection, response);
      response->set_compute_ms(MsBetween(started, Clock::now()));
    } else if (absl::IsCancelled(status)) {
      status = CancelledStatus(accepting_);
    }
    spdlog::info("DetectHeads peer={} probe={} status={} ms={:.1f}", context->peer(),
                 detection.ok() ? detection->probe_ids.size() : 0, static_cast<int>(status.code()),
                 MsBetween(started, Clock::now()));
    return status;
  };
  return new JobReactor<v1::DetectHeadsRequest, v1::DetectHeadsResponse>(
      this, context, "DetectHeads", scheduler_.get(), raw_request, raw_response, std::move(work));
}

grpc::ServerUnaryReactor* AttentionServiceImpl::GetModelInfo(grpc::CallbackServerContext* context,
                                                             const grpc::ByteBuffer* raw_request,
                                                             grpc::ByteBuffer* raw_response) {
  const auto received = Clock::now();
  v1::GetModelInfoRequest request;
  v1::ModelInfo info;
  absl::Status status = Admit(context);
  if (status.ok()) status = Decode(raw_request, &request);
  if (status.ok()) {
    FillModelInfo(engine_->info(), options_.model_name, &info);
    status = Encode(info, raw_response);
  }
  metrics_.RecordRequest("GetModelInfo", static_cast<int>(status.code()),
                         MsBetween(received, Clock::now()) / 1e3);
  auto* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

}  // namespace attnscope
