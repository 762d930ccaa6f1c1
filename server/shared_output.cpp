#include "server/shared_output.h"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/status_macros.h"

namespace attnscope {
namespace {

// What a client hears when its shared region cannot be used (the details go to the server log).
constexpr absl::string_view kSharedRegionRefused =
    "the shared-memory region could not be used by this server (a client on another host or in "
    "another IPC namespace, or a region that is not the caller's: its name, size, header or key "
    "did not check out); the values come on the wire";

}  // namespace

absl::Status SharedOutput::Attach(const v1::SharedOutput& request, Clock::time_point job_started,
                                  v1::StreamHeader* header) {
  job_started_ = job_started;
  auto ring = shared_ring::Writer::Open(request.name(), request.capacity(), request.key(),
                                        options_.max_shared_bytes);
  if (ring.ok()) {
    ring_ = std::move(*ring);
    header->set_shared_output(true);
    ++metrics_->shared_streams;
    return absl::OkStatus();
  }
  if (absl::IsInvalidArgument(ring.status())) return ring.status();
  ++metrics_->shared_refused;
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

int64_t SharedOutput::piece_bytes() const {
  return std::min(std::max(options_.shared_chunk_bytes, options_.chunk_bytes),
                  ring_->capacity() / 4);
}

absl::Status SharedOutput::Place(const ChunkPiece& piece, v1::AttentionChunk* chunk) {
  const auto keep_waiting = [this](double idle_s) { return WaitForRoom(idle_s); };
  const auto put_started = Clock::now();
  // Dense values come as `fill`: the engine writes them straight into the ring.
  ASSIGN_OR_RETURN(
      const int64_t position,
      piece.fill ? ring_->Place(
                       piece.value_bytes, [&piece](char* dst) { piece.fill(dst); }, keep_waiting)
                 : ring_->Put(piece.values, piece.indices, keep_waiting));
  RETURN_IF_ERROR(CountClientWait(put_started));
  chunk->set_shared_position(position);
  chunk->set_shared_bytes(piece.value_bytes);
  chunk->set_shared_index_bytes(static_cast<int64_t>(piece.indices.size()));
  metrics_->shared_bytes += piece.value_bytes + static_cast<int64_t>(piece.indices.size());
  return absl::OkStatus();
}

absl::Status SharedOutput::WaitForRoom(double idle_s) const {
  if (stream_.cancelled())
    return absl::CancelledError("the client cancelled the stream or disconnected");
  if (idle_s <= options_.stall_timeout_s) return absl::OkStatus();
  ++metrics_->stalled_streams;
  spdlog::warn(
      "StreamAttention peer={}: the client read nothing from its shared region for {} s; "
      "stopping the stream and freeing its slot",
      stream_.peer(), options_.stall_timeout_s);
  return absl::DeadlineExceededError(
      absl::StrCat("the client read nothing from its shared region for ", options_.stall_timeout_s,
                   " s (--stall_timeout_s); the stream was stopped"));
}

absl::Status SharedOutput::CountClientWait(Clock::time_point since) {
  const auto now = Clock::now();
  waited_s_ += MsBetween(since, now) / 1e3;
  const double elapsed_s = MsBetween(job_started_, now) / 1e3;
  const double stall_s = options_.stall_timeout_s;
  if (waited_s_ <= stall_s || waited_s_ <= 0.5 * elapsed_s || !stream_.others_queued()) {
    return absl::OkStatus();
  }
  ++metrics_->stalled_streams;
  spdlog::warn(
      "StreamAttention peer={}: waited {:.1f} s of {:.1f} s for its client while others queue; "
      "stopping the stream and freeing its slot",
      stream_.peer(), waited_s_, elapsed_s);
  return absl::DeadlineExceededError(absl::StrFormat(
      "the stream spent %.1f s of its %.1f s waiting for the client to read, while other "
      "requests waited for a slot; it was stopped (read faster, or capture less)",
      waited_s_, elapsed_s));
}

}  // namespace attnscope
