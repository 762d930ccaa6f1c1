// attnscope-capture: the successor of the prototype's collection script. Streams generations with
// attention from an attnscope server and stores one file per sample.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <sys/stat.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <iostream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "attnscope/v1/attnscope.grpc.pb.h"
#include "cli/capture_flags.h"
#include "cli/usage.h"
#include "core/atomic_file.h"
#include "core/capture_text.h"
#include "core/device_name.h"
#include "core/files.h"
#include "core/status_macros.h"
#include "proto/contract.h"
#include "samples/sample_writer.h"
#include "shm/shared_ring.h"

// The prototype's options, same names.
ABSL_FLAG(std::string, model, "",
          "model name the server must be serving (e.g. llama3.1-8b-128k); empty: any");
ABSL_FLAG(std::string, device, "",
          "device the server should run on: cuda, cuda:N or the prototype's GPU index N (checked "
          "against the server; set it there)");
ABSL_FLAG(bool, save_attention, false,
          "store attention (the prototype's default, off: generate and print only)");
ABSL_FLAG(int, max_samples, 0, "process at most this many samples (0: all)");
ABSL_FLAG(int64_t, max_length, 0,
          "truncate prompts longer than this in the middle (first + last half)");
ABSL_FLAG(int, max_new_tokens, 32,
          "tokens to generate per sample (0: the prompt only: one forward pass, prefill captures)");
ABSL_FLAG(std::string, output_dir, "attention_data", "where sample files go");
// Connection.
ABSL_FLAG(std::string, server, "",
          "attnscope server address (default: $ATTNSCOPE_SERVER, else 127.0.0.1:50051)");
ABSL_FLAG(std::string, token, "", "bearer token (or $ATTNSCOPE_TOKEN)");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM file of the CA that signed the server's certificate (enables TLS)");
ABSL_FLAG(bool, health, false, "only check the server's health service; exit 0 when SERVING");
// Detached jobs (servers with --jobs_dir).
ABSL_FLAG(bool, detach, false,
          "submit each sample as a detached job and exit: the server stores the samples; ids go "
          "to OUTPUT_DIR/jobs.txt (fetch them later with --fetch)");
ABSL_FLAG(std::string, fetch, "",
          "job ids (comma-separated), or 'all' for those in OUTPUT_DIR/jobs.txt: wait for each, "
          "then store its sample in OUTPUT_DIR as attention_sample_N.safetensors");
// Inputs.
ABSL_FLAG(std::string, prompt, "", "one prompt text");
ABSL_FLAG(std::string, prompt_file, "", "a file whose whole content is one prompt");
ABSL_FLAG(std::string, prompt_ids, "",
          "one prompt as token ids, e.g. 1,2,3 (or @FILE holding them)");
ABSL_FLAG(std::string, dataset, "", "JSONL file: LongBench fields context + input, or prompt");
ABSL_FLAG(bool, chat, false,
          "send each prompt as a user chat message, rendered with the checkpoint's chat template");
ABSL_FLAG(std::string, system, "", "with --chat: a system message before each prompt");
ABSL_FLAG(std::string, chat_template_kwargs, "",
          "with --chat: template variables as a JSON object, e.g. '{\"enable_thinking\": false}'");
// Capture: --form, --stats, --layers, --heads, --phases, --rows, --element_type
// (cli/capture_flags.h).
ABSL_FLAG(std::string, dtype, "",
          "renamed --element_type (the server's --dtype is its compute type); refused when given");
ABSL_FLAG(std::string, format, "safetensors",
          "safetensors, or pickle (the prototype's .pkl layout)");
ABSL_FLAG(bool, overwrite, false, "redo samples whose file already exists");
ABSL_FLAG(bool, recapture_changed, false,
          "on a rerun, redo the samples whose file was made with other settings (prompt, model, "
          "max_new_tokens, capture spec); default: such samples are refused and the run fails");
ABSL_FLAG(int64_t, max_bytes, int64_t{4} << 30,
          "refuse a sample whose capture the server estimates above this many bytes, before any "
          "attention byte is sent (0: no limit of this client's; the server's budget still "
          "applies)");
ABSL_FLAG(double, timeout_s, 0, "deadline per sample in seconds (0: none)");
ABSL_FLAG(double, progress_s, 1.0,
          "seconds between progress lines on stderr (received MB of the estimate, tokens)");
ABSL_FLAG(int64_t, shared_memory_bytes, int64_t{16} << 20,
          "ring size for same-host output: attention values come through shared memory instead "
          "of the wire when the server is on this host (the wire otherwise); 0: always the wire");

