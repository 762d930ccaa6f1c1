// The detached-job RPCs (SubmitJob, GetJob, ListJobs, CancelJob, FetchResult) and the job itself:
// the request resolved and generated on the generation scheduler like a stream's, its messages
// going into the stored sample (samples/sample_writer.h) instead of onto the wire.
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/status_macros.h"
#include "samples/sample_writer.h"
#include "server/call.h"
#include "server/convert.h"
#include "server/grpc_status.h"
#include "server/jobs.h"
#include "server/service.h"

namespace attnscope {
namespace {

constexpr int64_t kFetchChunkBytes = 1 << 20;
constexpr int kMaxFetches = 64;  // FetchResult streams open at once (each holds a file)

// The engine's output of a job, into its stored sample.
class JobSink : public AttentionSink {
 public:
  JobSink(const Engine& engine, int64_t chunk_bytes, SampleWriter* writer, DetachedJob* job)
      : engine_(engine), chunk_bytes_(chunk_bytes), writer_(writer), job_(job) {}

  absl::Status OnBlock(const Block& block) override {
    return ChunkBlock(block, chunk_bytes_, [this](const v1::StreamAttentionResponse& msg) {
      if (msg.has_attention()) {
        job_->bytes +=
            static_cast<int64_t>(msg.attention().data().size() + msg.attention().indices().size());
        return writer_->OnAttention(msg.attention());
      }
      job_->bytes += static_cast<int64_t>(msg.statistic().data().size());
      return writer_->OnStatistic(msg.statistic());
    });
  }
  absl::Status OnToken(int64_t step, int64_t id) override {
    ++job_->tokens;
    v1::TokenEvent token;
    token.set_step(step);
    token.set_id(id);
    token.set_piece(engine_.Pieces({id})[0]);
    return writer_->OnToken(token);
  }
  absl::Status OnDivergence(const DivergenceStep& step) override {
    v1::DivergenceEvent event;
    FillDivergence(step, &event);
    return writer_->OnDivergence(event);
  }
  absl::Status OnKvDecision(const KvDecision& decision) override {
    v1::KvDecisionEvent event;
    FillKvDecision(decision, &event);
    return writer_->OnKvDecision(event);
  }

