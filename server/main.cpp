// attnscope-server: serves one resident model over gRPC.
#include <signal.h>

#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include <httplib.h>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/grpcpp.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "model/engine.h"
#include "model/status_macros.h"
#include "server/service.h"

ABSL_FLAG(std::string, model_dir, "", "Hugging Face checkpoint folder to serve");
ABSL_FLAG(std::string, model, "", "model name to look up in --models (the prototype's names)");
ABSL_FLAG(std::string, models, "", "model registry JSON: {name: {\"path\": DIR, \"max_length\": N}}");
ABSL_FLAG(std::string, listen, "127.0.0.1:50051", "address to listen on");
ABSL_FLAG(std::string, device, "cpu", "cpu, cuda or cuda:N");
ABSL_FLAG(std::string, dtype, "", "float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)");
ABSL_FLAG(int, max_concurrent, 1, "generations running at once");
ABSL_FLAG(int, max_queue, 16, "generations waiting; beyond: RESOURCE_EXHAUSTED");
ABSL_FLAG(int64_t, chunk_bytes, 1 << 20, "attention payload bytes per streamed message");
ABSL_FLAG(int64_t, max_capture_bytes, int64_t{64} << 30, "capture byte budget per request (0: none)");
ABSL_FLAG(int64_t, query_block, 128, "attention rows materialized at once for captured layers");
ABSL_FLAG(int64_t, block_elements, int64_t{1} << 24,
          "at most this many attention probabilities materialized at once (memory per captured layer)");
ABSL_FLAG(std::string, auth_tokens_file, "", "file with one accepted bearer token per line");
ABSL_FLAG(std::string, tls_cert, "", "PEM certificate chain (TLS on when set with --tls_key)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key");
ABSL_FLAG(std::string, metrics_listen, "", "HOST:PORT for Prometheus metrics over HTTP (/metrics); empty: off");
ABSL_FLAG(bool, insecure, false, "allow a non-loopback address without auth tokens");

namespace attnscope {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool IsLoopback(const std::string& address) {
  return address.rfind("127.", 0) == 0 || address.rfind("localhost:", 0) == 0 || address.rfind("[::1]:", 0) == 0 ||
         address.rfind("unix:", 0) == 0;
}

absl::Status Serve() {
  std::string model_dir = absl::GetFlag(FLAGS_model_dir);
  std::string name = absl::GetFlag(FLAGS_model);
  if (!name.empty()) {
    if (absl::GetFlag(FLAGS_models).empty()) {
      return absl::InvalidArgumentError("--model NAME needs --models REGISTRY.json (see deploy/models.example.json)");
    }
    ASSIGN_OR_RETURN(std::string text, ReadFile(absl::GetFlag(FLAGS_models)));
    auto registry = nlohmann::json::parse(text, nullptr, false);
    if (registry.is_discarded() || !registry.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(absl::GetFlag(FLAGS_models), " is not a JSON object"));
    }
    if (!registry.contains(name) || !registry[name].contains("path")) {
      return absl::NotFoundError(absl::StrCat("model '", name, "' is not in ", absl::GetFlag(FLAGS_models)));
    }
    model_dir = registry[name]["path"].get<std::string>();
  }
  if (model_dir.empty()) return absl::InvalidArgumentError("give --model_dir DIR, or --model NAME with --models");
  if (name.empty()) name = model_dir.substr(model_dir.find_last_of('/') + 1);

  ServiceOptions options;
  options.model_name = name;
  options.chunk_bytes = absl::GetFlag(FLAGS_chunk_bytes);
  options.max_capture_bytes = absl::GetFlag(FLAGS_max_capture_bytes);
  options.scheduler.max_concurrent = absl::GetFlag(FLAGS_max_concurrent);
  options.scheduler.max_queue = absl::GetFlag(FLAGS_max_queue);
  if (options.chunk_bytes < 1024 || options.chunk_bytes > (64 << 20)) {
    return absl::InvalidArgumentError("--chunk_bytes must be in [1024, 64 MiB]");
  }
  if (options.scheduler.max_concurrent < 1 || options.scheduler.max_queue < 0) {
    return absl::InvalidArgumentError("--max_concurrent must be >= 1 and --max_queue >= 0");
  }
  if (const std::string f = absl::GetFlag(FLAGS_auth_tokens_file); !f.empty()) {
    ASSIGN_OR_RETURN(std::string text, ReadFile(f));
    std::istringstream lines(text);
    for (std::string line; std::getline(lines, line);) {
      while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
      if (!line.empty() && line[0] != '#') options.auth_tokens.insert(line);
    }
    if (options.auth_tokens.empty()) return absl::InvalidArgumentError(absl::StrCat(f, " holds no token"));
  }
  const std::string listen = absl::GetFlag(FLAGS_listen);
  if (!IsLoopback(listen) && options.auth_tokens.empty() && !absl::GetFlag(FLAGS_insecure)) {
    return absl::FailedPreconditionError(absl::StrCat("refusing to listen on ", listen,
                                                      " without --auth_tokens_file; pass --insecure to do it anyway"));
  }

