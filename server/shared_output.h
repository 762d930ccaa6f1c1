// A stream's same-host output: the client's shared-memory ring (shm/shared_ring.h), when its
// request names one that checks out. Attention values then go into the ring and the messages carry
// only where. Used by the stream reactor (stream_reactor.h), on the engine thread.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "attnscope/v1/attnscope.pb.h"
#include "server/call.h"
#include "server/convert.h"
#include "server/metrics.h"
#include "shm/shared_ring.h"

namespace attnscope {

class SharedOutput {
 public:
  struct Options {
    int64_t max_shared_bytes = 0;    // largest region a stream may name; 0: never
    int64_t shared_chunk_bytes = 0;  // attention bytes per piece (at most a quarter of the ring)
    int64_t chunk_bytes = 0;         // the wire's; pieces are never smaller
    double stall_timeout_s = 30;
  };
  // What the waits for room need from the stream.
  struct Stream {
    std::function<bool()> cancelled;      // the client left or the server stopped the stream
    std::function<bool()> others_queued;  // other requests wait for a generation slot
    std::function<std::string()> peer;    // for the log
  };

  SharedOutput(Options options, Metrics* metrics, Stream stream)
      : options_(options), metrics_(metrics), stream_(std::move(stream)) {}

  // Opens the region `request` names (from the job, which started at `job_started`): the header
  // says whether it is used or why not (the values then go on the wire). Only a malformed name or
  // key fails the call.
  absl::Status Attach(const v1::SharedOutput& request, Clock::time_point job_started,
                      v1::StreamHeader* header);
  bool used() const { return ring_ != nullptr; }
  // Dense blocks may come unmaterialized: the engine writes them straight into the mapping.
  bool mapped() const { return ring_ != nullptr && ring_->mapped(); }
  // Attention bytes per piece.
  int64_t piece_bytes() const;
  // Writes a piece into the ring, waiting while the client reads, and fills the chunk's shared_*
  // fields (a ChunkPlacer).
  absl::Status Place(const ChunkPiece& piece, v1::AttentionChunk* chunk);

 private:
  // The engine thread waits for room in the ring: the client's reading is its progress, as a
  // taken message is on the wire. Stops on cancel, shutdown, or a client that reads nothing for
  // the stall timeout.
  absl::Status WaitForRoom(double idle_s) const;
  // The idle share of a same-host stream: a reader that keeps up only just (each piece read
  // within the stall timeout, but slowly) would hold its slot as long as it likes. (On the wire, a
  // slow network is the usual reason to wait: the stall timeout alone applies there.) Once it has
  // spent more than the stall timeout in all, and most of its time, waiting for its client while
  // other requests wait for a slot, it is stopped.
  absl::Status CountClientWait(Clock::time_point since);

  const Options options_;
  Metrics* metrics_;
  const Stream stream_;
  std::unique_ptr<shared_ring::Writer> ring_;
  Clock::time_point job_started_;
  double waited_s_ = 0;  // seconds spent waiting for the client to read
};

}  // namespace attnscope
