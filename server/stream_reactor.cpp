#include "server/stream_reactor.h"

#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "server/convert.h"
#include "server/grpc_status.h"
#include "server/service.h"

namespace attnscope {

StreamReactor::StreamReactor(AttentionServiceImpl* service, grpc::CallbackServerContext* context,
                             const grpc::ByteBuffer* raw)
    : service_(service),
      received_(Clock::now()),
      state_(std::make_shared<StreamState>()),
      shared_({service->options_.max_shared_bytes, service->options_.shared_chunk_bytes,
               service->options_.chunk_bytes, service->options_.stall_timeout_s},
              &service->metrics_,
              {[state = state_.get()] {
                 std::lock_guard<std::mutex> lock(state->mu);
                 return state->cancelled;
               },
               [service] { return service->scheduler_->queued() > 0; },
               [state = state_.get()] { return state->context->peer(); }}) {
  state_->reactor = this;
  state_->context = context;
  absl::Status admitted = service_->Admit(context);
  if (admitted.ok()) admitted = Decode(raw, &request_);
  if (!admitted.ok()) {
    FinishBeforeJob(admitted);
    return;
  }
  // OnCancel, which reads ticket_, runs only after this constructor has returned.
  ticket_ = service_->scheduler_->TrySubmit([this, state = state_] { Run(); });
  if (ticket_ == 0) {
    ++service_->metrics_.rejected_busy;
    FinishBeforeJob(BusyError());
    return;
  }
  service_->Watch(state_);
}

void StreamReactor::OnWriteDone(bool ok) {
  std::shared_ptr<StreamState> state = state_;
  absl::Status status;
  {
    std::lock_guard<std::mutex> lock(state->mu);
    state->queue.pop_front();  // the message just written
    state->last_progress = Clock::now();
    if (!ok) Stop(state.get());
    if (!state->queue.empty() && !state->cancelled) {
      StartWrite(&state->queue.front());
    } else {
      state->writing = false;
      if (state->cancelled) state->queue.clear();
    }
    state->cv.notify_all();
    if (!state->TakeFinish(&status)) return;
  }
  FinishAndRecord(status);
}

void StreamReactor::OnCancel() {
  std::shared_ptr<StreamState> state = state_;
  absl::Status status;
  {
    std::lock_guard<std::mutex> lock(state->mu);
    Stop(state.get());
    if (!state->job_done && service_->scheduler_->Withdraw(ticket_)) {
      // Still queued: it gives its place back now and never runs.
      ++service_->metrics_.withdrawn;
      state->job_done = true;
      state->final_status = absl::CancelledError("the client left while the request was queued");
    }
    if (!state->TakeFinish(&status)) return;
  }
  FinishAndRecord(status);
}

absl::Status StreamReactor::OnBlock(const Block& block) {
  auto emit = [this](const v1::StreamAttentionResponse& msg) {
    const int64_t n = msg.has_attention() ? static_cast<int64_t>(msg.attention().data().size() +
                                                                 msg.attention().indices().size()) +
                                                msg.attention().shared_bytes() +
                                                msg.attention().shared_index_bytes()
                                          : static_cast<int64_t>(msg.statistic().data().size());
    RETURN_IF_ERROR(Push(msg));
    bytes_sent_ += n;
    if (msg.has_attention()) service_->metrics_.attention_bytes += n;
    return absl::OkStatus();
  };
  if (!shared_.used() || block.header.kind != BlockKind::kAttention)
    return ChunkBlock(block, service_->options_.chunk_bytes, emit);
  const ChunkPlacer place = [this](const ChunkPiece& piece, v1::AttentionChunk* chunk) {
    return shared_.Place(piece, chunk);
  };
  return ChunkBlock(block, shared_.piece_bytes(), emit, &place);
}

absl::Status StreamReactor::OnToken(int64_t step, int64_t id) {
  ++service_->metrics_.tokens_generated;
  ++tokens_;
  v1::StreamAttentionResponse msg;
  msg.mutable_token()->set_step(step);
  msg.mutable_token()->set_id(id);
  msg.mutable_token()->set_piece(service_->engine_->Pieces({id})[0]);
  return Push(msg);
}

absl::Status StreamReactor::OnDivergence(const DivergenceStep& step) {
  v1::StreamAttentionResponse msg;
  FillDivergence(step, msg.mutable_divergence());
  return Push(msg);
}

absl::Status StreamReactor::OnKvDecision(const KvDecision& decision) {
  v1::StreamAttentionResponse msg;
  FillKvDecision(decision, msg.mutable_kv_decision());
  return Push(msg);
}

void StreamReactor::Stop(StreamState* state) {
  state->cancelled = true;
  state->cancel.Cancel();
  state->cv.notify_all();
}

void StreamReactor::FinishAndRecord(const absl::Status& status) {
  service_->metrics_.RecordRequest("StreamAttention", static_cast<int>(status.code()),
                                   MsBetween(received_, Clock::now()) / 1e3);
  Finish(ToGrpcStatus(status));
}

void StreamReactor::FinishBeforeJob(const absl::Status& status) {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->job_done = true;
    state_->finishing = true;
  }
  FinishAndRecord(status);
}

