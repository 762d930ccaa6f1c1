#include "engine/engine.h"

#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <optional>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/device_name.h"
#include "core/status_macros.h"
#include "core/utf8.h"
#include "engine/capture_processor.h"
#include "engine/checkpoint/config.h"
#include "engine/checkpoint/weights.h"
#include "engine/device_copy.h"
#include "engine/sampler.h"
#include "engine/transformer.h"
#include "text/tokenizer/tokenizer.h"

namespace attnscope {
namespace {

// Longest generation one request may ask for.
constexpr int64_t kMaxNewTokensLimit = 1 << 20;

absl::StatusOr<torch::Device> ParseDevice(const std::string& flag) {
  const std::string name = DeviceName(flag);
  if (name == "cpu") return torch::Device(torch::kCPU);
  if (name == "cuda" || name.rfind("cuda:", 0) == 0) {
    if (!torch::cuda::is_available()) {
      return absl::FailedPreconditionError(
          absl::StrCat("device '", name,
                       "' requested but this build of libtorch "
                       "has no CUDA or no GPU is visible; use --device cpu"));
    }
    int index = 0;
    if (name.size() > 5 && !absl::SimpleAtoi(name.substr(5), &index)) {
      return absl::InvalidArgumentError(
          absl::StrCat("device '", name, "' is not cpu, cuda, cuda:N or a GPU index"));
    }
    if (index < 0 || index >= static_cast<int>(torch::cuda::device_count())) {
      return absl::OutOfRangeError(
          absl::StrCat("device '", name, "': ", torch::cuda::device_count(), " GPUs visible"));
    }
    return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("device '", name, "' is not cpu, cuda, cuda:N or a GPU index"));
}

absl::StatusOr<torch::ScalarType> ParseDType(const std::string& name, const torch::Device& device) {
  if (name.empty()) return device.is_cuda() ? torch::kBFloat16 : torch::kFloat32;
  if (name == "float32" || name == "fp32") return torch::kFloat32;
  if (name == "bfloat16" || name == "bf16") return torch::kBFloat16;
  if (name == "float16" || name == "fp16") {
    if (!device.is_cuda()) {
      return absl::FailedPreconditionError(
          "dtype float16 is for CUDA: libtorch's CPU kernels lack float16 matrix products; use "
          "float32 or bfloat16 "
          "on the CPU");
    }
    return torch::kFloat16;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("dtype '", name, "' is not float32, bfloat16 or float16"));
}

const char* DTypeName(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32:
      return "float32";
    case torch::kBFloat16:
      return "bfloat16";
    case torch::kFloat16:
      return "float16";
    default:
      return "?";
  }
}

double MsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// The host's copy of a token chosen on the device: on CUDA queued behind the work so far, and only
// that copy is waited for; work queued after it keeps the device busy meanwhile. On the CPU the
// value is there at once.
class TokenReadback {
 public:
  void Start(const torch::Tensor& token) {
    if (!token.device().is_cuda()) {
      value_ = token.item<int64_t>();
      host_ = torch::Tensor();
      return;
    }
    host_ = HostCopyQueued(token);
    copied_ = DeviceEvent(token.device());
  }
  int64_t Wait() {
    if (!host_.defined()) return value_;
    copied_.Wait();
    return host_.data_ptr<int64_t>()[0];
  }

 private:
  torch::Tensor host_;  // CUDA: the pinned copy
  DeviceEvent copied_;
  int64_t value_ = 0;
};

absl::StatusOr<bool> AutoOnOff(const std::string& what, const std::string& value,
                               const torch::Device& device) {
  if (value != "auto" && value != "on" && value != "off") {
    return absl::InvalidArgumentError(absl::StrCat(what, " '", value, "' is not auto, on or off"));
  }
  return value == "on" || (value == "auto" && device.is_cuda());
}

}  // namespace

Engine::~Engine() = default;

