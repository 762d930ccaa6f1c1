// attnscope-server: serves one resident model over gRPC.
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <httplib.h>
#include <signal.h>
#include <spdlog/spdlog.h>

#include <iostream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "cli/host_memory.h"
#include "cli/usage.h"
#include "core/files.h"
#include "core/status_macros.h"
#include "engine/engine.h"
#include "server/registry.h"
#include "server/service.h"

ABSL_FLAG(std::string, model_dir, "", "Hugging Face checkpoint folder to serve");
ABSL_FLAG(std::string, model, "", "model name to look up in --models (the prototype's names)");
ABSL_FLAG(std::string, models, "",
          "model registry JSON: {name: {\"path\": DIR, \"max_length\": N}}");
ABSL_FLAG(std::string, listen, "127.0.0.1:50051", "address to listen on");
ABSL_FLAG(std::string, device, attnscope::EngineOptions{}.device,
          "cpu, cuda, cuda:N, or a GPU index N (the prototype's --device 0)");
ABSL_FLAG(std::string, dtype, attnscope::EngineOptions{}.dtype,
          "compute type: float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)");
ABSL_FLAG(int, max_concurrent, attnscope::SchedulerOptions{}.max_concurrent,
          "generations running at once");
ABSL_FLAG(int, max_queue, attnscope::SchedulerOptions{}.max_queue,
          "generations waiting; beyond: RESOURCE_EXHAUSTED");
ABSL_FLAG(int64_t, chunk_bytes, attnscope::ServiceOptions{}.chunk_bytes,
          "attention payload bytes per streamed message");
ABSL_FLAG(int64_t, max_shared_bytes, attnscope::ServiceOptions{}.max_shared_bytes,
          "largest shared-memory ring a same-host client may ask the server to write attention "
          "into (its values then skip the wire); 0: never");
ABSL_FLAG(int64_t, host_memory_retain_bytes, attnscope::kDefaultRetainedHostBytes,
          "freed host memory the allocator keeps for reuse (per arena) instead of handing it back "
          "to the kernel and faulting it in again: about 15 % of a CPU capture at 4k; 0: glibc's "
          "defaults");
ABSL_FLAG(int64_t, max_capture_bytes, int64_t{64} << 30,
          "capture byte budget per request (0: none)");
ABSL_FLAG(int64_t, query_block, attnscope::EngineOptions{}.query_block,
          "attention rows materialized at once for captured layers");
ABSL_FLAG(
    int64_t, block_elements, attnscope::EngineOptions{}.block_elements,
    "at most this many attention probabilities materialized at once (memory per captured layer)");
ABSL_FLAG(std::string, decode_lookahead, attnscope::EngineOptions{}.decode_lookahead,
          "queue each greedy decode step that captures nothing before reading the token it feeds "
          "(auto: on CUDA; on, off)");
ABSL_FLAG(std::string, queued_copies, attnscope::EngineOptions{}.queued_copies,
          "queue captured blocks' host copies behind the work that computes them, handing the "
          "blocks over once copied (auto: on CUDA; on, off)");
ABSL_FLAG(std::string, warmup, attnscope::EngineOptions{}.warmup,
          "end loading with a short captured generation, so the first request does not pay for "
          "the device's libraries and kernels loading (auto: on CUDA; on, off)");
ABSL_FLAG(std::string, auth_tokens_file, "", "file with one accepted bearer token per line");
ABSL_FLAG(std::string, tls_cert, "", "PEM certificate chain (TLS on when set with --tls_key)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key");
ABSL_FLAG(std::string, metrics_listen, "",
          "HOST:PORT for Prometheus metrics over HTTP (/metrics); empty: off");
ABSL_FLAG(std::string, jobs_dir, "",
          "folder of the detached jobs' records and results (SubmitJob); empty: no jobs");
ABSL_FLAG(int64_t, jobs_token_quota_bytes, attnscope::JobOptions{}.quota_bytes_per_owner,
          "bytes of results (and running jobs' estimates) one bearer token may hold");
ABSL_FLAG(int64_t, jobs_quota_bytes, attnscope::JobOptions{}.quota_bytes,
          "bytes of results (and running jobs' estimates) the job store holds in all");
ABSL_FLAG(double, jobs_ttl_s, attnscope::JobOptions{}.ttl_s,
          "seconds a completed job's result is kept (and a finished job's record)");
ABSL_FLAG(std::string, jobs_id_prefix, "",
          "begins every job id (PREFIX-<hex>), e.g. the server's name behind a front door that "
          "routes a job's calls by it (the clients' x-attnscope-job header; deploy/gpus.py)");
ABSL_FLAG(int, jobs_per_token, attnscope::JobOptions{}.max_unfinished_per_owner,
          "unfinished (queued or running) jobs one bearer token may have");