namespace attnscope {
namespace {

// Every flag, read once.
struct Options {
  std::string model, device, output_dir, server, token, tls_ca;
  std::string prompt, prompt_file, prompt_ids, dataset, system, chat_template_kwargs;
  bool save_attention = true, health = false, chat = false, overwrite = false;
  bool recapture_changed = false;
  bool detach = false;
  std::string fetch;
  int max_samples = 0, max_new_tokens = 0;
  int64_t max_length = 0;
  int64_t max_bytes = 0;  // the client's capture limit (capture.max_bytes); 0: none
  double timeout_s = 0;
  double progress_s = 1;
  int64_t shared_memory_bytes = 0;
  SampleFormat format = SampleFormat::kSafetensors;
  v1::CaptureSpec capture;
  CaptureSpec spec;  // the flags' spec, resolved against the model for a rerun's comparison
  v1::Interventions interventions;  // --ablate, --knockout, --kv_policy, --reference_leads,
                                    // --capture_reference
};

absl::StatusOr<Options> OptionsFromFlags() {
  Options o;
  o.model = absl::GetFlag(FLAGS_model);
  o.device = DeviceName(absl::GetFlag(FLAGS_device));
  o.output_dir = absl::GetFlag(FLAGS_output_dir);
  o.server = absl::GetFlag(FLAGS_server);
  if (o.server.empty()) {
    const char* env = std::getenv("ATTNSCOPE_SERVER");
    o.server = env != nullptr && *env != '\0' ? env : "127.0.0.1:50051";
  }
  o.token = absl::GetFlag(FLAGS_token);
  if (o.token.empty() && std::getenv("ATTNSCOPE_TOKEN") != nullptr)
    o.token = std::getenv("ATTNSCOPE_TOKEN");
  o.tls_ca = absl::GetFlag(FLAGS_tls_ca);
  o.prompt = absl::GetFlag(FLAGS_prompt);
  o.prompt_file = absl::GetFlag(FLAGS_prompt_file);
  o.prompt_ids = absl::GetFlag(FLAGS_prompt_ids);
  o.dataset = absl::GetFlag(FLAGS_dataset);
  o.save_attention = absl::GetFlag(FLAGS_save_attention);
  o.health = absl::GetFlag(FLAGS_health);
  o.chat = absl::GetFlag(FLAGS_chat);
  o.system = absl::GetFlag(FLAGS_system);
  o.chat_template_kwargs = absl::GetFlag(FLAGS_chat_template_kwargs);
  if (!o.chat && (!o.system.empty() || !o.chat_template_kwargs.empty()))
    return absl::InvalidArgumentError("--system and --chat_template_kwargs need --chat");
  o.overwrite = absl::GetFlag(FLAGS_overwrite);
  o.recapture_changed = absl::GetFlag(FLAGS_recapture_changed);
  o.detach = absl::GetFlag(FLAGS_detach);
  o.fetch = absl::GetFlag(FLAGS_fetch);
  if (o.detach && !o.fetch.empty())
    return absl::InvalidArgumentError("--detach submits and --fetch collects: give one of them");
  o.max_samples = absl::GetFlag(FLAGS_max_samples);
  o.max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  o.max_length = absl::GetFlag(FLAGS_max_length);
  o.max_bytes = absl::GetFlag(FLAGS_max_bytes);
  if (o.max_bytes < 0) return absl::InvalidArgumentError("--max_bytes must be >= 0 (0: no limit)");
  o.timeout_s = absl::GetFlag(FLAGS_timeout_s);
  o.progress_s = absl::GetFlag(FLAGS_progress_s);
  if (!(o.progress_s >= 0)) return absl::InvalidArgumentError("--progress_s must be >= 0");
  o.shared_memory_bytes = absl::GetFlag(FLAGS_shared_memory_bytes);
  if (o.shared_memory_bytes != 0 && o.shared_memory_bytes < shared_ring::kMinCapacity) {
    return absl::InvalidArgumentError(
        absl::StrCat("--shared_memory_bytes must be 0 or at least ", shared_ring::kMinCapacity));
  }
  const std::string format = absl::GetFlag(FLAGS_format);
  if (format == "pickle") {
    o.format = SampleFormat::kPickle;
  } else if (format != "safetensors") {
    return absl::InvalidArgumentError("--format must be safetensors or pickle");
  }
  if (!absl::GetFlag(FLAGS_dtype).empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--dtype is now --element_type (the element type of captured matrices; --dtype "
        "names the compute type, the server's): pass --element_type=",
        absl::GetFlag(FLAGS_dtype)));
  }
  // Checked whether or not it is used, so that a typo never passes silently.
  ASSIGN_OR_RETURN(o.spec, CaptureSpecFromFlags());
  if (o.save_attention) {
    FillCaptureSpec(o.spec, 0, 0, &o.capture);
  } else if (const std::vector<std::string> unused = ChangedFlags(kCaptureSpecFlags);
             !unused.empty()) {
    std::cerr << "attnscope-capture: warning: --" << absl::StrJoin(unused, ", --")
              << " has no effect without --save_attention (nothing is captured or stored)"
              << std::endl;
  }
  ASSIGN_OR_RETURN(const Interventions interventions, InterventionsFromFlags());
  if (!interventions.empty()) {
    FillInterventions(interventions, ReferenceLeadsFromFlags(), CaptureReferenceFromFlags(),
                      &o.interventions);
  } else if (ReferenceLeadsFromFlags() || CaptureReferenceFromFlags()) {
    return absl::InvalidArgumentError(
        absl::StrCat(ReferenceLeadsFromFlags() ? "--reference_leads" : "--capture_reference",
                     " needs an intervention (--ablate, --knockout or --kv_policy)"));
  }
  return o;
}

struct Sample {
  std::string text;
  std::vector<int64_t> ids;
  bool is_ids = false;
  bool builtin = false;  // one of kBuiltinPrompts: no input was given
};

// Built-in prompts: the prototype's basic command works without any input.
const char* kBuiltinPrompts[] = {
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    "Attention lets every token look back at the tokens before it. In a long document, which "
    "earlier "
    "words matter most for predicting the next one? Let us find out:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
};

// Prompt and id files: at most 1 GiB.
absl::StatusOr<std::string> ReadFile(const std::string& path) {
  return ReadRegularFile(path, int64_t{1} << 30);
}

absl::StatusOr<std::vector<Sample>> Samples(const Options& o) {
  std::vector<Sample> out;
  if (std::string ids = o.prompt_ids; !ids.empty()) {
    if (ids[0] == '@') {  // long prompts do not fit on a command line
      auto text = ReadFile(ids.substr(1));
      if (!text.ok()) return text.status();
      ids = *text;
    }
    Sample s;
    auto parsed = ParseIndexList(ids, "--prompt_ids");
    if (!parsed.ok()) return parsed.status();
    s.ids = *parsed;
    s.is_ids = true;
    out.push_back(s);
  }
  if (!o.prompt.empty()) out.push_back({o.prompt, {}, false});
  if (const std::string& f = o.prompt_file; !f.empty()) {
    auto text = ReadFile(f);
    if (!text.ok()) return text.status();
    out.push_back({*text, {}, false});
  }
  if (const std::string& d = o.dataset; !d.empty()) {
    auto content = ReadFile(d);
    if (!content.ok()) return content.status();
    std::istringstream in(*content);
    int line_no = 0;
    for (std::string line; std::getline(in, line);) {
      ++line_no;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(d, ":", line_no, ": not a JSON object"));
      }
      auto text = [&](const char* key) -> const std::string* {
        auto it = j.find(key);
        return it != j.end() && it->is_string() ? &it->get_ref<const std::string&>() : nullptr;
      };
      if (j.contains("prompt")) {
        if (text("prompt") == nullptr)
          return absl::InvalidArgumentError(
              absl::StrCat(d, ":", line_no, ": 'prompt' must be a string"));
        out.push_back({*text("prompt"), {}, false});
      } else if (j.contains("context") && j.contains("input")) {
        if (text("context") == nullptr || text("input") == nullptr) {
          return absl::InvalidArgumentError(
              absl::StrCat(d, ":", line_no, ": 'context' and 'input' must be strings"));
        }
        out.push_back({absl::StrCat(*text("context"), "\n\n", *text("input")), {}, false});
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat(d, ":", line_no, ": needs 'prompt', or 'context' and 'input'"));
      }
    }
  }
  if (out.empty()) {
    for (const char* p : kBuiltinPrompts) out.push_back({p, {}, false, true});
  }
  const int max = o.max_samples;
  if (max > 0 && static_cast<int>(out.size()) > max) out.resize(max);
  return out;
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> Connect(const Options& o) {
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (const std::string& ca = o.tls_ca; !ca.empty()) {
    grpc::SslCredentialsOptions ssl;
    auto pem = ReadRegularFile(ca, 16 << 20);
    if (!pem.ok())
      return absl::InvalidArgumentError(absl::StrCat("--tls_ca: ", pem.status().message()));
    if (pem->find("-----BEGIN CERTIFICATE-----") == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("--tls_ca: ", ca, " holds no PEM certificate"));
    }
    ssl.pem_root_certs = *pem;
    creds = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(256 << 20);
  return grpc::CreateCustomChannel(o.server, creds, args);
}