 private:
  const Engine& engine_;
  int64_t chunk_bytes_;
  SampleWriter* writer_;
  DetachedJob* job_;
};

// What attnscope-capture stores as a sample's prompt text: the text, a chat's last user message,
// nothing for token ids.
std::string PromptText(const v1::GenerateRequest& request) {
  if (request.has_chat()) {
    for (int i = request.chat().messages_size() - 1; i >= 0; --i)
      if (request.chat().messages(i).role() == "user") return request.chat().messages(i).content();
    return "";
  }
  return request.text();
}

// A unary RPC answered at once on gRPC's thread (the job RPCs only read and write the store).
template <typename Request, typename Response, typename Work>
grpc::ServerUnaryReactor* Answer(AttentionServiceImpl* service, Metrics* metrics,
                                 grpc::CallbackServerContext* context, const char* method,
                                 const grpc::ByteBuffer* raw_request,
                                 grpc::ByteBuffer* raw_response, Work work) {
  const auto received = Clock::now();
  Request request;
  Response response;
  absl::Status status = Decode(raw_request, &request);
  if (status.ok()) status = work(request, &response);
  if (status.ok()) status = Encode(response, raw_response);
  metrics->RecordRequest(method, static_cast<int>(status.code()),
                         MsBetween(received, Clock::now()) / 1e3);
  auto* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

absl::Status NotFound(const std::string& id) {
  constexpr size_t kShown = 40;
  return absl::NotFoundError(absl::StrCat(
      "no job '", id.size() > kShown ? id.substr(0, kShown) + "..." : id, "' for this token"));
}

// FetchResult: the stored file from an offset, one chunk in flight at a time (a slow reader holds
// a file descriptor, nothing else).
class FetchReactor : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  FetchReactor(std::atomic<int>* open, int fd, int64_t offset, int64_t size)
      : open_(open), fd_(fd), offset_(offset), size_(size) {
    Next();
  }
  void OnWriteDone(bool ok) override {
    if (!ok) return Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client left"));
    Next();
  }
  void OnDone() override {
    close(fd_);
    --*open_;
    delete this;
  }

 private:
  void Next() {
    if (offset_ >= size_ && sent_any_) return Finish(grpc::Status::OK);
    v1::FetchResultChunk chunk;
    const int64_t n = std::min(kFetchChunkBytes, size_ - offset_);
    std::string* data = chunk.mutable_data();
    data->resize(static_cast<size_t>(n));
    if (n > 0 && pread(fd_, data->data(), static_cast<size_t>(n), offset_) != n)
      return Finish(grpc::Status(grpc::StatusCode::DATA_LOSS, "the stored result cannot be read"));
    chunk.set_offset(offset_);
    chunk.set_total_bytes(size_);
    offset_ += n;
    sent_any_ = true;
    if (!Encode(chunk, &buffer_).ok())
      return Finish(grpc::Status(grpc::StatusCode::INTERNAL, "cannot encode a chunk"));
    StartWrite(&buffer_);
  }

  std::atomic<int>* open_;
  int fd_;
  int64_t offset_, size_;
  bool sent_any_ = false;
  grpc::ByteBuffer buffer_;
};

}  // namespace

absl::StatusOr<std::string> AttentionServiceImpl::JobOwner(grpc::CallbackServerContext* context) {
  RETURN_IF_ERROR(Admit(context));
  if (options_.jobs == nullptr) {
    return absl::FailedPreconditionError(
        "this server keeps no jobs: start it with --jobs_dir to submit detached jobs");
  }
  std::string token;
  const auto& md = context->client_metadata();
  if (auto it = md.find("authorization"); it != md.end() && !options_.auth.empty())
    token = PresentedBearerToken(absl::string_view(it->second.data(), it->second.size()));
  return options_.jobs->OwnerOf(token);
}

v1::JobInfo AttentionServiceImpl::InfoOf(DetachedJob& job) const {
  std::lock_guard<std::mutex> lock(job.mu);
  v1::JobInfo info = job.info;
  if (info.status() == v1::JOB_QUEUED && job.ticket != 0)
    info.set_queue_position(scheduler_->Position(job.ticket));
  if (!JobFinished(info.status())) {
    info.set_tokens(job.tokens.load());
    info.set_bytes(job.bytes.load());
  }
  return info;
}

grpc::ServerUnaryReactor* AttentionServiceImpl::SubmitJob(grpc::CallbackServerContext* context,
                                                          const grpc::ByteBuffer* raw_request,
                                                          grpc::ByteBuffer* raw_response) {
  return Answer<v1::GenerateRequest, v1::JobInfo>(
      this, &metrics_, context, "SubmitJob", raw_request, raw_response,
      [this, context](const v1::GenerateRequest& request, v1::JobInfo* out) -> absl::Status {
        ASSIGN_OR_RETURN(const std::string owner, JobOwner(context));
        if (!accepting_) return absl::UnavailableError("the server is shutting down");
        if (request.has_shared_output()) {
          return absl::InvalidArgumentError(
              "shared_output is for streams; a job's result is fetched with FetchResult");
        }
        ASSIGN_OR_RETURN(std::shared_ptr<DetachedJob> job, options_.jobs->Create(owner, request));
        Scheduler::Ticket ticket = 0;
        {
          std::lock_guard<std::mutex> lock(job->mu);
          job->info.set_status(v1::JOB_QUEUED);
          // Queued under the lock: the job cannot start (and clear its ticket) before it is set.
          ticket = job->ticket = scheduler_->TrySubmit([this, job] { RunJob(job); });
          if (ticket == 0) job->info.set_status(v1::JOB_RECEIVED);
          if (absl::Status saved = options_.jobs->Save(*job); !saved.ok())
            spdlog::warn("jobs: cannot record job {}: {}", job->id, std::string(saved.message()));
        }
        if (ticket == 0) {
          ++metrics_.rejected_busy;
          options_.jobs->Finish(*job, v1::JOB_FAILED, BusyError(), 0);
          return BusyError();
        }
        *out = InfoOf(*job);
        spdlog::info("SubmitJob peer={} job={}", context->peer(), job->id);
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* AttentionServiceImpl::GetJob(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* raw_request,
                                                       grpc::ByteBuffer* raw_response) {
  return Answer<v1::JobRequest, v1::JobInfo>(
      this, &metrics_, context, "GetJob", raw_request, raw_response,
      [this, context](const v1::JobRequest& request, v1::JobInfo* out) -> absl::Status {
        ASSIGN_OR_RETURN(const std::string owner, JobOwner(context));
        std::shared_ptr<DetachedJob> job = options_.jobs->Find(owner, request.job_id());
        if (job == nullptr) return NotFound(request.job_id());
        *out = InfoOf(*job);
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* AttentionServiceImpl::ListJobs(grpc::CallbackServerContext* context,
                                                         const grpc::ByteBuffer* raw_request,
                                                         grpc::ByteBuffer* raw_response) {
  return Answer<v1::ListJobsRequest, v1::ListJobsResponse>(
      this, &metrics_, context, "ListJobs", raw_request, raw_response,
      [this, context](const v1::ListJobsRequest&, v1::ListJobsResponse* out) -> absl::Status {
        ASSIGN_OR_RETURN(const std::string owner, JobOwner(context));
        for (const auto& job : options_.jobs->List(owner)) *out->add_jobs() = InfoOf(*job);
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* AttentionServiceImpl::CancelJob(grpc::CallbackServerContext* context,
                                                          const grpc::ByteBuffer* raw_request,
                                                          grpc::ByteBuffer* raw_response) {
  return Answer<v1::JobRequest, v1::JobInfo>(
      this, &metrics_, context, "CancelJob", raw_request, raw_response,
      [this, context](const v1::JobRequest& request, v1::JobInfo* out) -> absl::Status {
        ASSIGN_OR_RETURN(const std::string owner, JobOwner(context));
        std::shared_ptr<DetachedJob> job = options_.jobs->Find(owner, request.job_id());
        if (job == nullptr) return NotFound(request.job_id());
        bool withdrawn = false;
        {
          std::lock_guard<std::mutex> lock(job->mu);
          if (!JobFinished(job->info.status())) {
            job->cancel_requested = true;
            job->cancel.Cancel();  // a running job stops at its next block or step
            withdrawn = job->ticket != 0 && scheduler_->Withdraw(job->ticket);
          }
        }
        if (withdrawn) {
          options_.jobs->Finish(*job, v1::JOB_CANCELLED,
                                absl::CancelledError("cancelled before it started"), 0);
        }
        *out = InfoOf(*job);
        return absl::OkStatus();
      });
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* AttentionServiceImpl::FetchResult(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* raw_request) {
  v1::FetchResultRequest request;
  auto refuse = [&](const absl::Status& status) -> grpc::ServerWriteReactor<grpc::ByteBuffer>* {
    metrics_.RecordRequest("FetchResult", static_cast<int>(status.code()), 0);
    struct Refusal : grpc::ServerWriteReactor<grpc::ByteBuffer> {
      void OnDone() override { delete this; }
    };
    auto* reactor = new Refusal;
    reactor->Finish(ToGrpcStatus(status));
    return reactor;
  };
  absl::StatusOr<std::string> owner = JobOwner(context);
  if (!owner.ok()) return refuse(owner.status());
  if (absl::Status s = Decode(raw_request, &request); !s.ok()) return refuse(s);
  std::shared_ptr<DetachedJob> job = options_.jobs->Find(*owner, request.job_id());
  if (job == nullptr) return refuse(NotFound(request.job_id()));
  const v1::JobInfo info = InfoOf(*job);
  if (info.status() != v1::JOB_COMPLETED) {
    return refuse(absl::FailedPreconditionError(absl::StrCat(
        "job ", job->id, " is ", v1::JobStatus_Name(info.status()),
        info.status() == v1::JOB_FAILED ? absl::StrCat(": ", info.error_message()) : std::string(),
        "; only a completed job has a result")));
  }
  if (request.offset() < 0 || request.offset() > info.result_bytes()) {
    return refuse(absl::OutOfRangeError(absl::StrCat(
        "offset ", request.offset(), " is outside the result's ", info.result_bytes(), " bytes")));
  }
  if (++open_fetches_ > kMaxFetches) {
    --open_fetches_;
    return refuse(absl::ResourceExhaustedError(
        absl::StrCat("the server has ", kMaxFetches, " fetches open; try again shortly")));
  }
  const int fd =
      open(options_.jobs->ResultPath(job->id).c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  struct stat st {};
  if (fd < 0 || fstat(fd, &st) != 0 || st.st_size != info.result_bytes()) {
    if (fd >= 0) close(fd);
    --open_fetches_;
    return refuse(absl::DataLossError(
        absl::StrCat("the stored result of job ", job->id, " is missing or changed")));
  }
  metrics_.RecordRequest("FetchResult", 0, 0);
  return new FetchReactor(&open_fetches_, fd, request.offset(), info.result_bytes());
}

void AttentionServiceImpl::RunJob(const std::shared_ptr<DetachedJob>& job) {
  JobStore& store = *options_.jobs;
  const auto started = Clock::now();
  {
    std::lock_guard<std::mutex> lock(job->mu);
    job->ticket = 0;
    job->info.set_status(v1::JOB_RUNNING);
    job->info.set_started_unix_ms(UnixMs());
    job->info.set_queue_position(0);
    if (absl::Status saved = store.Save(*job); !saved.ok())
      spdlog::warn("jobs: cannot record job {}: {}", job->id, std::string(saved.message()));
  }
  Register(&job->cancel);
  int64_t result_bytes = 0;
  absl::Status status = [&]() -> absl::Status {
    if (!accepting_) return absl::UnavailableError("the server shut down before the job started");
    if (job->cancel.cancelled()) return absl::CancelledError("cancelled");
    ASSIGN_OR_RETURN(ResolvedRequest resolved,
                     ResolveRequest(job->request, *engine_, resolve_options()));
    const GenerateRequest& generate = resolved.generate.request();
    {
      std::lock_guard<std::mutex> lock(job->mu);
      job->info.set_estimated_bytes(resolved.estimated_bytes);
      job->info.set_prompt_tokens(static_cast<int32_t>(generate.prompt_ids.size()));
      job->info.set_max_new_tokens(static_cast<int32_t>(generate.max_new_tokens));
    }
    // The quota holds the estimate (and the file's metadata) while the job runs.
    RETURN_IF_ERROR(store.Reserve(*job, resolved.estimated_bytes + (1 << 20)));
    SampleWriter writer(store.ResultPath(job->id), SampleFormat::kSafetensors);
    v1::StreamHeader header;
    FillStreamHeader(resolved, *engine_, options_.model_name, options_.chunk_bytes, job->id,
                     &header);
    RETURN_IF_ERROR(writer.OnHeader(header, generate.max_new_tokens));
    JobSink sink(*engine_, options_.chunk_bytes, &writer, job.get());
    ASSIGN_OR_RETURN(GenerateResult result,
                     engine_->Generate(resolved.generate, &sink, &job->cancel));
    metrics_.tokens_generated += static_cast<int64_t>(result.tokens.size());
    metrics_.decode_steps += result.decode_steps;
    if (result.finish == FinishReason::kCancelled) return absl::CancelledError("cancelled");
    v1::StreamTrailer trailer;
    FillStreamTrailer(result, *engine_, generate.prompt_ids.size(), 0, job->bytes.load(), &trailer);
    RETURN_IF_ERROR(writer.Finish(trailer, PromptText(job->request)));
    struct stat st {};
    if (stat(store.ResultPath(job->id).c_str(), &st) != 0)
      return absl::DataLossError("the result vanished as it was stored");
    result_bytes = st.st_size;
    return absl::OkStatus();
  }();
  Unregister(&job->cancel);
  v1::JobStatus end = v1::JOB_COMPLETED;
  if (!status.ok()) {
    bool asked = false;
    {
      std::lock_guard<std::mutex> lock(job->mu);
      asked = job->cancel_requested;
    }
    if (absl::IsCancelled(status) || job->cancel.cancelled()) {
      end = asked ? v1::JOB_CANCELLED : v1::JOB_FAILED;
      status = asked ? absl::CancelledError("cancelled by CancelJob")
                     : absl::UnavailableError("the server shut down while the job ran");
    } else {
      end = v1::JOB_FAILED;
    }
  }
  store.Finish(*job, end, status, result_bytes);
  spdlog::info("job {} tokens={} bytes={} status={} ms={:.1f}", job->id, job->tokens.load(),
               result_bytes, v1::JobStatus_Name(end), MsBetween(started, Clock::now()));
}

}  // namespace attnscope