ABSL_FLAG(bool, insecure, false,
          "allow a non-loopback address (gRPC or metrics) without auth tokens");
ABSL_FLAG(
    double, stall_timeout_s, attnscope::ServiceOptions{}.stall_timeout_s,
    "stop a stream whose client has taken no message for this many seconds, freeing its slot");
ABSL_FLAG(int64_t, max_request_bytes, 4 << 20,
          "largest request message accepted (prompts included)");

namespace attnscope {
namespace {

// Token files, registries and PEM files are small.
constexpr int64_t kMaxSmallFileBytes = 16 << 20;

bool IsLoopback(const std::string& address) {
  return address.rfind("127.", 0) == 0 || address.rfind("localhost:", 0) == 0 ||
         address.rfind("[::1]:", 0) == 0 || address.rfind("unix:", 0) == 0;
}

// HOST:PORT with PORT in [0, 65535] (0: any free port).
absl::Status SplitHostPort(const std::string& address, const char* flag, std::string* host,
                           int* port) {
  const auto colon = address.find_last_of(':');
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), port) ||
      *port < 0 || *port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " '", address, "' is not HOST:PORT with a port in 0-65535"));
  }
  *host = address.substr(0, colon);
  return absl::OkStatus();
}

// The served name and folder, from --model_dir or from --model through the registry.
absl::Status ResolveModel(std::string* name, std::string* model_dir, int64_t* max_length) {
  *model_dir = absl::GetFlag(FLAGS_model_dir);
  *name = absl::GetFlag(FLAGS_model);
  if (!name->empty()) {
    const std::string registry = absl::GetFlag(FLAGS_models);
    if (registry.empty()) {
      return absl::InvalidArgumentError(
          "--model NAME needs --models REGISTRY.json (see deploy/models.example.json)");
    }
    ASSIGN_OR_RETURN(std::string text, ReadRegularFile(registry, kMaxSmallFileBytes));
    ASSIGN_OR_RETURN(RegistryEntry entry, LookupModel(text, *name, registry));
    *model_dir = entry.path;
    *max_length = entry.max_length;  // the prototype's per-model truncation
  }
  if (model_dir->empty())
    return absl::InvalidArgumentError("give --model_dir DIR, or --model NAME with --models");
  if (name->empty()) {
    std::string dir = *model_dir;
    while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
    *name = dir.substr(dir.find_last_of('/') + 1);
    if (name->empty() || *name == "." || *name == "..") *name = "model";
  }
  return absl::OkStatus();
}

absl::StatusOr<ServiceOptions> ServiceOptionsFromFlags(const std::string& name) {
  ServiceOptions options;
  options.model_name = name;
  options.chunk_bytes = absl::GetFlag(FLAGS_chunk_bytes);
  options.max_capture_bytes = absl::GetFlag(FLAGS_max_capture_bytes);
  options.max_shared_bytes = absl::GetFlag(FLAGS_max_shared_bytes);
  if (options.max_shared_bytes < 0)
    return absl::InvalidArgumentError("--max_shared_bytes must be >= 0 (0: never)");
  options.scheduler.max_concurrent = absl::GetFlag(FLAGS_max_concurrent);
  options.scheduler.max_queue = absl::GetFlag(FLAGS_max_queue);
  options.stall_timeout_s = absl::GetFlag(FLAGS_stall_timeout_s);
  if (options.chunk_bytes < 1024 || options.chunk_bytes > (64 << 20)) {
    return absl::InvalidArgumentError("--chunk_bytes must be in [1024, 64 MiB]");
  }
  if (options.max_capture_bytes < 0)
    return absl::InvalidArgumentError("--max_capture_bytes must be >= 0 (0: none)");
  if (options.scheduler.max_concurrent < 1 ||
      options.scheduler.max_concurrent > Scheduler::kMaxConcurrent) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_concurrent must be in [1, ", Scheduler::kMaxConcurrent, "]"));
  }
  if (options.scheduler.max_queue < 0 || options.scheduler.max_queue > Scheduler::kMaxQueue) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_queue must be in [0, ", Scheduler::kMaxQueue, "]"));
  }
  if (!(options.stall_timeout_s >= 0.1 && options.stall_timeout_s <= 3600)) {
    return absl::InvalidArgumentError("--stall_timeout_s must be in [0.1, 3600]");
  }
  if (const std::string f = absl::GetFlag(FLAGS_auth_tokens_file); !f.empty()) {
    ASSIGN_OR_RETURN(std::string text, ReadRegularFile(f, kMaxSmallFileBytes));
    ASSIGN_OR_RETURN(options.auth, BearerTokens::Parse(text, f));
  }
  if (const std::string dir = absl::GetFlag(FLAGS_jobs_dir); !dir.empty()) {
    JobOptions jobs;
    jobs.dir = dir;
    jobs.quota_bytes_per_owner = absl::GetFlag(FLAGS_jobs_token_quota_bytes);
    jobs.quota_bytes = absl::GetFlag(FLAGS_jobs_quota_bytes);
    jobs.ttl_s = absl::GetFlag(FLAGS_jobs_ttl_s);
    jobs.max_unfinished_per_owner = absl::GetFlag(FLAGS_jobs_per_token);
    jobs.id_prefix = absl::GetFlag(FLAGS_jobs_id_prefix);
    if (jobs.quota_bytes_per_owner < 0 || jobs.quota_bytes < 0)
      return absl::InvalidArgumentError(
          "--jobs_token_quota_bytes and --jobs_quota_bytes must be >= 0");
    if (!(jobs.ttl_s > 0 && jobs.ttl_s <= 365 * 86400.0))
      return absl::InvalidArgumentError("--jobs_ttl_s must be in (0, 1 year]");
    if (jobs.max_unfinished_per_owner < 1 || jobs.max_unfinished_per_owner > 100000)
      return absl::InvalidArgumentError("--jobs_per_token must be in [1, 100000]");
    ASSIGN_OR_RETURN(std::unique_ptr<JobStore> store, JobStore::Open(std::move(jobs)));
    options.jobs = std::move(store);
  }
  return options;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials() {
  const std::string cert_file = absl::GetFlag(FLAGS_tls_cert),
                    key_file = absl::GetFlag(FLAGS_tls_key);
  if (cert_file.empty() && key_file.empty()) return grpc::InsecureServerCredentials();
  if (cert_file.empty() || key_file.empty())
    return absl::InvalidArgumentError("TLS needs both --tls_cert and --tls_key");
  grpc::SslServerCredentialsOptions ssl;
  ASSIGN_OR_RETURN(std::string cert, ReadRegularFile(cert_file, kMaxSmallFileBytes));
  ASSIGN_OR_RETURN(std::string key, ReadRegularFile(key_file, kMaxSmallFileBytes));
  ssl.pem_key_cert_pairs.push_back({key, cert});
  return grpc::SslServerCredentials(ssl);
}