absl::StatusOr<std::unique_ptr<Engine>> Engine::Load(const EngineOptions& options) {
  std::unique_ptr<Engine> engine(new Engine());
  engine->options_ = options;
  ASSIGN_OR_RETURN(torch::Device device, ParseDevice(options.device));
  ASSIGN_OR_RETURN(torch::ScalarType dtype, ParseDType(options.dtype, device));
  ASSIGN_OR_RETURN(engine->lookahead_,
                   AutoOnOff("decode lookahead", options.decode_lookahead, device));
  ASSIGN_OR_RETURN(engine->queued_copies_,
                   AutoOnOff("queued copies", options.queued_copies, device));
  ASSIGN_OR_RETURN(const bool warmup, AutoOnOff("warmup", options.warmup, device));
  ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(options.model_dir));
  Weights weights;
  {
    c10::InferenceMode guard;
    ASSIGN_OR_RETURN(weights, LoadWeights(options.model_dir, config, device, dtype));
  }
  ModelInfo& info = engine->info_;
  static_cast<ModelConfig&>(info) = config;
  info.model_dir = options.model_dir;
  info.dtype = DTypeName(dtype);
  info.device = device.str();
  auto tokenizer = Tokenizer::Load(options.model_dir);
  if (tokenizer.ok()) {
    engine->tokenizer_ = std::move(*tokenizer);
    info.has_tokenizer = true;
    engine->chat_format_ = DetectChatFormat(config.arch->chat_format, engine->tokenizer_.get());
    info.chat_format = ChatFormatName(engine->chat_format_);
    ASSIGN_OR_RETURN(engine->chat_template_, ChatTemplate::Load(options.model_dir));
    if (engine->chat_template_.has_value()) {
      info.chat_format = "template";
      info.chat_template_source = engine->chat_template_->source();
      info.chat_template_error = std::string(engine->chat_template_->parse_status().message());
    }
  } else if (!absl::IsNotFound(tokenizer.status())) {
    return tokenizer.status();  // files present but unusable: say so rather than serve without them
  }
  engine->transformer_ =
      std::make_unique<Transformer>(std::move(config), std::move(weights), device, dtype);
  if (warmup) RETURN_IF_ERROR(engine->Warmup());
  return engine;
}

absl::Status Engine::Warmup() const {
  // Dense blocks and every statistic, in both phases: the fused pass, the recomputed rows and the
  // statistics' kernels run once, and the greedy token's path.
  constexpr int64_t kWarmupPromptTokens = 16;
  GenerateRequest request;
  const int64_t n = std::min<int64_t>(kWarmupPromptTokens, info_.max_position_embeddings);
  for (int64_t i = 0; i < n; ++i) request.prompt_ids.push_back(i % info_.vocab_size);
  request.max_new_tokens = 2;
  request.ignore_eos = true;
  CaptureSpec capture;
  capture.form = Form::kDense;
  capture.stats.row_entropy = true;
  capture.stats.sink_mass = 1;
  capture.stats.local_mass = 2;
  capture.stats.key_score = std::min<int64_t>(2, n);
  AttentionSink discard;
  auto warmed = Generate(request, capture, &discard, nullptr);
  if (!warmed.ok()) {
    return absl::Status(warmed.status().code(),
                        absl::StrCat("warm-up generation: ", warmed.status().message()));
  }
  return absl::OkStatus();
}

absl::Status Engine::NeedTokenizer() const {
  if (tokenizer_ != nullptr) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("the model in ", info_.model_dir,
                   " has no tokenizer.json or tokenizer.model; send token ids"));
}

absl::StatusOr<std::vector<int64_t>> Engine::Encode(const std::string& text,
                                                    bool add_special_tokens,
                                                    int64_t max_tokens) const {
  if (!utf8::IsValid(text)) return absl::InvalidArgumentError("the text is not valid UTF-8");
  RETURN_IF_ERROR(NeedTokenizer());
  if (max_tokens <= 0) return tokenizer_->Encode(text, add_special_tokens);
  std::vector<int64_t> ids = tokenizer_->EncodeAtMost(text, add_special_tokens, max_tokens);
  if (static_cast<int64_t>(ids.size()) > max_tokens) return TooLong(max_tokens);
  return ids;
}

absl::Status Engine::TooLong(int64_t max_tokens) const {
  return absl::OutOfRangeError(absl::StrCat(
      "the prompt has more than ", max_tokens, " tokens, more than the model's context of ",
      info_.max_position_embeddings, "; set max_length to truncate it in the middle"));
}

absl::StatusOr<std::string> Engine::Decode(const std::vector<int64_t>& ids,
                                           bool skip_special_tokens) const {
  for (int64_t id : ids) {
    if (id < 0 || id >= info_.vocab_size) {
      return absl::OutOfRangeError(absl::StrCat("token id ", id, " is outside the vocabulary (0-",
                                                info_.vocab_size - 1, ")"));
    }
  }
  RETURN_IF_ERROR(NeedTokenizer());
  return tokenizer_->Decode(ids, skip_special_tokens);
}

