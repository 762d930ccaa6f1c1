#include "server/service.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <deque>
#include <functional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/status_macros.h"
#include "server/convert.h"
#include "server/grpc_status.h"

namespace attnscope {
namespace {

using Clock = std::chrono::steady_clock;

// What a client hears when its shared region cannot be used (the details go to the server log).
constexpr absl::string_view kSharedRegionRefused =
    "the shared-memory region could not be used by this server (a client on another host or in "
    "another IPC namespace, or a region that is not the caller's: its name, size, header or key "
    "did not check out); the values come on the wire";

double MsBetween(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

void FillTimings(const GenerateResult& r, int64_t prompt_tokens, double queue_ms, v1::Timings* t) {
  t->set_queue_ms(queue_ms);
  t->set_prefill_ms(r.timings.prefill_ms);
  t->set_decode_ms(r.timings.decode_ms);
  if (r.timings.prefill_ms > 0)
    t->set_prefill_tokens_per_s(prompt_tokens / (r.timings.prefill_ms / 1e3));
  if (r.timings.decode_ms > 0)
    t->set_decode_tokens_per_s(r.decode_steps / (r.timings.decode_ms / 1e3));
}

absl::Status BusyError() {
  return absl::ResourceExhaustedError(
      "the server is busy: every generation slot and queue place is taken; retry later");
}

absl::Status CancelledStatus(bool accepting) {
  return accepting
             ? absl::CancelledError("the generation was cancelled")
             : absl::UnavailableError("the server is shutting down; the generation was stopped");
}

// Decodes a raw request; INVALID_ARGUMENT naming the expected message when it does not decode.
template <typename Message>
absl::Status Decode(const grpc::ByteBuffer* raw, Message* out) {
  grpc::ByteBuffer copy(*raw);  // shares the slices; decoding consumes the buffer
  grpc::Status s = grpc::SerializationTraits<Message>::Deserialize(&copy, out);
  if (s.ok()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("the request could not be decoded as ",
                                                 Message::descriptor()->full_name(), ": ",
                                                 s.error_message()));
}

absl::Status Encode(const google::protobuf::Message& message, grpc::ByteBuffer* out) {
  bool own = false;
  grpc::Status s =
      grpc::SerializationTraits<google::protobuf::Message>::Serialize(message, out, &own);
  return s.ok()
             ? absl::OkStatus()
             : absl::InternalError(absl::StrCat("cannot encode the response: ", s.error_message()));
}

// Unary generation keeps statistics only.
class CollectingSink : public AttentionSink {
 public:
  explicit CollectingSink(v1::GenerateResponse* response) : response_(response) {}
  absl::Status OnBlock(const Block& block) override {
    if (block.header.kind == BlockKind::kStatistic)
      FillStatistic(block, response_->add_statistics());
    return absl::OkStatus();
  }

 private:
  v1::GenerateResponse* response_;
};

}  // namespace

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
                const grpc::ByteBuffer* raw)
      : service_(service), received_(Clock::now()), state_(std::make_shared<StreamState>()) {
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

  void OnWriteDone(bool ok) override {
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

  void OnCancel() override {
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

  void OnDone() override { delete this; }

  // AttentionSink, on the engine thread.
  absl::Status OnBlock(const Block& block) override {
    auto emit = [this](const v1::StreamAttentionResponse& msg) {
      const int64_t n = msg.has_attention()
                            ? static_cast<int64_t>(msg.attention().data().size() +
                                                   msg.attention().indices().size()) +
                                  msg.attention().shared_bytes() +
                                  msg.attention().shared_index_bytes()
                            : static_cast<int64_t>(msg.statistic().data().size());
      RETURN_IF_ERROR(Push(msg));
      bytes_sent_ += n;
      if (msg.has_attention()) service_->metrics_.attention_bytes += n;
      return absl::OkStatus();
    };
    if (ring_ == nullptr || block.header.kind != BlockKind::kAttention)
      return ChunkBlock(block, service_->options_.chunk_bytes, emit);
    const ChunkPlacer place = [this](const ChunkPiece& piece,
                                     v1::AttentionChunk* chunk) -> absl::Status {
      const auto keep_waiting = [this](double idle_s) { return WaitForRing(idle_s); };
      const auto put_started = Clock::now();
      // Dense values come as `fill`: the engine writes them straight into the ring.
      ASSIGN_OR_RETURN(const int64_t position,
                       piece.fill ? ring_->Place(
                                        piece.value_bytes, [&piece](char* dst) { piece.fill(dst); },
                                        keep_waiting)
                                  : ring_->Put(piece.values, piece.indices, keep_waiting));
      RETURN_IF_ERROR(CountClientWait(put_started));
      chunk->set_shared_position(position);
      chunk->set_shared_bytes(piece.value_bytes);
      chunk->set_shared_index_bytes(static_cast<int64_t>(piece.indices.size()));
      service_->metrics_.shared_bytes +=
          piece.value_bytes + static_cast<int64_t>(piece.indices.size());
      return absl::OkStatus();
    };
    const int64_t piece =
        std::min(std::max(service_->options_.shared_chunk_bytes, service_->options_.chunk_bytes),
                 ring_->capacity() / 4);
    return ChunkBlock(block, piece, emit, &place);
  }

  // Dense blocks come unmaterialized when they go to the mapped ring (ChunkBlock has them written
  // there piece by piece).
  bool PlacesValues() const override { return ring_ != nullptr && ring_->mapped(); }

  // The engine thread waits for room in the shared ring: the client's reading is its progress, as
  // a taken message is on the wire. Stops on cancel, shutdown, or a client that reads nothing for
  // the stall timeout.
  absl::Status WaitForRing(double idle_s) {
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      if (state_->cancelled)
        return absl::CancelledError("the client cancelled the stream or disconnected");
    }
    if (idle_s <= service_->options_.stall_timeout_s) return absl::OkStatus();
    ++service_->metrics_.stalled_streams;
    spdlog::warn(
        "StreamAttention peer={}: the client read nothing from its shared region for {} s; "
        "stopping the stream and freeing its slot",
        state_->context->peer(), service_->options_.stall_timeout_s);
    return absl::DeadlineExceededError(absl::StrCat(
        "the client read nothing from its shared region for ", service_->options_.stall_timeout_s,
        " s (--stall_timeout_s); the stream was stopped"));
  }

  // The idle share of a same-host stream: a reader that keeps up only just (each piece read within
  // the stall timeout, but slowly) would hold its slot as long as it likes. (On the wire, a slow
  // network is the usual reason to wait: the stall timeout alone applies there.) Once it has spent
  // more than the stall timeout in all, and most of its time, waiting for its client while other
  // requests wait for a slot, it is stopped.
  absl::Status CountClientWait(Clock::time_point since) {
    const auto now = Clock::now();
    waited_s_ += MsBetween(since, now) / 1e3;
    const double elapsed_s = MsBetween(job_started_, now) / 1e3;
    const double stall_s = service_->options_.stall_timeout_s;
    if (waited_s_ <= stall_s || waited_s_ <= 0.5 * elapsed_s ||
        service_->scheduler_->queued() == 0) {
      return absl::OkStatus();
    }
    ++service_->metrics_.stalled_streams;
    spdlog::warn(
        "StreamAttention peer={}: waited {:.1f} s of {:.1f} s for its client while others queue; "
        "stopping the stream and freeing its slot",
        state_->context->peer(), waited_s_, elapsed_s);
    return absl::DeadlineExceededError(absl::StrFormat(
        "the stream spent %.1f s of its %.1f s waiting for the client to read, while other "
        "requests waited for a slot; it was stopped (read faster, or capture less)",
        waited_s_, elapsed_s));
  }

  // Opens the request's shared region, if it names one: the header says whether it is used or
  // why not (the values then go on the wire). Only a malformed name or key fails the call.
  absl::Status AttachSharedOutput(v1::StreamHeader* header) {
    if (!request_.has_shared_output()) return absl::OkStatus();
    const v1::SharedOutput& so = request_.shared_output();
    auto ring = shared_ring::Writer::Open(so.name(), so.capacity(), so.key(),
                                          service_->options_.max_shared_bytes);
    if (ring.ok()) {
      ring_ = std::move(*ring);
      header->set_shared_output(true);
      ++service_->metrics_.shared_streams;
      return absl::OkStatus();
    }
    if (absl::IsInvalidArgument(ring.status())) return ring.status();
    ++service_->metrics_.shared_refused;
    if (absl::IsPermissionDenied(ring.status())) {
      // The details (whether a name exists, its size, that a key is wrong) are for the log only.
      spdlog::info("request {}: shared output refused: {}", header->request_id(),
                   std::string(ring.status().message()));
      header->set_shared_output_refused(std::string(kSharedRegionRefused));
    } else {
      header->set_shared_output_refused(std::string(ring.status().message()));
    }
    return absl::OkStatus();
  }
  absl::Status OnToken(int64_t step, int64_t id) override {
    ++service_->metrics_.tokens_generated;
    ++tokens_;
    v1::StreamAttentionResponse msg;
    msg.mutable_token()->set_step(step);
    msg.mutable_token()->set_id(id);
    msg.mutable_token()->set_piece(service_->engine_->Pieces({id})[0]);
    return Push(msg);
  }

  // Under state->mu: the call is over for the generation (client gone, stalled, shut down).
  static void Stop(StreamState* state) {
    state->cancelled = true;
    state->cancel.Cancel();
    state->cv.notify_all();
  }

  // Ends the call; the caller's last use of this reactor.
  void FinishAndRecord(const absl::Status& status) {
    service_->metrics_.RecordRequest("StreamAttention", static_cast<int>(status.code()),
                                     MsBetween(received_, Clock::now()) / 1e3);
    Finish(ToGrpcStatus(status));
  }

 private:
  // Refusal in the constructor: no job exists, nothing else can race.
  void FinishBeforeJob(const absl::Status& status) {
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->job_done = true;
      state_->finishing = true;
    }
    FinishAndRecord(status);
  }

  // The job, on an engine thread.
  void Run() {
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

  // Resolves the request, then streams header, blocks, tokens and trailer. Returns how the call
  // ends.
  absl::Status Stream() {
    const auto started = Clock::now();
    job_started_ = started;
    const Engine& engine = *service_->engine_;
    if (state_->cancel.cancelled()) return CancelledStatus(service_->accepting());
    auto resolved = ResolveRequest(request_, engine, service_->resolve_options());
    if (!resolved.ok()) return resolved.status();
    resolved_ = std::move(*resolved);
    v1::StreamAttentionResponse header;
    auto* h = header.mutable_header();
    h->set_request_id(absl::StrCat(service_->next_id_++));
    FillModelInfo(engine.info(), service_->options_.model_name, h->mutable_model());
    for (int64_t id : resolved_.generate.prompt_ids) h->add_prompt_token_ids(id);
    for (auto& piece : engine.Pieces(resolved_.generate.prompt_ids))
      h->add_prompt_pieces(std::move(piece));
    FillCaptureSpec(resolved_.capture, engine.info().num_layers, engine.info().num_heads,
                    h->mutable_capture());
    h->set_estimated_bytes(resolved_.estimated_bytes);
    h->set_chunk_bytes(service_->options_.chunk_bytes);
    h->set_max_new_tokens(resolved_.generate.max_new_tokens);
    h->set_max_length(resolved_.max_length);
    h->set_untruncated_prompt_tokens(resolved_.untruncated_prompt_tokens);
    RETURN_IF_ERROR(AttachSharedOutput(h));
    absl::Status pushed_header = Push(header);
    absl::StatusOr<GenerateResult> result =
        pushed_header.ok()
            ? engine.Generate(resolved_.generate, resolved_.capture, this, &state_->cancel)
            : absl::StatusOr<GenerateResult>(pushed_header);
    absl::Status final_status;
    if (result.ok()) {
      service_->metrics_.decode_steps += result->decode_steps;
      if (result->finish == FinishReason::kCancelled) {
        final_status = StoppedStatus();
      } else {
        v1::StreamAttentionResponse trailer;
        auto* t = trailer.mutable_trailer();
        for (int64_t id : result->tokens) t->add_token_ids(id);
        if (engine.info().has_tokenizer) {
          auto text = engine.Decode(result->tokens, /*skip_special_tokens=*/true);
          if (text.ok()) t->set_text(*text);
        }
        t->set_finish_reason(ToProto(result->finish));
        FillTimings(*result, resolved_.generate.prompt_ids.size(), MsBetween(received_, started),
                    t->mutable_timings());
        t->set_bytes_sent(bytes_sent_);
        final_status = Push(trailer);
      }
    } else {
      final_status = absl::IsCancelled(result.status()) ? StoppedStatus() : result.status();
    }
    spdlog::info("StreamAttention peer={} prompt={} tokens={} bytes={} status={} ms={:.1f}",
                 state_->context->peer(), resolved_.generate.prompt_ids.size(), tokens_,
                 bytes_sent_, static_cast<int>(final_status.code()),
                 MsBetween(started, Clock::now()));
    return final_status;
  }

  // Why a generation that saw its cancel token ended.
  absl::Status StoppedStatus() {
    std::lock_guard<std::mutex> lock(state_->mu);
    if (state_->stalled) {
      return absl::DeadlineExceededError(
          absl::StrCat("the client read nothing for ", service_->options_.stall_timeout_s,
                       " s (--stall_timeout_s); the stream was stopped"));
    }
    return CancelledStatus(service_->accepting());
  }

  // Queues a message; waits while the queue is full. An error once the stream is stopped.
  absl::Status Push(const v1::StreamAttentionResponse& msg) {
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

  AttentionServiceImpl* service_;
  v1::GenerateRequest request_;
  const Clock::time_point received_;
  std::shared_ptr<StreamState> state_;
  Scheduler::Ticket ticket_ = 0;
  ResolvedRequest resolved_;       // the job's
  int64_t bytes_sent_ = 0;         // the job's
  int64_t tokens_ = 0;             // the job's: tokens generated, also when the stream ends early
  Clock::time_point job_started_;  // the job's: when it began
  double waited_s_ = 0;            // the job's: seconds spent waiting for the client to read
  std::unique_ptr<shared_ring::Writer> ring_;  // the job's: the client's region, when used
};

// A unary call whose work runs on a scheduler thread. A client that leaves while the call is
// queued frees its place at once; one that leaves while it runs cancels it (the work sees
// `cancel`).
template <typename Request, typename Response>
class JobReactor : public grpc::ServerUnaryReactor {
 public:
  using Work = std::function<absl::Status(const Request& request, Response* response,
                                          const CancelToken& cancel)>;

  JobReactor(AttentionServiceImpl* service, grpc::CallbackServerContext* context,
             const char* method, Scheduler* scheduler, const grpc::ByteBuffer* raw_request,
             grpc::ByteBuffer* raw_response, Work work)
      : service_(service),
        method_(method),
        scheduler_(scheduler),
        received_(Clock::now()),
        raw_response_(raw_response),
        work_(std::move(work)) {
    absl::Status admitted = service_->Admit(context);
    if (admitted.ok()) admitted = Decode(raw_request, &request_);
    if (!admitted.ok()) {
      FinishAndRecord(admitted);
      return;
    }
    ticket_ = scheduler_->TrySubmit([this] { Run(); });
    if (ticket_ == 0) {
      ++service_->metrics_.rejected_busy;
      FinishAndRecord(BusyError());
    }
  }

  void OnCancel() override {
    cancel_.Cancel();
    if (scheduler_->Withdraw(ticket_)) {
      ++service_->metrics_.withdrawn;
      FinishAndRecord(absl::CancelledError("the client left while the request was queued"));
    }
  }

  void OnDone() override { delete this; }

 private:
  void Run() {
    service_->Register(&cancel_);
    absl::Status status = cancel_.cancelled() ? CancelledStatus(service_->accepting())
                                              : work_(request_, &response_, cancel_);
    service_->Unregister(&cancel_);
    if (status.ok()) status = Encode(response_, raw_response_);
    FinishAndRecord(status);
  }

  void FinishAndRecord(const absl::Status& status) {
    service_->metrics_.RecordRequest(method_, static_cast<int>(status.code()),
                                     MsBetween(received_, Clock::now()) / 1e3);
    Finish(ToGrpcStatus(status));
  }

  AttentionServiceImpl* service_;
  const char* method_;
  Scheduler* scheduler_;
  const Clock::time_point received_;
  grpc::ByteBuffer* raw_response_;  // gRPC's, valid until OnDone
  Work work_;
  Request request_;
  Response response_;
  CancelToken cancel_;
  Scheduler::Ticket ticket_ = 0;
};

AttentionServiceImpl::AttentionServiceImpl(const Engine* engine, ServiceOptions options)
    : engine_(engine),
      options_(std::move(options)),
      scheduler_(std::make_unique<Scheduler>(options_.scheduler)),
      tokenizer_scheduler_(std::make_unique<Scheduler>(options_.tokenizer)) {
  watchdog_ = std::thread([this] { WatchdogLoop(); });
}

AttentionServiceImpl::~AttentionServiceImpl() {
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
    ASSIGN_OR_RETURN(ResolvedRequest r, ResolveRequest(request, *engine_, resolve_options()));
    r.capture.form = Form::kNone;  // Generate returns statistics only
    CollectingSink sink(response);
    auto result = engine_->Generate(r.generate, r.capture, &sink, &cancel);
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
      response->set_prompt_tokens(static_cast<int64_t>(r.generate.prompt_ids.size()));
      FillTimings(*result, r.generate.prompt_ids.size(), MsBetween(received, started),
                  response->mutable_timings());
      if (result->finish == FinishReason::kCancelled) status = CancelledStatus(accepting_);
    }
    spdlog::info("Generate peer={} prompt={} tokens={} status={} ms={:.1f}", context->peer(),
                 r.generate.prompt_ids.size(), result.ok() ? result->tokens.size() : 0,
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