// Every call's metadata: the bearer token, and the model, which a multi-model front door routes by
// (deploy/gpus.py's Envoy: x-attnscope-model).
void Authorize(const Options& o, grpc::ClientContext* ctx) {
  if (!o.token.empty()) ctx->AddMetadata("authorization", "Bearer " + o.token);
  // Only a name fit for a header (printable ASCII, <= 256 characters); the server answers any
  // other with NOT_FOUND.
  bool routable = !o.model.empty() && o.model.size() <= 256;
  for (char c : o.model) routable = routable && c >= ' ' && c <= '~';
  if (routable) ctx->AddMetadata("x-attnscope-model", o.model);
}

int Health(const std::shared_ptr<grpc::Channel>& channel) {
  // grpc.health.v1.Health/Check with an empty request; SERVING is status 1 (bytes 08 01).
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::ByteBuffer request, response;
  grpc::Slice empty("");
  request = grpc::ByteBuffer(&empty, 1);
  grpc::Status status;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) {
                   std::lock_guard<std::mutex> lock(mu);
                   status = s;
                   done = true;
                   cv.notify_one();
                 });
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return done; });
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (status.ok() && response.Dump(&slices).ok()) {
    for (auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  const bool serving = status.ok() && bytes == std::string("\x08\x01", 2);
  std::cout << (serving ? "SERVING" : "NOT_SERVING") << std::endl;
  return serving ? 0 : 1;
}

// mkdir -p
absl::Status MakeDirs(const std::string& path) {
  for (size_t i = 1; i <= path.size(); ++i) {
    if (i < path.size() && path[i] != '/') continue;
    const std::string prefix = path.substr(0, i);
    if (mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST) {
      return absl::PermissionDeniedError(
          absl::StrCat("cannot create ", prefix, ": ", std::strerror(errno)));
    }
  }
  struct stat st {};
  if (stat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(path, " is not a directory"));
  }
  return absl::OkStatus();
}

