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

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "attnscope/v1/attnscope.grpc.pb.h"
#include "client/cpp/sample_writer.h"
#include "model/files.h"

// The prototype's options, same names.
ABSL_FLAG(std::string, model, "",
          "model name the server must be serving (e.g. llama3.1-8b-128k); empty: any");
ABSL_FLAG(std::string, device, "",
          "device the server should run on (checked against the server; set it there)");
ABSL_FLAG(bool, save_attention, true, "store attention (false: generate and print only)");
ABSL_FLAG(int, max_samples, 0, "process at most this many samples (0: all)");
ABSL_FLAG(int64_t, max_length, 0,
          "truncate prompts longer than this in the middle (first + last half)");
ABSL_FLAG(int, max_new_tokens, 32, "tokens to generate per sample");
ABSL_FLAG(std::string, output_dir, "attention_data", "where sample files go");
// Connection.
ABSL_FLAG(std::string, server, "127.0.0.1:50051", "attnscope server address");
ABSL_FLAG(std::string, token, "", "bearer token (or $ATTNSCOPE_TOKEN)");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM file of the CA that signed the server's certificate (enables TLS)");
ABSL_FLAG(bool, health, false, "only check the server's health service; exit 0 when SERVING");
// Inputs.
ABSL_FLAG(std::string, prompt, "", "one prompt text");
ABSL_FLAG(std::string, prompt_file, "", "a file whose whole content is one prompt");
ABSL_FLAG(std::string, prompt_ids, "",
          "one prompt as token ids, e.g. 1,2,3 (or @FILE holding them)");
ABSL_FLAG(std::string, dataset, "", "JSONL file: LongBench fields context + input, or prompt");
ABSL_FLAG(bool, chat, false, "send each prompt as a user chat message (the model's chat format)");
// Capture.
ABSL_FLAG(std::string, layers, "", "layers to capture, e.g. 0,8,16 (empty: all)");
ABSL_FLAG(std::string, heads, "", "heads to capture (empty: all)");
ABSL_FLAG(std::string, phases, "prefill,decode", "prefill, decode, or both");
ABSL_FLAG(std::string, form, "dense", "dense, head_mean, head_max, pooled:P, top_k:K, none");
ABSL_FLAG(std::string, stats, "", "statistics: entropy,key_score:W,sink:K,local:W,variance");
ABSL_FLAG(std::string, dtype, "float32",
          "element type of stored matrices: float32, float16, bfloat16");
ABSL_FLAG(std::string, format, "safetensors",
          "safetensors, or pickle (the prototype's .pkl layout)");
ABSL_FLAG(bool, overwrite, false, "redo samples whose file already exists");
ABSL_FLAG(double, timeout_s, 0, "deadline per sample in seconds (0: none)");

