#include "server/metrics.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace attnscope {
namespace {

// Latency bucket upper bounds, seconds.
constexpr double kBuckets[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                               2.5,   5,    10,    30,   60,  120,  300};
constexpr int kNumBuckets = sizeof(kBuckets) / sizeof(kBuckets[0]);

}  // namespace

void Metrics::RecordRequest(const std::string& method, int code, double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  ++requests_[{method, code}];
  Histogram& h = latency_[method];
  if (h.counts.empty()) h.counts.assign(kNumBuckets, 0);
  for (int i = 0; i < kNumBuckets; ++i) {
    if (seconds <= kBuckets[i]) {
      ++h.counts[i];
      break;
    }
  }
  h.sum += seconds;
  ++h.count;
}

void Metrics::UpdateQueueHighWater(int64_t depth) {
  int64_t seen = stream_queue_high_water.load();
  while (depth > seen && !stream_queue_high_water.compare_exchange_weak(seen, depth)) {
  }
}

std::string Metrics::Render(int queued, int running) const {
  std::string out;
  auto gauge = [&](const char* name, const char* help, const char* type, int64_t value) {
    absl::StrAppend(&out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n", name, " ",
                    value, "\n");
  };
  gauge("attnscope_queue_depth", "Generations waiting for an engine thread.", "gauge", queued);
  gauge("attnscope_running_generations", "Generations running now.", "gauge", running);
  gauge("attnscope_tokens_generated_total", "Tokens generated.", "counter",
        tokens_generated.load());
  gauge("attnscope_decode_steps_total", "Decode forward passes.", "counter", decode_steps.load());
  gauge("attnscope_attention_bytes_total", "Attention payload bytes streamed.", "counter",
        attention_bytes.load());
  gauge("attnscope_rejected_busy_total",
        "Requests refused because every slot and queue place was taken.", "counter",
        rejected_busy.load());
  gauge("attnscope_withdrawn_total",
        "Queued requests whose client left before they ran (their place was freed).", "counter",
        withdrawn.load());
  gauge("attnscope_stalled_streams_total",
        "Streams stopped because the client took no message for the stall timeout.", "counter",
        stalled_streams.load());
  gauge("attnscope_shared_streams_total",
        "Streams whose attention values went through the client's shared-memory region.", "counter",
        shared_streams.load());
  gauge("attnscope_shared_refused_total",
        "Streams that asked for shared-memory output and fell back to the wire.", "counter",
        shared_refused.load());
  gauge("attnscope_shared_bytes_total", "Attention bytes written to shared-memory regions.",
        "counter", shared_bytes.load());
  gauge("attnscope_stream_queue_high_water",
        "Most messages ever waiting in one stream's outgoing queue.", "gauge",
        stream_queue_high_water.load());
  std::lock_guard<std::mutex> lock(mu_);
  absl::StrAppend(
      &out, "# HELP attnscope_requests_total Finished calls by method and gRPC status code.\n",
      "# TYPE attnscope_requests_total counter\n");
  for (const auto& [key, n] : requests_) {
    absl::StrAppend(&out, "attnscope_requests_total{method=\"", key.first, "\",code=\"", key.second,
                    "\"} ", n, "\n");
  }
  absl::StrAppend(&out, "# HELP attnscope_request_seconds Call latency by method.\n",
                  "# TYPE attnscope_request_seconds histogram\n");
  for (const auto& [method, h] : latency_) {
    int64_t cumulative = 0;
    for (int i = 0; i < kNumBuckets; ++i) {
      cumulative += h.counts[i];
      absl::StrAppend(&out, "attnscope_request_seconds_bucket{method=\"", method, "\",le=\"",
                      absl::StrFormat("%g", kBuckets[i]), "\"} ", cumulative, "\n");
    }
    absl::StrAppend(&out, "attnscope_request_seconds_bucket{method=\"", method, "\",le=\"+Inf\"} ",
                    h.count, "\n");
    absl::StrAppend(&out, "attnscope_request_seconds_sum{method=\"", method, "\"} ",
                    absl::StrFormat("%.6f", h.sum), "\n");
    absl::StrAppend(&out, "attnscope_request_seconds_count{method=\"", method, "\"} ", h.count,
                    "\n");
  }
  return out;
}

}  // namespace attnscope