// Checks, once before the first sample, that the server answers and serves the model asked for;
// warns about a device it cannot honour. Returns what it serves.
absl::StatusOr<v1::ModelInfo> CheckServer(const Options& o, v1::AttentionService::Stub* stub) {
  grpc::ClientContext ctx;
  Authorize(o, &ctx);
  v1::ModelInfo info;
  grpc::Status s = stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info);
  if (!s.ok()) {
    return absl::UnavailableError(absl::StrCat("cannot reach ", o.server, ": ", s.error_message()));
  }
  if (!o.model.empty() && info.name() != o.model) {
    constexpr size_t kShown = 80;  // a name is echoed only this far
    const std::string shown =
        o.model.size() > kShown ? absl::StrCat(o.model.substr(0, kShown), "...") : o.model;
    return absl::NotFoundError(absl::StrCat("--model ", shown, ": the server at ", o.server,
                                            " serves '", info.name(),
                                            "'; connect to the server of that model"));
  }
  if (!o.device.empty() && info.device().rfind(o.device, 0) != 0) {
    std::cerr << "warning: --device " << o.device << " requested, but the server runs on "
              << info.device() << " (the device is chosen where the server starts)" << std::endl;
  }
  return info;
}

v1::GenerateRequest RequestFor(const Options& o, const Sample& sample) {
  v1::GenerateRequest req;
  req.set_model(o.model);
  if (sample.is_ids) {
    for (int64_t id : sample.ids) req.mutable_token_ids()->add_ids(id);
  } else if (o.chat) {
    if (!o.system.empty()) {
      auto* s = req.mutable_chat()->add_messages();
      s->set_role("system");
      s->set_content(o.system);
    }
    req.mutable_chat()->set_chat_template_kwargs(o.chat_template_kwargs);
    auto* m = req.mutable_chat()->add_messages();
    m->set_role("user");
    m->set_content(sample.text);
  } else {
    req.set_text(sample.text);
  }
  req.set_max_new_tokens(o.max_new_tokens);
  req.set_max_length(o.max_length);
  if (o.interventions.ByteSizeLong() > 0) *req.mutable_interventions() = o.interventions;
  // Without --save_attention the prototype generated and printed: nothing captured.
  if (o.save_attention) {
    *req.mutable_capture() = o.capture;
    req.mutable_capture()->set_max_bytes(o.max_bytes);  // the server refuses before it starts
  }
  return req;
}

// Same-host output for the samples of one run: one ring, reused sample after sample, replaced
// after a sample that failed (its server job may still be finishing a write), given up for the run
// once the server says it cannot use it.
struct SharedOutput {
  std::unique_ptr<shared_ring::Reader> ring;
  int64_t bytes = 0;
  bool refused = false;

  shared_ring::Reader* Get() {
    if (refused || bytes == 0) return nullptr;
    if (ring == nullptr) {
      auto made = shared_ring::Reader::Create(bytes);
      if (!made.ok()) {
        std::cerr << "attnscope-capture: no shared memory (" << made.status().message()
                  << "); using the wire" << std::endl;
        refused = true;
        return nullptr;
      }
      ring = std::move(*made);
    }
    return ring.get();
  }
};

// A chunk whose values wait in the ring: handed to the writer in place, then released.
absl::Status TakeShared(shared_ring::Reader* ring, const v1::AttentionChunk& c,
                        SampleWriter* writer, bool save) {
  if (ring == nullptr || !c.data().empty() || !c.indices().empty() || c.shared_bytes() < 0 ||
      c.shared_index_bytes() < 0 || c.shared_bytes() > ring->capacity() ||
      c.shared_index_bytes() > ring->capacity()) {
    return absl::DataLossError(
        "malformed stream from the server: an attention chunk that is not a valid shared piece");
  }
  const int64_t n = c.shared_bytes() + c.shared_index_bytes();
  ASSIGN_OR_RETURN(absl::string_view piece, ring->View(c.shared_position(), n));
  if (save) {
    RETURN_IF_ERROR(
        writer->OnAttention(c, piece.substr(0, c.shared_bytes()), piece.substr(c.shared_bytes())));
  }
  return ring->Release(c.shared_position() + n);
}