std::vector<std::string> Engine::Pieces(const std::vector<int64_t>& ids) const {
  std::vector<std::string> out;
  for (int64_t id : ids) out.push_back(tokenizer_ != nullptr ? tokenizer_->Piece(id) : "");
  return out;
}

absl::StatusOr<std::vector<int64_t>> Engine::EncodeChat(const std::vector<ChatMessage>& messages,
                                                        const std::string& template_kwargs_json,
                                                        int64_t max_tokens) const {
  RETURN_IF_ERROR(NeedTokenizer());
  std::string text;
  if (chat_template_.has_value()) {
    // A token stands for at most max_token_bytes of text (x4: normalization can shrink text,
    // NFKC by up to 3x): text longer than this cannot be max_tokens tokens.
    size_t max_output = ChatTemplate::kMaxRenderedBytes;
    if (max_tokens > 0) {
      const double fits = 4.0 * static_cast<double>(tokenizer_->max_token_bytes()) *
                          static_cast<double>(max_tokens + 1);
      max_output = static_cast<size_t>(std::min(fits, static_cast<double>(max_output)));
    }
    auto rendered = chat_template_->Render(messages, template_kwargs_json, max_output);
    if (!rendered.ok() && absl::IsResourceExhausted(rendered.status()) &&
        max_output < ChatTemplate::kMaxRenderedBytes &&
        rendered.status().message().find(absl::StrCat("more than ", max_output, " bytes")) !=
            absl::string_view::npos) {
      return TooLong(max_tokens);
    }
    if (!rendered.ok()) return rendered.status();
    text = std::move(*rendered);
  } else {
    if (!template_kwargs_json.empty()) {
      return absl::InvalidArgumentError(
          "chat_template_kwargs given, but this checkpoint has no chat template (built-in format " +
          info_.chat_format + ")");
    }
    ASSIGN_OR_RETURN(text, RenderChat(chat_format_, messages));
  }
  // The rendered text carries its special tokens (BOS included) itself.
  if (max_tokens <= 0) return tokenizer_->Encode(text, /*add_special_tokens=*/false);
  std::vector<int64_t> ids =
      tokenizer_->EncodeAtMost(text, /*add_special_tokens=*/false, max_tokens);
  if (static_cast<int64_t>(ids.size()) > max_tokens) return TooLong(max_tokens);
  return ids;
}

