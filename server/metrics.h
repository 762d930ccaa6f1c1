// Service metrics in Prometheus text format: requests by method and status, latency histograms,
// tokens, attention bytes, queue depth.
#pragma once

#include <atomic>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace attnscope {

class Metrics {
 public:
  // One finished call: its method, gRPC status code and duration.
  void RecordRequest(const std::string& method, int code, double seconds);
  // Largest number of messages waiting in one stream's outgoing queue.
  void UpdateQueueHighWater(int64_t depth);

  // Prometheus exposition text; `queued` and `running` come from the scheduler.
  std::string Render(int queued, int running) const;

  std::atomic<int64_t> tokens_generated{0};
  std::atomic<int64_t> attention_bytes{0};
  std::atomic<int64_t> decode_steps{0};
  std::atomic<int64_t> rejected_busy{0};
  std::atomic<int64_t> withdrawn{0};        // queued requests whose client left before they ran
  std::atomic<int64_t> stalled_streams{0};  // streams stopped because the client stopped reading
  std::atomic<int64_t> stream_queue_high_water{0};
  std::atomic<int64_t> shared_streams{0};  // streams whose attention went through a shared region
  std::atomic<int64_t> shared_refused{0};  // streams that asked for one and fell back to the wire
  std::atomic<int64_t> shared_bytes{0};    // attention bytes written to shared regions

 private:
  struct Histogram {
    std::vector<int64_t> counts;  // per bucket (cumulative when rendered)
    double sum = 0;
    int64_t count = 0;
  };
  mutable std::mutex mu_;
  std::map<std::pair<std::string, int>, int64_t> requests_;
  std::map<std::string, Histogram> latency_;
};

}  // namespace attnscope