// Streams one sample into `path`; prints what the prototype printed.
absl::Status CaptureSample(const Options& o, v1::AttentionService::Stub* stub, size_t index,
                           const Sample& sample, const std::string& path, bool replace,
                           SharedOutput* shared_output) {
  v1::GenerateRequest req = RequestFor(o, sample);
  shared_ring::Reader* ring = o.save_attention ? shared_output->Get() : nullptr;
  if (ring != nullptr) {
    req.mutable_shared_output()->set_name(ring->name());
    req.mutable_shared_output()->set_capacity(ring->capacity());
    req.mutable_shared_output()->set_key(ring->key());
  }
  bool shared = false;  // the server writes into the ring
  grpc::ClientContext ctx;
  Authorize(o, &ctx);
  if (o.timeout_s > 0) {
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(static_cast<int64_t>(o.timeout_s * 1000)));
  }
  SampleWriter writer(path, o.format, replace);
  auto reader = stub->StreamAttention(&ctx, req);
  v1::StreamAttentionResponse msg;
  absl::Status local;
  v1::StreamTrailer trailer;
  bool have_trailer = false;
  auto last_progress = std::chrono::steady_clock::now();
  bool progress_shown = false;  // a progress line is open on stderr: ended before anything else
  int64_t estimated_bytes = 0;
  int layers_captured = 0;
  double kl_sum = 0;  // interventions: the run's divergence, summed for the line printed after it
  int64_t agreed = 0, divergence_steps = 0, freed = 0;
  const bool save = o.save_attention;
  while (local.ok() && reader->Read(&msg)) {
    switch (msg.event_case()) {
      case v1::StreamAttentionResponse::kHeader:
        std::cout << "Processing sample " << index
                  << ", input length: " << msg.header().prompt_token_ids_size() << std::endl;
        layers_captured = msg.header().capture().layers_size();
        estimated_bytes = msg.header().estimated_bytes();
        if (o.max_bytes > 0 && msg.header().estimated_bytes() > o.max_bytes) {
          local = absl::ResourceExhaustedError(absl::StrCat(
              "the capture would produce about ", msg.header().estimated_bytes() / 1e6,
              " MB, over --max_bytes ", o.max_bytes, "; shrink it or raise --max_bytes (0: none)"));
          break;
        }
        shared = msg.header().shared_output();
        if (shared && ring == nullptr) {
          local = absl::DataLossError(
              "malformed stream from the server: shared output nobody asked for");
        } else if (ring != nullptr && !shared) {
          // Another host or IPC namespace, or a server that does not allow it: the wire, for the
          // rest of the run. Said aloud only where it was to be expected to work.
          if (absl::StartsWith(o.server, "127.") || absl::StartsWith(o.server, "localhost") ||
              absl::StartsWith(o.server, "[::1]") || absl::StartsWith(o.server, "unix:")) {
            std::cerr << "attnscope-capture: the server does not use shared memory ("
                      << msg.header().shared_output_refused() << "); using the wire" << std::endl;
          }
          shared_output->refused = true;
          shared_output->ring.reset();
          ring = nullptr;
        }
        if (save && local.ok()) local = writer.OnHeader(msg.header(), req.max_new_tokens());
        break;
      case v1::StreamAttentionResponse::kToken:
        if (save) local = writer.OnToken(msg.token());
        break;
      case v1::StreamAttentionResponse::kAttention:
        if (shared) {
          local = TakeShared(ring, msg.attention(), &writer, save);
        } else if (msg.attention().shared_bytes() != 0 ||
                   msg.attention().shared_index_bytes() != 0) {
          local = absl::DataLossError(
              "malformed stream from the server: a shared piece on a stream without shared output");
        } else if (save) {
          local = writer.OnAttention(msg.attention());
        }
        break;
      case v1::StreamAttentionResponse::kStatistic:
        if (save) local = writer.OnStatistic(msg.statistic());
        break;
      case v1::StreamAttentionResponse::kDivergence:
        kl_sum += msg.divergence().kl();
        agreed += msg.divergence().top1_agree() ? 1 : 0;
        ++divergence_steps;
        if (save) local = writer.OnDivergence(msg.divergence());
        break;
      case v1::StreamAttentionResponse::kKvDecision:
        freed += msg.kv_decision().bytes_freed();
        if (save) local = writer.OnKvDecision(msg.kv_decision());
        break;
      case v1::StreamAttentionResponse::kTrailer:
        if (have_trailer)
          local = absl::DataLossError("malformed stream from the server: a second trailer");
        trailer = msg.trailer();
        have_trailer = true;
        break;
      default:
        break;
    }
    const auto now = std::chrono::steady_clock::now();
    if (now - last_progress >= std::chrono::duration<double>(o.progress_s)) {
      std::cerr << "\r  received " << writer.bytes_received() / 1e6 << " MB";
      if (estimated_bytes > 0) std::cerr << " of about " << estimated_bytes / 1e6 << " MB";
      std::cerr << ", " << writer.tokens() << " tokens" << std::flush;
      last_progress = now;
      progress_shown = true;
    }
  }
  if (progress_shown) std::cerr << std::endl;
  if (!local.ok()) ctx.TryCancel();
  grpc::Status status = reader->Finish();
  if (local.ok() && status.ok() && !have_trailer) {
    local = absl::DataLossError("the stream ended without its trailer (a proxy cut it short?)");
  }
  if (!local.ok() || !status.ok()) {
    shared_output->ring.reset();  // the failed stream's server job may still write into it
    return absl::Status(
        local.ok() ? absl::StatusCode::kUnavailable : local.code(),
        absl::StrCat("Sample ", index, " failed: ",
                     local.ok() ? status.error_message() : std::string(local.message())));
  }
  std::cout << "Generated: " << trailer.text() << std::endl;
  if (divergence_steps > 0 || freed > 0) {
    std::cout << "Divergence from the unmodified model: mean KL "
              << (divergence_steps > 0 ? kl_sum / divergence_steps : 0.0)
              << " nats, top-1 agreement " << agreed << "/" << divergence_steps << " steps";
    if (freed > 0) std::cout << ", KV policy frees " << freed / 1e6 << " MB";
    std::cout << std::endl;
  }
  if (save) {
    absl::Status s = writer.Finish(trailer, sample.is_ids ? "" : sample.text);
    if (!s.ok()) {
      return absl::Status(s.code(),
                          absl::StrCat("Sample ", index, " could not be saved: ", s.message()));
    }
    std::cout << "Saved attention data for sample " << index << " with " << layers_captured
              << " layers" << std::endl;
  }
  return absl::OkStatus();
}