absl::StatusOr<ValidatedRequest> Engine::Validate(GenerateRequest request,
                                                  CaptureSpec capture) const {
  const int64_t prompt_len = static_cast<int64_t>(request.prompt_ids.size());
  if (prompt_len == 0)
    return absl::InvalidArgumentError("the prompt is empty: send at least one token");
  for (int64_t i = 0; i < prompt_len; ++i) {
    const int64_t id = request.prompt_ids[i];
    if (id < 0 || id >= info_.vocab_size) {
      return absl::OutOfRangeError(absl::StrCat("token id ", id, " at position ", i,
                                                " is outside the vocabulary (0-",
                                                info_.vocab_size - 1, ")"));
    }
  }
  if (prompt_len > info_.max_position_embeddings) {
    return absl::OutOfRangeError(absl::StrCat(
        "the prompt has ", prompt_len, " tokens, more than the model's context of ",
        info_.max_position_embeddings, "; set max_length to truncate it in the middle"));
  }
  if (request.max_new_tokens < 0 || request.max_new_tokens > kMaxNewTokensLimit) {
    return absl::OutOfRangeError(absl::StrCat("max_new_tokens = ", request.max_new_tokens,
                                              " must be in [0, ", kMaxNewTokensLimit,
                                              "] (0: the prompt only)"));
  }
  const auto& s = request.sampling;
  if (!(s.temperature >= 0.0))
    return absl::InvalidArgumentError("temperature must be >= 0 (0 = greedy)");
  if (s.top_k < 0) return absl::InvalidArgumentError("top_k must be >= 0 (0 = off)");
  if (!(s.top_p > 0.0 && s.top_p <= 1.0))
    return absl::InvalidArgumentError("top_p must be in (0, 1]");
  for (int64_t id : request.stop_token_ids) {
    if (id < 0 || id >= info_.vocab_size) {
      return absl::OutOfRangeError(absl::StrCat(
          "stop token id ", id, " is outside the vocabulary (0-", info_.vocab_size - 1, ")"));
    }
  }
  RETURN_IF_ERROR(ValidateCaptureSpec(capture, info_.num_layers, info_.num_heads, prompt_len));
  RETURN_IF_ERROR(ValidateInterventions(request.interventions, info_.num_layers, info_.num_heads,
                                        info_.num_kv_heads, prompt_len,
                                        info_.max_position_embeddings));
  if (request.interventions.empty() && (request.reference_leads || request.capture_reference)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "interventions.", request.reference_leads ? "reference_leads" : "capture_reference",
        " needs an intervention (ablations, knockouts or kv_policy): without one there is no "
        "reference run beside the request's"));
  }
  if (capture.form == Form::kPooled) {
    // A tile's rows are computed together (blocks never split a tile): pool rows over the prompt's
    // keys for every head. Up to kPoolRowsAlwaysAllowed rows are always allowed; more must fit
    // the block budget.
    constexpr int64_t kPoolRowsAlwaysAllowed = 64;
    const int64_t rows = std::min(capture.pool, prompt_len);
    const int64_t limit =
        std::max(options_.block_elements, info_.num_heads * prompt_len * kPoolRowsAlwaysAllowed);
    if (rows > kPoolRowsAlwaysAllowed && info_.num_heads * rows * prompt_len > limit) {
      return absl::InvalidArgumentError(absl::StrCat(
          "pool ", capture.pool, " needs ", rows, " attention rows at once (", info_.num_heads,
          " heads x ", rows, " rows x ", prompt_len,
          " keys = ", info_.num_heads * rows * prompt_len,
          " probabilities), over the server's block budget of ", limit, "; use pool <= ",
          std::max(kPoolRowsAlwaysAllowed,
                   limit / std::max<int64_t>(1, info_.num_heads * prompt_len)),
          " (or start the server with a larger --block_elements)"));
    }
  }
  return ValidatedRequest(std::move(request), std::move(capture));
}

namespace {

// One step's divergence of the intervened model from the full one (both logits [vocab]).
DivergenceStep Divergence(int64_t step, int64_t token, const torch::Tensor& full,
                          const torch::Tensor& intervened,
                          const std::vector<torch::Tensor>& hidden_mass, int64_t num_layers,
                          int64_t num_heads) {
  DivergenceStep d;
  d.step = step;
  const torch::Tensor lp_full = torch::log_softmax(full.to(torch::kFloat64), -1);
  const torch::Tensor lp_int = torch::log_softmax(intervened.to(torch::kFloat64), -1);
  d.kl = (lp_full.exp() * (lp_full - lp_int)).sum().item<double>();
  d.top1_agree = full.argmax().item<int64_t>() == intervened.argmax().item<int64_t>();
  d.rank = 1 + full.gt(full[token]).sum().item<int64_t>();
  d.token = token;
  d.logprob_full = lp_full[token].item<double>();
  d.logprob_intervened = lp_int[token].item<double>();
  d.lost_mass.assign(num_layers * num_heads, 0.0f);
  for (int64_t l = 0; l < num_layers && l < static_cast<int64_t>(hidden_mass.size()); ++l) {
    if (!hidden_mass[l].defined()) continue;  // nothing hidden in this layer
    const torch::Tensor mass = hidden_mass[l].to(torch::kFloat32).cpu().contiguous();
    std::copy_n(mass.data_ptr<float>(), num_heads, d.lost_mass.begin() + l * num_heads);
  }
  return d;
}

}  // namespace

absl::StatusOr<GenerateResult> Engine::Generate(const GenerateRequest& request,
                                                const CaptureSpec& capture, AttentionSink* sink,
                                                const CancelToken* cancel) const {
  ASSIGN_OR_RETURN(const ValidatedRequest valid, Validate(request, capture));
  return Generate(valid, sink, cancel);
}