// Prometheus text on GET /metrics; with auth tokens, the same bearer token is required.
class MetricsEndpoint {
 public:
  absl::Status Start(const std::string& address, AttentionServiceImpl* service,
                     const BearerTokens* auth) {
    std::string host;
    int port = 0;
    RETURN_IF_ERROR(SplitHostPort(address, "--metrics_listen", &host, &port));
    http_.Get("/metrics", [service, auth](const httplib::Request& req, httplib::Response& res) {
      if (!auth->empty()) {
        const std::string value = req.get_header_value("Authorization");
        const absl::string_view view(value);
        absl::Status ok = auth->Check(req.has_header("Authorization") ? &view : nullptr);
        if (!ok.ok()) {
          res.status = 401;
          res.set_content(std::string(ok.message()) + "\n", "text/plain");
          return;
        }
      }
      res.set_content(
          service->metrics().Render(service->scheduler().queued(), service->scheduler().running()),
          "text/plain; version=0.0.4");
    });
    const int bound =
        port == 0 ? http_.bind_to_any_port(host) : (http_.bind_to_port(host, port) ? port : -1);
    if (bound <= 0)
      return absl::UnavailableError(absl::StrCat("cannot listen on ", address, " for metrics"));
    thread_ = std::thread([this] { http_.listen_after_bind(); });
    spdlog::info("metrics on http://{}:{}/metrics", host, bound);
    return absl::OkStatus();
  }
  ~MetricsEndpoint() {
    if (thread_.joinable()) {
      http_.stop();
      thread_.join();
    }
  }

 private:
  httplib::Server http_;
  std::thread thread_;
};