// --detach: every sample submitted as a job; "N ID" lines appended to OUTPUT_DIR/jobs.txt.
int Detach(const Options& o, v1::AttentionService::Stub* stub, const std::vector<Sample>& samples) {
  const std::string list = o.output_dir + "/jobs.txt";
  std::FILE* out = std::fopen(list.c_str(), "a");
  if (out == nullptr) {
    std::cerr << "attnscope-capture: cannot write " << list << std::endl;
    return 1;
  }
  int failures = 0;
  for (size_t i = 0; i < samples.size(); ++i) {
    grpc::ClientContext ctx;
    Authorize(o, &ctx);
    v1::JobInfo info;
    grpc::Status s = stub->SubmitJob(&ctx, RequestFor(o, samples[i]), &info);
    if (!s.ok()) {
      std::cerr << "Sample " << i << " not submitted: " << s.error_message() << std::endl;
      ++failures;
      continue;
    }
    std::fprintf(out, "%zu %s\n", i, info.job_id().c_str());
    std::fflush(out);
    std::cout << "Submitted sample " << i << " as job " << info.job_id() << std::endl;
  }
  std::fclose(out);
  if (failures > 0) {
    std::cerr << "attnscope-capture: " << failures << " of " << samples.size()
              << " samples not submitted" << std::endl;
    return 1;
  }
  std::cout << "Submitted " << samples.size()
            << " jobs; fetch them with --fetch=all --output_dir=" << o.output_dir << std::endl;
  return 0;
}

// The job's id, which a front door with several servers of one model routes its calls by
// (deploy/gpus.py, the servers' --jobs_id_prefix); only an id fit for a header.
void AddJobHeader(const std::string& id, grpc::ClientContext* ctx) {
  bool routable = !id.empty() && id.size() <= 128;
  for (char c : id)
    routable = routable && ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-');
  if (routable) ctx->AddMetadata("x-attnscope-job", id);
}

