// The engine API: load a checkpoint folder, describe the model, generate with attention capture.
// Nothing here knows about gRPC or libtorch; the server reaches the model only through this header.
#pragma once

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/block.h"
#include "engine/bounds.h"
#include "engine/checkpoint/config.h"
#include "engine/intervention.h"
#include "engine/sampling.h"
#include "text/chat/chat.h"
#include "text/chat/chat_template.h"

namespace attnscope {

class Transformer;
class Tokenizer;

struct EngineOptions {
  std::string model_dir;       // Hugging Face checkpoint folder
  std::string device = "cpu";  // "cpu", "cuda" or "cuda:N"
  std::string dtype;  // "float32", "bfloat16", "float16"; empty: float32 on CPU, bfloat16 on CUDA
  int64_t query_block = kQueryBlock;        // attention rows at once for captured layers
  int64_t block_elements = kBlockElements;  // and at most this many probabilities (flat memory)
  bool fast_attention = true;  // fused attention for layers not captured (libtorch >= 2.0)
  // Greedy decoding that captures nothing in the decode phase (no interventions, no logits): each
  // step is queued before the host has read the token it feeds, which stays on the device; the
  // host reads the tokens one step behind, so the device never waits for it. After a stop the
  // queued step is dropped. "auto": on for CUDA (on the CPU, where a step runs as it is queued,
  // that dropped step would cost its full time); "on"; "off".
  std::string decode_lookahead = "auto";
  // Captured blocks' host copies queued behind the work that computes them, the blocks handed to
  // the sink once copied (in order, at the latest before the next token): the device does not
  // wait for the host at every block. With it the lookahead also covers decode steps that capture
  // statistics only (no form, no key-score variance): their blocks wait for the stop check.
  // "auto": on for CUDA (on the CPU a copy is done when it is queued; "on" there only clones the
  // blocks); "on"; "off".
  std::string queued_copies = "auto";
  // Load ends with a short generation that captures dense blocks and every statistic once (16
  // prompt tokens, 2 new), so the first request does not pay for the device's libraries and kernels
  // loading. "auto": on for CUDA; "on"; "off".
  std::string warmup = "auto";
};

// The one description of a served model: the checkpoint's configuration as read (ModelConfig:
// layers, heads, vocabulary, context, eos ids, ...) plus what loading decided. The server's
// GetModelInfo is this, field by field (server/convert.cpp FillModelInfo).
struct ModelInfo : ModelConfig {
  std::string model_dir;
  std::string dtype;
  std::string device;
  bool has_tokenizer = false;
  // "template" (the checkpoint's own chat template), else a built-in format for checkpoints
  // without one: llama2, llama3, mistral, chatml; empty: none.
  std::string chat_format;
  std::string chat_template_source;  // the file the template came from
  std::string chat_template_error;   // why it did not parse (chat requests then fail with it)
};

struct GenerateRequest {
  std::vector<int64_t> prompt_ids;
  int64_t max_new_tokens = 16;  // >= 0 (0: the forward pass over the prompt only)
  SamplingParams sampling;
  std::vector<int64_t> stop_token_ids;  // besides the model's eos ids
  bool ignore_eos = false;
  // Non-empty: the intervened model generates (and is captured), the unmodified model runs beside
  // it on the same tokens, and the sink gets each step's DivergenceStep. reference_leads and
  // capture_reference need interventions (INVALID_ARGUMENT otherwise).
  Interventions interventions;
  bool reference_leads = false;    // the unmodified model chooses the tokens instead
  bool capture_reference = false;  // the captures are of the unmodified model's run instead
};

// A request and capture spec Engine::Validate accepted. Only Validate makes one, so Generate takes
// it without checking it again (the server validates before it answers with a header).
class ValidatedRequest {
 public:
  const GenerateRequest& request() const { return request_; }
  const CaptureSpec& capture() const { return capture_; }
  // The same without matrices (form none): statistics only, still valid.
  ValidatedRequest StatisticsOnly() const {
    ValidatedRequest r = *this;
    r.capture_.form = Form::kNone;
    return r;
  }