  EngineOptions engine_options;
  engine_options.model_dir = model_dir;
  engine_options.device = absl::GetFlag(FLAGS_device);
  engine_options.dtype = absl::GetFlag(FLAGS_dtype);
  engine_options.query_block = absl::GetFlag(FLAGS_query_block);
  engine_options.block_elements = absl::GetFlag(FLAGS_block_elements);
  spdlog::info("loading {} on {}", model_dir, engine_options.device);
  ASSIGN_OR_RETURN(auto engine, Engine::Load(engine_options));

  // Signals are handled by a thread of their own (sigwait), not in a handler.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  AttentionServiceImpl service(engine.get(), options);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  if (!absl::GetFlag(FLAGS_tls_cert).empty() || !absl::GetFlag(FLAGS_tls_key).empty()) {
    grpc::SslServerCredentialsOptions ssl;
    ASSIGN_OR_RETURN(std::string cert, ReadFile(absl::GetFlag(FLAGS_tls_cert)));
    ASSIGN_OR_RETURN(std::string key, ReadFile(absl::GetFlag(FLAGS_tls_key)));
    ssl.pem_key_cert_pairs.push_back({key, cert});
    creds = grpc::SslServerCredentials(ssl);
  }
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, creds, &port);
  builder.RegisterService(&service);
  // Streams chunk their payload (chunk_bytes); Generate answers statistics in one message, which at
  // long context can be tens of MB: allow that much.
  builder.SetMaxSendMessageSize(512 << 20);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) return absl::UnavailableError(absl::StrCat("cannot listen on ", listen));
  server->GetHealthCheckService()->SetServingStatus(true);

  httplib::Server metrics_http;
  std::thread metrics_thread;
  if (const std::string m = absl::GetFlag(FLAGS_metrics_listen); !m.empty()) {
    const auto colon = m.find_last_of(':');
    int metrics_port = 0;
    if (colon == std::string::npos || !absl::SimpleAtoi(m.substr(colon + 1), &metrics_port)) {
      return absl::InvalidArgumentError(absl::StrCat("--metrics_listen '", m, "' is not HOST:PORT"));
    }
    metrics_http.Get("/metrics", [&service](const httplib::Request&, httplib::Response& res) {
      res.set_content(service.metrics().Render(service.scheduler().queued(), service.scheduler().running()),
                      "text/plain; version=0.0.4");
    });
    if (!metrics_http.bind_to_port(m.substr(0, colon), metrics_port)) {
      return absl::UnavailableError(absl::StrCat("cannot listen on ", m, " for metrics"));
    }
    metrics_thread = std::thread([&metrics_http] { metrics_http.listen_after_bind(); });
    spdlog::info("metrics on http://{}/metrics", m);
  }
  spdlog::info("attnscope-server serving '{}' ({}) on {}", name, engine->info().architecture, listen);
  std::cout << "listening on " << listen << std::endl;

  int sig = 0;
  sigwait(&signals, &sig);
  spdlog::info("signal {}: stopping", sig);
  server->GetHealthCheckService()->SetServingStatus(false);
  service.StopAccepting();
  // In-flight calls get a moment to end; then they are cancelled (their streams end with a status).
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  server->Wait();
  if (metrics_thread.joinable()) {
    metrics_http.stop();
    metrics_thread.join();
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace attnscope

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  absl::Status status = attnscope::Serve();
  if (!status.ok()) {
    std::cerr << "attnscope-server: " << status << std::endl;
    return 1;
  }
  return 0;
}