namespace attnscope {
namespace {

struct Sample {
  std::string text;
  std::vector<int64_t> ids;
  bool is_ids = false;
};

// Built-in prompts: the prototype's basic command works without any input.
const char* kBuiltinPrompts[] = {
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    "Attention lets every token look back at the tokens before it. In a long document, which "
    "earlier "
    "words matter most for predicting the next one? Let us find out:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
};

absl::StatusOr<std::vector<int64_t>> ParseInts(const std::string& text, const char* what) {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int64_t v;
    if (!absl::SimpleAtoi(part, &v))
      return absl::InvalidArgumentError(absl::StrCat(what, ": '", part, "' is not an integer"));
    out.push_back(v);
  }
  return out;
}

// Prompt and id files: at most 1 GiB.
absl::StatusOr<std::string> ReadFile(const std::string& path) {
  return ReadRegularFile(path, int64_t{1} << 30);
}

absl::StatusOr<std::vector<Sample>> Samples() {
  std::vector<Sample> out;
  if (auto ids = absl::GetFlag(FLAGS_prompt_ids); !ids.empty()) {
    if (ids[0] == '@') {  // long prompts do not fit on a command line
      auto text = ReadFile(ids.substr(1));
      if (!text.ok()) return text.status();
      ids = *text;
    }
    Sample s;
    auto parsed = ParseInts(ids, "--prompt_ids");
    if (!parsed.ok()) return parsed.status();
    s.ids = *parsed;
    s.is_ids = true;
    out.push_back(s);
  }
  if (const auto p = absl::GetFlag(FLAGS_prompt); !p.empty()) out.push_back({p, {}, false});
  if (const auto f = absl::GetFlag(FLAGS_prompt_file); !f.empty()) {
    auto text = ReadFile(f);
    if (!text.ok()) return text.status();
    out.push_back({*text, {}, false});
  }
  if (const auto d = absl::GetFlag(FLAGS_dataset); !d.empty()) {
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
    for (const char* p : kBuiltinPrompts) out.push_back({p, {}, false});
  }
  const int max = absl::GetFlag(FLAGS_max_samples);
  if (max > 0 && static_cast<int>(out.size()) > max) out.resize(max);
  return out;
}

absl::StatusOr<v1::CaptureSpec> CaptureFromFlags() {
  v1::CaptureSpec c;
  if (!absl::GetFlag(FLAGS_save_attention)) return c;
  auto layers = ParseInts(absl::GetFlag(FLAGS_layers), "--layers");
  if (!layers.ok()) return layers.status();
  for (int64_t l : *layers) c.add_layers(static_cast<int32_t>(l));
  auto heads = ParseInts(absl::GetFlag(FLAGS_heads), "--heads");
  if (!heads.ok()) return heads.status();
  for (int64_t h : *heads) c.add_heads(static_cast<int32_t>(h));
  for (absl::string_view p : absl::StrSplit(absl::GetFlag(FLAGS_phases), ',', absl::SkipEmpty())) {
    if (p == "prefill")
      c.add_phases(v1::PHASE_PREFILL);
    else if (p == "decode")
      c.add_phases(v1::PHASE_DECODE);
    else
      return absl::InvalidArgumentError(absl::StrCat("--phases: unknown phase '", p, "'"));
  }
  const std::vector<std::string> form = absl::StrSplit(absl::GetFlag(FLAGS_form), ':');
  int32_t arg = 0;
  if (form.size() > 1 && !absl::SimpleAtoi(form[1], &arg))
    return absl::InvalidArgumentError("--form: bad number");
  if (form[0] == "dense")
    c.set_form(v1::FORM_DENSE);
  else if (form[0] == "head_mean")
    c.set_form(v1::FORM_HEAD_MEAN);
  else if (form[0] == "head_max")
    c.set_form(v1::FORM_HEAD_MAX);
  else if (form[0] == "pooled")
    c.set_form(v1::FORM_POOLED), c.set_pool(arg);
  else if (form[0] == "top_k")
    c.set_form(v1::FORM_TOP_K), c.set_top_k(arg);
  else if (form[0] == "none")
    c.set_form(v1::FORM_NONE);
  else
    return absl::InvalidArgumentError(absl::StrCat("--form: unknown form '", form[0], "'"));
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_stats), ',', absl::SkipEmpty())) {
    std::vector<std::string> kv = absl::StrSplit(s, ':');
    int64_t v = 0;
    if (kv.size() == 2 && !absl::SimpleAtoi(kv[1], &v))
      return absl::InvalidArgumentError(absl::StrCat("--stats: ", s));
    auto* st = c.mutable_statistics();
    if (kv[0] == "entropy")
      st->set_row_entropy(true);
    else if (kv[0] == "key_score")
      st->set_key_score_window(v);
    else if (kv[0] == "sink")
      st->set_sink_tokens(v);
    else if (kv[0] == "local")
      st->set_local_window(v);
    else if (kv[0] == "variance")
      st->set_key_score_variance(true);
    else
      return absl::InvalidArgumentError(absl::StrCat("--stats: unknown statistic '", s, "'"));
  }
  const std::string dt = absl::GetFlag(FLAGS_dtype);
  if (dt == "float32")
    c.set_element_type(v1::ELEMENT_FLOAT32);
  else if (dt == "float16")
    c.set_element_type(v1::ELEMENT_FLOAT16);
  else if (dt == "bfloat16")
    c.set_element_type(v1::ELEMENT_BFLOAT16);
  else
    return absl::InvalidArgumentError(
        absl::StrCat("--dtype: '", dt, "' is not float32, float16 or bfloat16"));
  return c;
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> Connect() {
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (const auto ca = absl::GetFlag(FLAGS_tls_ca); !ca.empty()) {
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
  return grpc::CreateCustomChannel(absl::GetFlag(FLAGS_server), creds, args);
}

void Authorize(grpc::ClientContext* ctx) {
  std::string token = absl::GetFlag(FLAGS_token);
  if (token.empty() && std::getenv("ATTNSCOPE_TOKEN") != nullptr)
    token = std::getenv("ATTNSCOPE_TOKEN");
  if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
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

int Run() {
  auto connected = Connect();
  if (!connected.ok()) {
    std::cerr << "attnscope-capture: " << connected.status().message() << std::endl;
    return 2;
  }
  auto channel = *connected;
  if (absl::GetFlag(FLAGS_health)) return Health(channel);
  auto stub = v1::AttentionService::NewStub(channel);
  auto samples = Samples();
  auto capture = CaptureFromFlags();
  if (!samples.ok() || !capture.ok()) {
    std::cerr << "attnscope-capture: "
              << (samples.ok() ? capture.status() : samples.status()).message() << std::endl;
    return 2;
  }
  const std::string format = absl::GetFlag(FLAGS_format);
  if (format != "safetensors" && format != "pickle") {
    std::cerr << "attnscope-capture: --format must be safetensors or pickle" << std::endl;
    return 2;
  }
  {
    grpc::ClientContext ctx;
    Authorize(&ctx);
    v1::ModelInfo info;
    grpc::Status s = stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info);
    if (!s.ok()) {
      std::cerr << "attnscope-capture: cannot reach " << absl::GetFlag(FLAGS_server) << ": "
                << s.error_message() << std::endl;
      return 1;
    }
    const std::string device = absl::GetFlag(FLAGS_device);
    if (!device.empty() && info.device().rfind(device, 0) != 0) {
      std::cerr << "warning: --device " << device << " requested, but the server runs on "
                << info.device() << " (the device is chosen where the server starts)" << std::endl;
    }
  }
  if (absl::Status made = MakeDirs(absl::GetFlag(FLAGS_output_dir)); !made.ok()) {
    std::cerr << "attnscope-capture: " << made.message() << std::endl;
    return 1;
  }
  const bool save = absl::GetFlag(FLAGS_save_attention);
  int failures = 0;
  for (size_t i = 0; i < samples->size(); ++i) {
    const Sample& sample = (*samples)[i];
    const std::string path = absl::StrCat(absl::GetFlag(FLAGS_output_dir), "/attention_sample_", i,
                                          format == "pickle" ? ".pkl" : ".safetensors");
    struct stat st {};
    if (save && !absl::GetFlag(FLAGS_overwrite) && stat(path.c_str(), &st) == 0) {
      std::cout << "Skipping sample " << i << ": " << path << " exists (--overwrite to redo it)"
                << std::endl;
      continue;
    }
    v1::GenerateRequest req;
    req.set_model(absl::GetFlag(FLAGS_model));
    if (sample.is_ids) {
      for (int64_t id : sample.ids) req.mutable_token_ids()->add_ids(id);
    } else if (absl::GetFlag(FLAGS_chat)) {
      auto* m = req.mutable_chat()->add_messages();
      m->set_role("user");
      m->set_content(sample.text);
    } else {
      req.set_text(sample.text);
    }
    req.set_max_new_tokens(absl::GetFlag(FLAGS_max_new_tokens));
    req.set_max_length(absl::GetFlag(FLAGS_max_length));
    *req.mutable_capture() = *capture;

    grpc::ClientContext ctx;
    Authorize(&ctx);
    if (const double t = absl::GetFlag(FLAGS_timeout_s); t > 0) {
      ctx.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(t * 1000)));
    }
    SampleWriter writer(path,
                        format == "pickle" ? SampleFormat::kPickle : SampleFormat::kSafetensors);
    auto reader = stub->StreamAttention(&ctx, req);
    v1::StreamAttentionResponse msg;
    absl::Status local;
    v1::StreamTrailer trailer;
    bool have_trailer = false;
    auto last_progress = std::chrono::steady_clock::now();
    int layers_captured = 0;
    while (local.ok() && reader->Read(&msg)) {
      switch (msg.event_case()) {
        case v1::StreamAttentionResponse::kHeader:
          std::cout << "Processing sample " << i
                    << ", input length: " << msg.header().prompt_token_ids_size() << std::endl;
          layers_captured = msg.header().capture().layers_size();
          if (save) local = writer.OnHeader(msg.header(), req.max_new_tokens());
          break;
        case v1::StreamAttentionResponse::kToken:
          local = writer.OnToken(msg.token());
          break;
        case v1::StreamAttentionResponse::kAttention:
          if (save) local = writer.OnAttention(msg.attention());
          break;
        case v1::StreamAttentionResponse::kStatistic:
          if (save) local = writer.OnStatistic(msg.statistic());
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
      if (now - last_progress > std::chrono::seconds(1)) {
        std::cerr << "\r  received " << writer.bytes_received() / 1e6 << " MB, " << writer.tokens()
                  << " tokens" << std::flush;
        last_progress = now;
      }
    }
    if (!local.ok()) ctx.TryCancel();
    grpc::Status status = reader->Finish();
    if (local.ok() && status.ok() && !have_trailer) {
      local = absl::DataLossError("the stream ended without its trailer (a proxy cut it short?)");
    }
    if (!local.ok() || !status.ok()) {
      std::cerr << "\nSample " << i << " failed: "
                << (local.ok() ? status.error_message() : std::string(local.message()))
                << std::endl;
      ++failures;
      continue;
    }
    std::cout << "Generated: " << trailer.text() << std::endl;
    if (save) {
      absl::Status s = writer.Finish(trailer, sample.is_ids ? "" : sample.text);
      if (!s.ok()) {
        std::cerr << "Sample " << i << " could not be saved: " << s.message() << std::endl;
        ++failures;
        continue;
      }
      std::cout << "Saved attention data for sample " << i << " with " << layers_captured
                << " layers" << std::endl;
    }
  }
  std::cout << "Done!" << std::endl;
  return failures == 0 ? 0 : 1;
}

}  // namespace
}  // namespace attnscope

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Streams generations with attention from an attnscope server into sample files.");
  absl::ParseCommandLine(argc, argv);
  return attnscope::Run();
}