void StreamReactor::Run() {
  std::shared_ptr<StreamState> state = state_;
  service_->Register(&state->cancel);
  absl::Status status = Stream();
  service_->Unregister(&state->cancel);
  {
    std::lock_guard<std::mutex> lock(state->mu);
    state->job_done = true;
    state->final_status = status;
    if (!state->TakeFinish(&status)) return;
  }
  FinishAndRecord(status);
}

absl::Status StreamReactor::Stream() {
  const auto started = Clock::now();
  const Engine& engine = *service_->engine_;
  if (state_->cancel.cancelled()) return CancelledStatus(service_->accepting());
  auto resolved = ResolveRequest(request_, engine, service_->resolve_options());
  if (!resolved.ok()) return resolved.status();
  resolved_ = std::move(*resolved);
  const GenerateRequest& generate = resolved_->generate.request();
  v1::StreamAttentionResponse header;
  auto* h = header.mutable_header();
  FillStreamHeader(*resolved_, engine, service_->options_.model_name,
                   service_->options_.chunk_bytes, absl::StrCat(service_->next_id_++), h);
  if (request_.has_shared_output())
    RETURN_IF_ERROR(shared_.Attach(request_.shared_output(), started, h));
  absl::Status pushed_header = Push(header);
  absl::StatusOr<GenerateResult> result =
      pushed_header.ok() ? engine.Generate(resolved_->generate, this, &state_->cancel)
                         : absl::StatusOr<GenerateResult>(pushed_header);
  absl::Status final_status;
  if (result.ok()) {
    service_->metrics_.decode_steps += result->decode_steps;
    if (result->finish == FinishReason::kCancelled) {
      final_status = StoppedStatus();
    } else {
      v1::StreamAttentionResponse trailer;
      FillStreamTrailer(*result, engine, generate.prompt_ids.size(), MsBetween(received_, started),
                        bytes_sent_, trailer.mutable_trailer());
      final_status = Push(trailer);
    }
  } else {
    final_status = absl::IsCancelled(result.status()) ? StoppedStatus() : result.status();
  }
  spdlog::info("StreamAttention peer={} prompt={} tokens={} bytes={} status={} ms={:.1f}",
               state_->context->peer(), generate.prompt_ids.size(), tokens_, bytes_sent_,
               static_cast<int>(final_status.code()), MsBetween(started, Clock::now()));
  return final_status;
}

absl::Status StreamReactor::StoppedStatus() {
  std::lock_guard<std::mutex> lock(state_->mu);
  if (state_->stalled) {
    return absl::DeadlineExceededError(
        absl::StrCat("the client read nothing for ", service_->options_.stall_timeout_s,
                     " s (--stall_timeout_s); the stream was stopped"));
  }
  return CancelledStatus(service_->accepting());
}

absl::Status StreamReactor::Push(const v1::StreamAttentionResponse& msg) {
  grpc::ByteBuffer encoded;
  RETURN_IF_ERROR(Encode(msg, &encoded));
  StreamState& s = *state_;
  std::unique_lock<std::mutex> lock(s.mu);
  const size_t limit = static_cast<size_t>(service_->options_.stream_queue_messages);
  s.cv.wait(lock, [&] { return s.cancelled || s.queue.size() < limit; });
  if (s.cancelled) return absl::CancelledError("the client cancelled the stream or disconnected");
  s.queue.push_back(std::move(encoded));
  service_->metrics_.UpdateQueueHighWater(static_cast<int64_t>(s.queue.size()));
  if (!s.writing) {
    s.writing = true;
    s.last_progress = Clock::now();
    StartWrite(&s.queue.front());
  }
  return absl::OkStatus();
}

}  // namespace attnscope
