// Streaming throughput of a full dense capture, server -> client over loopback gRPC, against the
// engine alone (same capture, counting sink: blocks materialized, and written into a reused buffer
// as for the shared ring) and a plain memcpy of the same bytes, with a sweep of
// chunk sizes; then the same stream with same-host shared-memory output. Every client path reads
// each byte it receives once (and the shared path must deliver the wire's bytes); engine and
// streams are the best of two runs. All in one process and one run:
//   bench/attnscope-bench-stream --model_dir DIR [--prompt 1024] [--new_tokens 8]
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "attnscope/v1/attnscope.grpc.pb.h"
#include "bench/counting_sink.h"
#include "cli/host_memory.h"
#include "engine/engine.h"
#include "server/service.h"
#include "shm/shared_ring.h"

ABSL_FLAG(std::string, model_dir, "", "checkpoint folder");
ABSL_FLAG(int64_t, prompt, 1024, "prompt tokens");
ABSL_FLAG(int64_t, new_tokens, 8, "generated tokens");
ABSL_FLAG(int64_t, host_memory_retain_bytes, attnscope::kDefaultRetainedHostBytes,
          "as the server's flag (0: glibc's defaults)");
ABSL_FLAG(bool, wire, true, "run the gRPC rows (false: engine and shared memory only, to profile)");

namespace attnscope {
namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// What every client path does with the bytes it receives here: reads each once (an XOR of 64-bit
// words), which also proves the shared-memory path delivers the wire's bytes.
uint64_t Fold(const char* p, size_t n, uint64_t acc) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    acc ^= w;
  }
  for (; i < n; ++i)
    acc ^= static_cast<uint64_t>(static_cast<unsigned char>(p[i])) << (8 * (i % 8));
  return acc;
}