// Waits for one job, then stores its result at `path` (whole, or not at all), resuming a broken
// transfer from the bytes already received.
absl::Status FetchJob(const Options& o, v1::AttentionService::Stub* stub, const std::string& id,
                      const std::string& path) {
  v1::JobInfo info;
  bool shown = false;  // a progress line is open on stderr
  for (;;) {
    grpc::ClientContext ctx;
    Authorize(o, &ctx);
    AddJobHeader(id, &ctx);
    v1::JobRequest request;
    request.set_job_id(id);
    grpc::Status s = stub->GetJob(&ctx, request, &info);
    if (!s.ok())
      return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
    if (info.status() == v1::JOB_COMPLETED) break;
    if (info.status() == v1::JOB_FAILED || info.status() == v1::JOB_CANCELLED) {
      if (shown) std::cerr << std::endl;
      return absl::Status(static_cast<absl::StatusCode>(info.error_code()),
                          absl::StrCat("job ", id, " ", v1::JobStatus_Name(info.status()), ": ",
                                       info.error_message()));
    }
    std::cerr << "\r  job " << id.substr(0, 8) << ": " << v1::JobStatus_Name(info.status())
              << (info.queue_position() > 0
                      ? absl::StrCat(", queue position ", info.queue_position())
                      : std::string())
              << ", " << info.tokens() << "/" << info.max_new_tokens() << " tokens" << std::flush;
    shown = true;
    std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  if (shown) std::cerr << std::endl;
  ASSIGN_OR_RETURN(auto file, AtomicFile::Create(path));
  int64_t written = 0;
  for (int attempt = 0;; ++attempt) {
    grpc::ClientContext ctx;
    Authorize(o, &ctx);
    AddJobHeader(id, &ctx);
    v1::FetchResultRequest request;
    request.set_job_id(id);
    request.set_offset(written);
    auto reader = stub->FetchResult(&ctx, request);
    v1::FetchResultChunk chunk;
    while (reader->Read(&chunk)) {
      if (chunk.offset() != written || chunk.total_bytes() != info.result_bytes())
        return absl::DataLossError(
            absl::StrCat("job ", id, ": a chunk at ", chunk.offset(), ", expected ", written));
      if (std::fwrite(chunk.data().data(), 1, chunk.data().size(), file->stream()) !=
          chunk.data().size())
        return absl::InternalError(absl::StrCat("cannot write ", path));
      written += static_cast<int64_t>(chunk.data().size());
    }
    grpc::Status s = reader->Finish();
    if (s.ok()) break;
    if (attempt >= 5 || (s.error_code() != grpc::StatusCode::UNAVAILABLE &&
                         s.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED))
      return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
  }
  if (written != info.result_bytes())
    return absl::DataLossError(
        absl::StrCat("job ", id, ": ", written, " of ", info.result_bytes(), " bytes fetched"));
  return file->Publish(o.overwrite);
}

// --fetch: the listed jobs (or every job of OUTPUT_DIR/jobs.txt) into OUTPUT_DIR.
int Fetch(const Options& o, v1::AttentionService::Stub* stub) {
  std::vector<std::pair<std::string, std::string>> wanted;  // (id, file)
  if (o.fetch == "all") {
    auto text = ReadRegularFile(o.output_dir + "/jobs.txt", int64_t{16} << 20);
    if (!text.ok()) {
      std::cerr << "attnscope-capture: --fetch=all needs " << o.output_dir
                << "/jobs.txt (written by --detach): " << text.status().message() << std::endl;
      return 2;
    }
    for (absl::string_view line : absl::StrSplit(*text, '\n', absl::SkipWhitespace())) {
      std::vector<std::string> parts = absl::StrSplit(line, ' ', absl::SkipWhitespace());
      if (parts.size() != 2 || parts[0].find_first_not_of("0123456789") != std::string::npos) {
        std::cerr << "attnscope-capture: " << o.output_dir << "/jobs.txt: not 'N ID': " << line
                  << std::endl;
        return 2;
      }
      wanted.emplace_back(
          parts[1], absl::StrCat(o.output_dir, "/attention_sample_", parts[0], ".safetensors"));
    }
  } else {
    for (absl::string_view id : absl::StrSplit(o.fetch, ',', absl::SkipWhitespace()))
      wanted.emplace_back(std::string(id),
                          absl::StrCat(o.output_dir, "/job_", id.substr(0, 64), ".safetensors"));
  }
  std::vector<std::string> failed;
  for (const auto& [id, path] : wanted) {
    struct stat st {};
    if (!o.overwrite && lstat(path.c_str(), &st) == 0) {
      std::cout << "Skipping job " << id << ": " << path
                << " exists (--overwrite to fetch it again)" << std::endl;
      continue;
    }
    if (absl::Status s = FetchJob(o, stub, id, path); !s.ok()) {
      std::cerr << "Job " << id << " not fetched: " << s.message() << std::endl;
      failed.push_back(id);
      continue;
    }
    std::cout << "Fetched job " << id << " into " << path << std::endl;
  }
  if (failed.empty()) {
    std::cout << "Done!" << std::endl;
    return 0;
  }
  std::cerr << "attnscope-capture: " << failed.size() << " of " << wanted.size()
            << " jobs not fetched (" << absl::StrJoin(failed, ", ") << ")" << std::endl;
  return 1;
}

int Run() {
  auto options = OptionsFromFlags();
  if (!options.ok()) {
    std::cerr << "attnscope-capture: " << options.status().message() << std::endl;
    return 2;
  }
  const Options& o = *options;
  auto connected = Connect(o);
  if (!connected.ok()) {
    std::cerr << "attnscope-capture: " << connected.status().message() << std::endl;
    return 2;
  }
  auto channel = *connected;
  if (o.health) return Health(channel);
  auto stub = v1::AttentionService::NewStub(channel);
  auto samples = Samples(o);
  if (!samples.ok()) {
    std::cerr << "attnscope-capture: " << samples.status().message() << std::endl;
    return 2;
  }
  const absl::StatusOr<v1::ModelInfo> info = CheckServer(o, stub.get());
  if (!info.ok()) {
    std::cerr << "attnscope-capture: " << info.status().message() << std::endl;
    return 1;
  }
  if (absl::Status made = MakeDirs(o.output_dir); !made.ok()) {
    std::cerr << "attnscope-capture: " << made.message() << std::endl;
    return 1;
  }
  if (!o.fetch.empty()) return Fetch(o, stub.get());
  if (o.detach) return Detach(o, stub.get(), *samples);
  if (!samples->empty() && samples->front().builtin) {
    std::cout << "No --prompt, --prompt_file, --prompt_ids or --dataset given: using the "
              << samples->size() << " built-in sample prompts" << std::endl;
  }
  // What a rerun compares a finished file with: the spec resolved against the served model.
  v1::CaptureSpec resolved;
  FillCaptureSpec(o.spec, info->num_layers(), info->num_heads(), &resolved);
  std::vector<size_t> failed;
  int stored = 0, skipped = 0;
  SharedOutput shared_output;
  shared_output.bytes = o.shared_memory_bytes;
  for (size_t i = 0; i < samples->size(); ++i) {
    const Sample& sample = (*samples)[i];
    const std::string path =
        absl::StrCat(o.output_dir, "/attention_sample_", i,
                     o.format == SampleFormat::kPickle ? ".pkl" : ".safetensors");
    // A rerun skips finished samples made with the same settings; a file there that is not one
    // (cut short, not a sample) is redone, and said so; one made with other settings is refused
    // (--recapture_changed: redone).
    bool replace = o.overwrite;
    struct stat st {};
    if (o.save_attention && !o.overwrite && lstat(path.c_str(), &st) == 0) {
      if (absl::Status whole = CheckStoredSample(path, o.format); whole.ok()) {
        SampleSettings asked;
        asked.model = o.model;
        asked.is_ids = sample.is_ids;
        asked.prompt_text = sample.text;
        asked.prompt_ids = sample.ids;
        asked.max_length = o.max_length;
        asked.max_new_tokens = o.max_new_tokens;
        asked.capture = resolved;
        absl::StatusOr<std::vector<std::string>> differences =
            StoredSampleDifferences(path, o.format, asked);
        if (differences.ok() && differences->empty()) {
          std::cout << "Skipping sample " << i << ": " << path
                    << " exists with these settings (--overwrite to redo it)" << std::endl;
          ++skipped;
          continue;
        }
        const std::string why = differences.ok() ? absl::StrJoin(*differences, "; ")
                                                 : std::string(differences.status().message());
        if (!o.recapture_changed) {
          std::cerr << "Sample " << i << ": " << path << " was made with other settings (" << why
                    << "); it is left alone. --recapture_changed redoes such samples, "
                       "--overwrite every sample, or choose another --output_dir"
                    << std::endl;
          failed.push_back(i);
          continue;
        }
        std::cout << "Redoing sample " << i << ": made with other settings (" << why << ")"
                  << std::endl;
        replace = true;
      } else if (!S_ISREG(st.st_mode)) {
        std::cerr << "Sample " << i << ": " << path
                  << " exists and is not a regular file; it is left alone and the sample not "
                     "stored"
                  << std::endl;
        failed.push_back(i);
        continue;
      } else {
        std::cout << "Redoing sample " << i << ": " << whole.message() << std::endl;
        replace = true;
      }
    }
    if (absl::Status s = CaptureSample(o, stub.get(), i, sample, path, replace, &shared_output);
        !s.ok()) {
      std::cerr << s.message() << std::endl;
      failed.push_back(i);
    } else {
      ++stored;
    }
  }
  if (failed.empty()) {
    std::cout << "Done!" << std::endl;
    return 0;
  }
  std::cerr << "attnscope-capture: " << failed.size() << " of " << samples->size()
            << " samples failed (" << absl::StrJoin(failed, ", ") << "); "
            << (o.save_attention ? absl::StrCat(stored, " stored, ", skipped, " skipped")
                                 : absl::StrCat(stored, " generated"))
            << std::endl;
  return 1;
}

}  // namespace
}  // namespace attnscope

int main(int argc, char** argv) {
  attnscope::SetUsage(
      "attnscope-capture",
      "streams generations with attention from an attnscope server into sample files",
      "[--server HOST:PORT] (--prompt TEXT | --prompt_file F | --prompt_ids 1,2,3 | "
      "--dataset F.jsonl) [--save_attention] [--form ...] [flags]");
  attnscope::ParseFlags(argc, argv);
  return attnscope::Run();
}