// Non-loopback addresses need bearer tokens, or --insecure said out loud.
absl::Status CheckListenPolicy(const ServiceOptions& options) {
  for (const std::string& address :
       {absl::GetFlag(FLAGS_listen), absl::GetFlag(FLAGS_metrics_listen)}) {
    if (!address.empty() && !IsLoopback(address) && options.auth.empty() &&
        !absl::GetFlag(FLAGS_insecure)) {
      return absl::FailedPreconditionError(
          absl::StrCat("refusing to listen on ", address,
                       " without --auth_tokens_file; pass --insecure to do it anyway"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<EngineOptions> EngineOptionsFromFlags(const std::string& model_dir) {
  EngineOptions o;
  o.model_dir = model_dir;
  o.device = absl::GetFlag(FLAGS_device);
  o.dtype = absl::GetFlag(FLAGS_dtype);
  o.query_block = absl::GetFlag(FLAGS_query_block);
  o.block_elements = absl::GetFlag(FLAGS_block_elements);
  o.decode_lookahead = absl::GetFlag(FLAGS_decode_lookahead);
  o.queued_copies = absl::GetFlag(FLAGS_queued_copies);
  o.warmup = absl::GetFlag(FLAGS_warmup);
  if (o.query_block < 1 || o.block_elements < 1) {
    return absl::InvalidArgumentError("--query_block and --block_elements must be >= 1");
  }
  return o;
}

// The gRPC server on --listen with health, reflection and the service; `*bound` is the address
// it listens on (the port filled in when 0 was asked for).
absl::StatusOr<std::unique_ptr<grpc::Server>> StartServer(AttentionServiceImpl* service,
                                                          std::string* bound) {
  const std::string listen = absl::GetFlag(FLAGS_listen);
  const int64_t max_request_bytes = absl::GetFlag(FLAGS_max_request_bytes);
  if (max_request_bytes < 1024 || max_request_bytes > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError("--max_request_bytes must be in [1 KiB, 1 GiB]");
  }
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> creds, ServerCredentials());
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, creds, &port);
  builder.RegisterService(service);
  builder.SetMaxReceiveMessageSize(static_cast<int>(max_request_bytes));
  // Streams chunk their payload (chunk_bytes); Generate answers statistics in one message, which at
  // long context can be tens of MB: allow that much.
  builder.SetMaxSendMessageSize(512 << 20);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0)
    return absl::UnavailableError(absl::StrCat("cannot listen on ", listen));
  // NOT_SERVING until every listener is bound (Serve says SERVING).
  server->GetHealthCheckService()->SetServingStatus(false);
  *bound = listen.rfind("unix:", 0) == 0
               ? listen
               : absl::StrCat(listen.substr(0, listen.find_last_of(':')), ":", port);
  return server;
}

absl::Status Serve() {
  std::string name, model_dir;
  int64_t registry_max_length = 0;
  RETURN_IF_ERROR(ResolveModel(&name, &model_dir, &registry_max_length));
  ASSIGN_OR_RETURN(ServiceOptions options, ServiceOptionsFromFlags(name));
  options.default_max_length = registry_max_length;
  if (registry_max_length > 0)
    spdlog::info("prompts without max_length are truncated in the middle to {} tokens (registry)",
                 registry_max_length);
  RETURN_IF_ERROR(CheckListenPolicy(options));
  ASSIGN_OR_RETURN(EngineOptions engine_options, EngineOptionsFromFlags(model_dir));
  spdlog::info("loading {} on {}", model_dir, engine_options.device);
  ASSIGN_OR_RETURN(auto engine, Engine::Load(engine_options));

  // Signals are handled by a thread of their own (sigwait), not in a handler.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  AttentionServiceImpl service(engine.get(), options);
  std::string bound;
  ASSIGN_OR_RETURN(std::unique_ptr<grpc::Server> server, StartServer(&service, &bound));
  MetricsEndpoint metrics;
  if (const std::string m = absl::GetFlag(FLAGS_metrics_listen); !m.empty())
    RETURN_IF_ERROR(metrics.Start(m, &service, &options.auth));
  const ModelInfo& info = engine->info();
  if (!info.chat_template_source.empty()) {
    if (info.chat_template_error.empty()) {
      spdlog::info("chat template from {}", info.chat_template_source);
    } else {
      spdlog::warn("the chat template does not render here; chat requests will fail: {}",
                   info.chat_template_error);
    }
  }
  // Ready means ready: health says SERVING, and "listening on" is printed, only once every
  // listener asked for (gRPC, metrics) is bound.
  server->GetHealthCheckService()->SetServingStatus(true);
  spdlog::info("attnscope-server serving '{}' ({}) on {}", name, info.model_type, bound);
  std::cout << "listening on " << bound << std::endl;

  int sig = 0;
  sigwait(&signals, &sig);
  spdlog::info("signal {}: stopping", sig);
  server->GetHealthCheckService()->SetServingStatus(false);
  service.StopAccepting();
  // In-flight calls get a moment to end; then they are cancelled (their streams end with a status).
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  server->Wait();
  return absl::OkStatus();
}

}  // namespace
}  // namespace attnscope

int main(int argc, char** argv) {
  attnscope::SetUsage(
      "attnscope-server",
      "serves one resident Llama-family model over gRPC with exact attention capture",
      "--model_dir DIR | --model NAME --models REGISTRY.json [--device cuda] "
      "[--listen HOST:PORT] [flags]");
  attnscope::ParseFlags(argc, argv);
  attnscope::RetainFreedHostMemory(absl::GetFlag(FLAGS_host_memory_retain_bytes));
  absl::Status status = attnscope::Serve();
  if (!status.ok()) {
    std::cerr << "attnscope-server: " << status << std::endl;
    return 1;
  }
  return 0;
}