 private:
  friend class Engine;
  ValidatedRequest(GenerateRequest request, CaptureSpec capture)
      : request_(std::move(request)), capture_(std::move(capture)) {}
  GenerateRequest request_;
  CaptureSpec capture_;
};

enum class FinishReason { kEos, kStopToken, kLength, kContextFull, kCancelled };
inline constexpr Named<FinishReason> kFinishReasons[] = {
    {FinishReason::kEos, "eos"},
    {FinishReason::kStopToken, "stop_token"},
    {FinishReason::kLength, "length"},
    {FinishReason::kContextFull, "context_full"},
    {FinishReason::kCancelled, "cancelled"},
};
inline const char* FinishReasonName(FinishReason reason) {
  return RowOf(kFinishReasons, reason).name;
}

struct Timings {
  double prefill_ms = 0;
  double decode_ms = 0;  // all decode steps together
};

struct GenerateResult {
  std::vector<int64_t> tokens;  // generated ids, the stop token included
  FinishReason finish = FinishReason::kLength;
  Timings timings;
  int64_t decode_steps = 0;  // forward passes after prefill
};

// Set from any thread; the generation stops before its next step.
class CancelToken {
 public:
  void Cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }

 private:
  std::atomic<bool> cancelled_{false};
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Load(const EngineOptions& options);
  ~Engine();

  const ModelInfo& info() const { return info_; }

  // Text must be UTF-8 (INVALID_ARGUMENT) and needs a tokenizer: FAILED_PRECONDITION in token-id
  // mode (a folder without tokenizer files). Decode's ids must be in the vocabulary (OUT_OF_RANGE).
  // These checks are the engine's alone: the server passes requests on unchecked.
  // `max_tokens` > 0: a text of more tokens is OUT_OF_RANGE, found without encoding all of it
  // (a prompt that cannot fit the context costs the server little).
  absl::StatusOr<std::vector<int64_t>> Encode(const std::string& text,
                                              bool add_special_tokens = true,
                                              int64_t max_tokens = 0) const;
  absl::StatusOr<std::string> Decode(const std::vector<int64_t>& ids,
                                     bool skip_special_tokens) const;
  // Display text of each id ("" for all in token-id mode).
  std::vector<std::string> Pieces(const std::vector<int64_t>& ids) const;
  // The chat rendered with the checkpoint's chat template (template variables from
  // `template_kwargs_json`, a JSON object or empty) or, without one, the family's built-in format,
  // then encoded without adding special tokens (the rendered text carries them).
  // `max_tokens` > 0 as for Encode; rendering stops too once its text cannot fit that many.
  absl::StatusOr<std::vector<int64_t>> EncodeChat(const std::vector<ChatMessage>& messages,
                                                  const std::string& template_kwargs_json = "",
                                                  int64_t max_tokens = 0) const;

  // Checks a request and its capture spec without running anything.
  absl::StatusOr<ValidatedRequest> Validate(GenerateRequest request, CaptureSpec capture) const;

  // Prefill, then one token per step; attention blocks and tokens go to `sink` as computed.
  // Safe to call from several threads at once. `sink` and `cancel` may be null.
  absl::StatusOr<GenerateResult> Generate(const ValidatedRequest& request, AttentionSink* sink,
                                          const CancelToken* cancel) const;
  // The same for a request not validated yet: Validate, then Generate.
  absl::StatusOr<GenerateResult> Generate(const GenerateRequest& request,
                                          const CaptureSpec& capture, AttentionSink* sink,
                                          const CancelToken* cancel) const;

 private:
  Engine() = default;
  absl::Status NeedTokenizer() const;
  absl::Status TooLong(int64_t max_tokens) const;  // OUT_OF_RANGE: past the context
  absl::Status Warmup() const;                     // EngineOptions::warmup's generation
  EngineOptions options_;
  bool lookahead_ = false;      // options_.decode_lookahead, resolved for the device
  bool queued_copies_ = false;  // options_.queued_copies, resolved for the device
  ModelInfo info_;
  std::unique_ptr<Transformer> transformer_;
  std::unique_ptr<Tokenizer> tokenizer_;
  ChatFormat chat_format_ = ChatFormat::kNone;
  std::optional<ChatTemplate> chat_template_;
};

}  // namespace attnscope
