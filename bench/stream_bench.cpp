// Streaming throughput of a full dense capture, server -> client over loopback gRPC, against the
// engine alone (same capture, counting sink) and a plain memcpy of the same bytes, with a sweep of
// chunk sizes. All in one process and one run:
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
#include "model/engine.h"
#include "server/service.h"

ABSL_FLAG(std::string, model_dir, "", "checkpoint folder");
ABSL_FLAG(int64_t, prompt, 1024, "prompt tokens");
ABSL_FLAG(int64_t, new_tokens, 8, "generated tokens");

namespace attnscope {
namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
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
  sink.bytes = 0;
  auto t0 = Clock::now();
  (*engine)->Generate(g, dense, &sink, nullptr).IgnoreError();
  const double engine_s = Seconds(t0);
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
  for (int64_t chunk : {64 << 10, 256 << 10, 1 << 20, 4 << 20}) {
    ServiceOptions so;
    so.chunk_bytes = chunk;
    AttentionServiceImpl service(engine->get(), so);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service);
    builder.SetMaxSendMessageSize(static_cast<int>(chunk * 2 + (1 << 20)));
    auto server = builder.BuildAndStart();
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    auto channel = grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(port),
                                             grpc::InsecureChannelCredentials(), args);
    auto stub = v1::AttentionService::NewStub(channel);
    grpc::ClientContext ctx;
    t0 = Clock::now();
    auto reader = stub->StreamAttention(&ctx, request);
    v1::StreamAttentionResponse msg;
    int64_t received = 0;
    while (reader->Read(&msg)) {
      if (msg.has_attention()) received += msg.attention().data().size();
    }
    grpc::Status st = reader->Finish();
    const double s = Seconds(t0);
    if (!st.ok() || received != bytes) {
      std::fprintf(stderr, "stream failed: %s (%ld of %ld bytes)\n", st.error_message().c_str(),
                   (long)received, (long)bytes);
      return 1;
    }
    std::printf("| gRPC stream (engine + transport) | %ld KiB | %.3f | %.3f | %.2f |\n",
                (long)(chunk >> 10), s, bytes / s / 1e9, engine_s / s);
    server->Shutdown();
  }
  return 0;
}

}  // namespace
}  // namespace attnscope

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return attnscope::Main();
}