// One configuration: a loopback server over `engine`, the request streamed twice (the first lap
// also faults the ring's pages in), every received byte read once. `ring` null: the wire.
struct Measured {
  double seconds = 1e30;  // best of two
  int64_t received = 0;
  uint64_t fold = 0;
  bool shared = false;
};
absl::StatusOr<Measured> Measure(const Engine* engine, const ServiceOptions& so,
                                 v1::GenerateRequest request, shared_ring::Reader* ring) {
  AttentionServiceImpl service(engine, so);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  builder.SetMaxSendMessageSize(static_cast<int>(so.chunk_bytes * 2 + (1 << 20)));
  auto server = builder.BuildAndStart();
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  auto stub = v1::AttentionService::NewStub(grpc::CreateCustomChannel(
      "127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials(), args));
  if (ring != nullptr) {
    request.mutable_shared_output()->set_name(ring->name());
    request.mutable_shared_output()->set_capacity(ring->capacity());
    request.mutable_shared_output()->set_key(ring->key());
  }
  Measured m;
  for (int rep = 0; rep < 2; ++rep) {
    grpc::ClientContext ctx;
    const auto t0 = Clock::now();
    auto reader = stub->StreamAttention(&ctx, request);
    v1::StreamAttentionResponse msg;
    m.received = 0;
    m.fold = 0;
    while (reader->Read(&msg)) {
      if (msg.has_header()) m.shared = msg.header().shared_output();
      if (!msg.has_attention()) continue;
      const auto& c = msg.attention();
      absl::string_view values = c.data();
      if (m.shared) {
        const int64_t n = c.shared_bytes() + c.shared_index_bytes();
        auto piece = ring->View(c.shared_position(), n);
        if (!piece.ok()) return piece.status();
        values = piece->substr(0, c.shared_bytes());
        m.fold = Fold(values.data(), values.size(), m.fold);
        ring->Release(c.shared_position() + n).IgnoreError();
      } else {
        m.fold = Fold(values.data(), values.size(), m.fold);
      }
      m.received += static_cast<int64_t>(values.size());
    }
    grpc::Status st = reader->Finish();
    if (!st.ok()) return absl::InternalError(st.error_message());
    m.seconds = std::min(m.seconds, Seconds(t0));
  }
  server->Shutdown();
  return m;
}

int Main() {
  EngineOptions eo;
  eo.model_dir = absl::GetFlag(FLAGS_model_dir);
  auto engine = Engine::Load(eo);
  if (!engine.ok()) {
    std::fprintf(stderr, "%s\n", engine.status().ToString().c_str());
    return 1;
  }
  const int64_t prompt = absl::GetFlag(FLAGS_prompt);
  v1::GenerateRequest request;
  for (int64_t i = 0; i < prompt; ++i)
    request.mutable_token_ids()->add_ids((i * 7919 + 13) % (*engine)->info().vocab_size);
  request.set_max_new_tokens(static_cast<int32_t>(absl::GetFlag(FLAGS_new_tokens)));
  request.set_ignore_eos(true);
  request.mutable_capture()->set_form(v1::FORM_DENSE);

  // Engine alone.
  GenerateRequest g;
  g.prompt_ids.assign(request.token_ids().ids().begin(), request.token_ids().ids().end());
  g.max_new_tokens = request.max_new_tokens();
  g.ignore_eos = true;
  CaptureSpec dense;
  dense.form = Form::kDense;
  CountingSink sink;
  (*engine)->Generate(g, dense, &sink, nullptr).IgnoreError();  // warm-up
  // The engine alone again, its dense blocks written piece by piece into one reused 4 MiB buffer
  // instead of materialized (what it does for the shared ring, less the ring). The two
  // alternate, best of three each.
  CountingSink placing(4 << 20);
  double engine_s = 1e30, placed_s = 1e30;
  auto t0 = Clock::now();
  for (int rep = 0; rep < 3; ++rep) {
    sink.bytes = 0;
    t0 = Clock::now();
    (*engine)->Generate(g, dense, &sink, nullptr).IgnoreError();
    engine_s = std::min(engine_s, Seconds(t0));
    t0 = Clock::now();
    (*engine)->Generate(g, dense, &placing, nullptr).IgnoreError();
    placed_s = std::min(placed_s, Seconds(t0));
  }
  const int64_t bytes = sink.bytes;

  // memcpy of the same bytes, in 1 MiB pieces from a source larger than the caches.
  std::vector<char> src(bytes), dst(1 << 20);
  std::memset(src.data(), 1, src.size());
  t0 = Clock::now();
  for (int64_t off = 0; off < bytes; off += dst.size()) {
    std::memcpy(dst.data(), src.data() + off, std::min<int64_t>(dst.size(), bytes - off));
  }
  const double memcpy_s = Seconds(t0);

  std::printf("dense capture of %.1f MB (prompt %ld, %d new tokens, %ld layers x %ld heads)\n\n",
              bytes / 1e6, (long)prompt, request.max_new_tokens(),
              (long)(*engine)->info().num_layers, (long)(*engine)->info().num_heads);
  std::printf(
      "| path | chunk | seconds | GB/s | vs engine alone |\n| --- | ---: | ---: | ---: | ---: |\n");
  std::printf("| memcpy | 1 MiB | %.4f | %.2f | |\n", memcpy_s, bytes / memcpy_s / 1e9);
  std::printf("| engine alone (no transport) | - | %.3f | %.3f | 1.00 |\n", engine_s,
              bytes / engine_s / 1e9);
  std::printf(
      "| engine alone, blocks written into a reused buffer | 4 MiB | %.3f | %.3f | %.2f |\n",
      placed_s, bytes / placed_s / 1e9, engine_s / placed_s);
  uint64_t wire_fold = 0;
  for (int64_t chunk : {64 << 10, 256 << 10, 1 << 20, 4 << 20}) {
    if (!absl::GetFlag(FLAGS_wire)) break;
    ServiceOptions so;
    so.chunk_bytes = chunk;
    auto m = Measure(engine->get(), so, request, nullptr);
    if (!m.ok() || m->received != bytes) {
      std::fprintf(stderr, "stream failed: %s\n",
                   m.ok() ? "bytes missing" : m.status().ToString().c_str());
      return 1;
    }
    wire_fold = m->fold;
    std::printf("| gRPC stream (engine + transport) | %ld KiB | %.3f | %.3f | %.2f |\n",
                (long)(chunk >> 10), m->seconds, bytes / m->seconds / 1e9, engine_s / m->seconds);
  }

  // Shared-memory output: descriptors on the stream, values through the ring.
  const std::pair<int64_t, int64_t> rings[] = {
      {4 << 20, 1 << 20}, {8 << 20, 2 << 20}, {16 << 20, 4 << 20}, {64 << 20, 4 << 20}};
  for (const auto& [ring_bytes, piece_bytes] : rings) {
    ServiceOptions so;
    so.shared_chunk_bytes = piece_bytes;
    auto ring = shared_ring::Reader::Create(ring_bytes);
    if (!ring.ok()) {
      std::fprintf(stderr, "%s\n", ring.status().ToString().c_str());
      return 1;
    }
    auto m = Measure(engine->get(), so, request, ring->get());
    if (!m.ok() || !m->shared || m->received != bytes ||
        (absl::GetFlag(FLAGS_wire) && m->fold != wire_fold)) {
      std::fprintf(stderr, "shared stream failed: %s\n",
                   !m.ok()                ? m.status().ToString().c_str()
                   : !m->shared           ? "the server did not use the ring"
                   : m->fold != wire_fold ? "NOT the wire's bytes"
                                          : "bytes missing");
      return 1;
    }
    std::printf(
        "| shared memory (engine + ring) | %ld MiB pieces, %ld MiB ring | %.3f | %.3f | %.2f |\n",
        (long)(piece_bytes >> 20), (long)(ring_bytes >> 20), m->seconds, bytes / m->seconds / 1e9,
        engine_s / m->seconds);
  }
  return 0;
}

}  // namespace
}  // namespace attnscope

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  attnscope::RetainFreedHostMemory(absl::GetFlag(FLAGS_host_memory_retain_bytes));
  return attnscope::Main();
}