absl::StatusOr<GenerateResult> Engine::Generate(const ValidatedRequest& valid, AttentionSink* sink,
                                                const CancelToken* cancel) const {
  const GenerateRequest& request = valid.request();
  const CaptureSpec& capture = valid.capture();
  try {
    c10::InferenceMode guard;
    const int64_t prompt_len = static_cast<int64_t>(request.prompt_ids.size());
    // The last generated token is never fed, so the cache holds prompt + max_new_tokens - 1.
    const int64_t capacity =
        std::min(prompt_len + request.max_new_tokens - 1, info_.max_position_embeddings);
    KVCache cache = transformer_->NewCache(std::max(capacity, prompt_len));
    CaptureProcessor processor(capture, info_.num_layers, info_.num_heads, prompt_len, sink,
                               queued_copies_);
    ForwardOptions fwd;
    fwd.query_block = options_.query_block;
    fwd.block_elements = options_.block_elements;
    // Pooled tiles start at multiples of the tile side, so blocks must not split a tile.
    if (capture.form == Form::kPooled) fwd.row_multiple = capture.pool;
    fwd.fast_attention = options_.fast_attention;
    Sampler sampler(request.sampling);
    GenerateResult result;
    // Interventions: the intervened run (this cache) and the unmodified reference (its own cache)
    // in lock-step on the same tokens.
    const bool what_if = !request.interventions.empty();
    ForwardInterventions intervened, reference;
    KVCache reference_cache;
    if (what_if) {
      for (int64_t l = 0; l < info_.num_layers; ++l) {
        intervened.layers.emplace_back(request.interventions, l, info_.num_heads);
      }
      reference.layers = intervened.layers;
      reference.measure = true;
      reference_cache = transformer_->NewCache(cache.capacity);
    }
    torch::Tensor reference_logits;
    // The captures' run: the intervened one, or the reference on request (capture_reference).
    CaptureProcessor* intervened_capture =
        what_if && request.capture_reference ? nullptr : &processor;
    CaptureProcessor* reference_capture =
        what_if && request.capture_reference ? &processor : nullptr;

    auto is_cancelled = [&] { return cancel != nullptr && cancel->cancelled(); };
    if (is_cancelled()) {
      result.finish = FinishReason::kCancelled;
      return result;
    }
    auto t0 = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(
        torch::Tensor logits,
        transformer_->Forward(request.prompt_ids, &cache, intervened_capture, Phase::kPrefill, 0,
                              fwd, what_if ? &intervened : nullptr));
    if (what_if) {
      RETURN_IF_ERROR(processor.Flush());  // the blocks before the decisions, as they were made
      for (const KvDecision& decision : intervened.decisions) {
        if (sink != nullptr) RETURN_IF_ERROR(sink->OnKvDecision(decision));
      }
      reference.layers = intervened.layers;  // with the policy's evictions, for the measure
      ASSIGN_OR_RETURN(reference_logits, transformer_->Forward(request.prompt_ids, &reference_cache,
                                                               reference_capture, Phase::kPrefill,
                                                               0, fwd, &reference));
    }
    WaitForDevice(logits.device());  // the prefill's time, not the time to queue it
    result.timings.prefill_ms = MsSince(t0);
    t0 = std::chrono::steady_clock::now();
    // max_new_tokens 0: the forward pass over the prompt is all (its captures, no token).
    if (request.max_new_tokens == 0) result.finish = FinishReason::kLength;
    // Greedy decoding without interventions or logits chooses each token on the device and feeds
    // it from there; the host reads it back for the stream and the stop checks. With lookahead the
    // next step is queued before that read: where the decode phase captures nothing, or only
    // statistics whose blocks wait in the processor for the stop check (queued copies; dropped
    // after a stop). Matrices are too large to hold back, and the key-score variance would
    // already have summed a dropped step.
    // On the CPU the logits are host memory already and the host's scan is cheaper than torch's
    // argmax and item() (4 against 50 µs over 32000 logits), so there the path is taken only for
    // the lookahead.
    const bool device_tokens = (logits.is_cuda() || lookahead_) &&
                               request.sampling.temperature <= 0 && !what_if &&
                               (sink == nullptr || !sink->WantsLogits());
    bool decode_captured = false;
    for (int64_t l = 0; l < info_.num_layers; ++l)
      decode_captured = decode_captured || processor.Wants(Phase::kDecode, l);
    const bool statistics_held =
        queued_copies_ && capture.form == Form::kNone && !capture.stats.key_score_variance;
    const bool lookahead = device_tokens && lookahead_ && (!decode_captured || statistics_held);
    TokenReadback readback;
    for (int64_t step = 1; request.max_new_tokens > 0; ++step) {
      torch::Tensor fed;  // device_tokens: the token, (1) int64 on the device
      // Lookahead: the next step's logits, queued before the read; after a stop they are dropped
      // unread (and an error they carry with them).
      std::optional<absl::StatusOr<torch::Tensor>> queued;
      const int64_t length = cache.length;
      int64_t token = 0;
      if (device_tokens) {
        fed = logits.argmax().reshape({1});  // the first maximum, as the sampler's greedy choice
        readback.Start(fed);
        // Not past a stop the host already knows of: the last step, a full cache, a cancel.
        if (lookahead && step < request.max_new_tokens && cache.length < cache.capacity &&
            !is_cancelled()) {
          processor.HoldFrom(step);
          queued = transformer_->Forward(fed, &cache, intervened_capture, Phase::kDecode, step, fwd,
                                         nullptr);
        }
        token = readback.Wait();
      }
      // The blocks of the steps before this token (the prefill's, the last step's), before it.
      RETURN_IF_ERROR(processor.Flush(step - 1));
      if (sink != nullptr && sink->WantsLogits()) {
        const torch::Tensor host = logits.to(torch::kFloat32).cpu().contiguous();
        HostArray view;
        view.data = host.data_ptr();
        view.shape = {host.numel()};
        view.bytes = host.numel() * 4;
        RETURN_IF_ERROR(sink->OnLogits(step, view));
      }
      if (!device_tokens) {
        token = sampler.Next(what_if && request.reference_leads ? reference_logits : logits);
      }
      result.tokens.push_back(token);
      if (what_if && sink != nullptr) {
        RETURN_IF_ERROR(sink->OnDivergence(Divergence(step, token, reference_logits, logits,
                                                      reference.hidden_mass, info_.num_layers,
                                                      info_.num_heads)));
      }
      if (sink != nullptr) RETURN_IF_ERROR(sink->OnToken(step, token));
      const auto& eos = info_.eos_token_ids;
      const auto& stop = request.stop_token_ids;
      if (!request.ignore_eos && std::find(eos.begin(), eos.end(), token) != eos.end()) {
        result.finish = FinishReason::kEos;
        break;
      }
      if (std::find(stop.begin(), stop.end(), token) != stop.end()) {
        result.finish = FinishReason::kStopToken;
        break;
      }
      if (step == request.max_new_tokens) {
        result.finish = FinishReason::kLength;
        break;
      }
      if (length >= cache.capacity) {
        result.finish = FinishReason::kContextFull;
        break;
      }
      if (is_cancelled()) {
        result.finish = FinishReason::kCancelled;
        break;
      }
      if (queued.has_value()) {
        ASSIGN_OR_RETURN(logits, std::move(*queued));
      } else if (device_tokens) {
        ASSIGN_OR_RETURN(logits, transformer_->Forward(fed, &cache, intervened_capture,
                                                       Phase::kDecode, step, fwd, nullptr));
      } else {
        ASSIGN_OR_RETURN(
            logits, transformer_->Forward({token}, &cache, intervened_capture, Phase::kDecode, step,
                                          fwd, what_if ? &intervened : nullptr));
      }
      if (what_if) {
        ASSIGN_OR_RETURN(reference_logits,
                         transformer_->Forward({token}, &reference_cache, reference_capture,
                                               Phase::kDecode, step, fwd, &reference));
        // A decision after this step (decode_interval): its evictions hide keys from the next
        // rows on, in the intervened run and in the reference's measure.
        if (!intervened.decisions.empty()) {
          RETURN_IF_ERROR(processor.Flush());
          for (const KvDecision& decision : intervened.decisions) {
            if (sink != nullptr) RETURN_IF_ERROR(sink->OnKvDecision(decision));
          }
          reference.layers = intervened.layers;
        }
      }
      ++result.decode_steps;
    }
    result.timings.decode_ms = MsSince(t0);
    processor.Drop(result.decode_steps + 1);  // a step queued past the stop
    RETURN_IF_ERROR(processor.Finish());
    return result;
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    if (what.find("out of memory") != std::string::npos) {
      return absl::ResourceExhaustedError(
          absl::StrCat("out of memory on ", info_.device,
                       "; capture fewer layers or use statistics/pooled forms: ", what));
    }
    return absl::InternalError(absl::StrCat("libtorch error: ", what));
  }
}

}  // namespace attnscope
