// attnscope-run: runs the engine directly on token ids and stores what it captured in a
// safetensors file. For tests (fidelity against an independent reference) and benchmarks.
//
// Tensors written: "prompt" and "tokens" (I64); "logits" (F32 [steps, vocab]) with --logits; every
// block under its stored name (core/block.h BlockName, as attnscope-capture's samples).
// The capture flags are attnscope-capture's (cli/capture_flags.h). A JSON summary (tokens,
// finish reason, timings, bytes, peak RSS) is printed on stdout; "capture" is the spec as text.
#include <sys/resource.h>

#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "cli/capture_flags.h"
#include "cli/host_memory.h"
#include "cli/usage.h"
#include "core/capture_text.h"
#include "core/intervention_text.h"
#include "core/safetensors_writer.h"
#include "core/status_macros.h"
#include "engine/engine.h"

ABSL_FLAG(std::string, model_dir, "", "Hugging Face checkpoint folder");
ABSL_FLAG(std::string, device, attnscope::EngineOptions{}.device, "cpu, cuda or cuda:N");
ABSL_FLAG(std::string, dtype, attnscope::EngineOptions{}.dtype,
          "compute type: float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)");
ABSL_FLAG(std::string, prompt_ids, "", "comma-separated prompt token ids");
ABSL_FLAG(int64_t, random_prompt, 0, "instead of --prompt_ids: this many pseudo-random ids");
ABSL_FLAG(int64_t, max_new_tokens, 8, "tokens to generate");
ABSL_FLAG(bool, ignore_eos, true, "keep generating past eos ids");
ABSL_FLAG(double, temperature, 0.0, "0 = greedy");
ABSL_FLAG(int64_t, top_k, 0, "sampling top-k (0 = off)");
ABSL_FLAG(double, top_p, 1.0, "sampling top-p (1 = off)");
ABSL_FLAG(uint64_t, seed, 0, "sampling seed");
ABSL_FLAG(int64_t, query_block, attnscope::EngineOptions{}.query_block,
          "attention rows materialized at once for captured layers");
ABSL_FLAG(int64_t, block_elements, attnscope::EngineOptions{}.block_elements,
          "at most this many probabilities at once (0: no limit)");
ABSL_FLAG(bool, fast_attention, attnscope::EngineOptions{}.fast_attention,
          "fused attention for layers not captured (libtorch >= 2)");
ABSL_FLAG(std::string, decode_lookahead, attnscope::EngineOptions{}.decode_lookahead,
          "queue each greedy decode step before reading the token it feeds (auto: on CUDA; on, "
          "off)");
ABSL_FLAG(std::string, queued_copies, attnscope::EngineOptions{}.queued_copies,
          "queue captured blocks' host copies behind the work that computes them, handing the "
          "blocks over once copied (auto: on CUDA; on, off)");
ABSL_FLAG(std::string, warmup, attnscope::EngineOptions{}.warmup,
          "end loading with a short captured generation, so the first request does not pay for "
          "the device's libraries and kernels loading (auto: on CUDA; on, off)");
ABSL_FLAG(bool, logits, false, "store the logits of every step");
ABSL_FLAG(std::string, out, "", "output safetensors file (empty: count bytes only)");

namespace attnscope {
namespace {

class StoringSink : public AttentionSink {
 public:
  StoringSink(SafetensorsWriter* writer, bool logits) : writer_(writer), want_logits_(logits) {}
  absl::Status OnBlock(const Block& b) override {
    const BlockHeader& h = b.header;
    Store(BlockName(h), RowOf(kElementTypes, h.element_type).dtype, h.shape, b.values,
          h.value_bytes());
    if (h.has_indices()) Store(IndexName(h), "I32", h.shape, b.indices, h.index_bytes());
    return absl::OkStatus();
  }
  bool WantsLogits() const override { return want_logits_; }
  absl::Status OnLogits(int64_t step, const HostArray& logits) override {
    const auto* begin = static_cast<const float*>(logits.data);
    logits_.insert(logits_.end(), begin, begin + logits.numel());
    ++logits_steps_;
    return absl::OkStatus();
  }
  absl::Status OnDivergence(const DivergenceStep& d) override {
    divergence_.push_back({{"step", d.step},
                           {"kl", d.kl},
                           {"top1_agree", d.top1_agree},
                           {"rank", d.rank},
                           {"token", d.token},
                           {"logprob_full", d.logprob_full},
                           {"logprob_intervened", d.logprob_intervened},
                           {"lost_mass", d.lost_mass}});
    return absl::OkStatus();
  }
  absl::Status OnKvDecision(const KvDecision& d) override {
    kv_decisions_.push_back({{"step", d.step},
                             {"layer", d.layer},
                             {"keys", d.keys},
                             {"kept_per_head", d.kept_per_head},
                             {"bytes_freed", d.bytes_freed},
                             {"cache_bytes", d.cache_bytes}});
    return absl::OkStatus();
  }
  int64_t bytes() const { return bytes_; }
  int64_t blocks() const { return blocks_; }
  // Per step, for a request with interventions; per layer at each KV policy decision.
  const nlohmann::json& divergence() const { return divergence_; }
  const nlohmann::json& kv_decisions() const { return kv_decisions_; }
  // [steps, vocab] float32, row-major.
  const std::vector<float>& logits() const { return logits_; }
  int64_t logits_steps() const { return logits_steps_; }

 private:
  nlohmann::json divergence_ = nlohmann::json::array();
  nlohmann::json kv_decisions_ = nlohmann::json::array();
  void Store(const std::string& name, const char* dtype, const std::vector<int64_t>& shape,
             const void* data, int64_t bytes) {
    bytes_ += bytes;
    ++blocks_;
    if (writer_ != nullptr) writer_->Add(name, dtype, shape, data, bytes);
  }
  SafetensorsWriter* writer_;
  bool want_logits_;
  int64_t bytes_ = 0;
  int64_t blocks_ = 0;
  std::vector<float> logits_;
  int64_t logits_steps_ = 0;
};

EngineOptions EngineFromFlags() {
  EngineOptions options;
  options.model_dir = absl::GetFlag(FLAGS_model_dir);
  options.device = absl::GetFlag(FLAGS_device);
  options.dtype = absl::GetFlag(FLAGS_dtype);
  options.query_block = absl::GetFlag(FLAGS_query_block);
  options.block_elements = absl::GetFlag(FLAGS_block_elements);
  options.fast_attention = absl::GetFlag(FLAGS_fast_attention);
  options.decode_lookahead = absl::GetFlag(FLAGS_decode_lookahead);
  options.queued_copies = absl::GetFlag(FLAGS_queued_copies);
  options.warmup = absl::GetFlag(FLAGS_warmup);
  return options;
}

absl::StatusOr<GenerateRequest> RequestFromFlags(int64_t vocab_size) {
  GenerateRequest request;
  ASSIGN_OR_RETURN(request.prompt_ids,
                   ParseIndexList(absl::GetFlag(FLAGS_prompt_ids), "--prompt_ids"));
  if (const int64_t n = absl::GetFlag(FLAGS_random_prompt); n > 0) {
    uint64_t x = 88172645463325252ull;  // xorshift64: the same ids on every run
    for (int64_t i = 0; i < n; ++i) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      request.prompt_ids.push_back(static_cast<int64_t>(x % static_cast<uint64_t>(vocab_size)));
    }
  }
  request.max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  request.ignore_eos = absl::GetFlag(FLAGS_ignore_eos);
  request.sampling.temperature = absl::GetFlag(FLAGS_temperature);
  request.sampling.top_k = absl::GetFlag(FLAGS_top_k);
  request.sampling.top_p = absl::GetFlag(FLAGS_top_p);
  request.sampling.seed = absl::GetFlag(FLAGS_seed);
  return request;
}

absl::Status WriteOutput(const std::string& out, const GenerateRequest& request,
                         const GenerateResult& result, const StoringSink& sink,
                         SafetensorsWriter* writer) {
  writer->Add("prompt", "I64", {static_cast<int64_t>(request.prompt_ids.size())},
              request.prompt_ids.data(), request.prompt_ids.size() * sizeof(int64_t));
  writer->Add("tokens", "I64", {static_cast<int64_t>(result.tokens.size())}, result.tokens.data(),
              result.tokens.size() * sizeof(int64_t));
  if (sink.logits_steps() > 0) {
    const int64_t steps = sink.logits_steps();
    const int64_t vocab = static_cast<int64_t>(sink.logits().size()) / steps;
    writer->Add("logits", "F32", {steps, vocab}, sink.logits().data(),
                sink.logits().size() * sizeof(float));
  }
  return writer->Write(out);
}

absl::Status Run() {
  auto t0 = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(auto engine, Engine::Load(EngineFromFlags()));
  const double load_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  ASSIGN_OR_RETURN(GenerateRequest request, RequestFromFlags(engine->info().vocab_size));
  ASSIGN_OR_RETURN(CaptureSpec spec, CaptureSpecFromFlags());
  ASSIGN_OR_RETURN(request.interventions, InterventionsFromFlags());
  request.reference_leads = ReferenceLeadsFromFlags();
  request.capture_reference = CaptureReferenceFromFlags();

  const std::string out = absl::GetFlag(FLAGS_out);
  SafetensorsWriter writer;
  StoringSink sink(out.empty() ? nullptr : &writer, absl::GetFlag(FLAGS_logits));
  ASSIGN_OR_RETURN(GenerateResult result, engine->Generate(request, spec, &sink, nullptr));
  if (!out.empty()) RETURN_IF_ERROR(WriteOutput(out, request, result, sink, &writer));

  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  const double prompt_len = static_cast<double>(request.prompt_ids.size());
  nlohmann::json summary = {
      {"tokens", result.tokens},
      {"finish", FinishReasonName(result.finish)},
      {"load_ms", load_ms},
      {"prefill_ms", result.timings.prefill_ms},
      {"decode_ms", result.timings.decode_ms},
      {"prompt_tokens", request.prompt_ids.size()},
      {"decode_steps", result.decode_steps},
      {"prefill_tok_s", prompt_len / (result.timings.prefill_ms / 1000.0)},
      {"decode_tok_s",
       result.decode_steps > 0 ? result.decode_steps / (result.timings.decode_ms / 1000.0) : 0.0},
      {"capture_bytes", sink.bytes()},
      {"capture_blocks", sink.blocks()},
      {"estimated_bytes",
       EstimateCaptureBytes(spec, engine->info().num_layers, engine->info().num_heads,
                            static_cast<int64_t>(prompt_len), request.max_new_tokens)},
      {"peak_rss_mib", usage.ru_maxrss / 1024.0},
      {"capture", FormatCaptureSpec(spec)},
  };
  if (!request.interventions.empty()) {
    const InterventionsText text = FormatInterventions(request.interventions);
    summary["interventions"] = {{"ablate", text.ablate},
                                {"knockout", text.knockout},
                                {"kv_policy", text.kv_policy},
                                {"reference_leads", request.reference_leads},
                                {"capture_reference", request.capture_reference}};
    summary["divergence"] = sink.divergence();
    summary["kv_decisions"] = sink.kv_decisions();
  }
  std::cout << summary.dump() << std::endl;
  return absl::OkStatus();
}

}  // namespace
}  // namespace attnscope

int main(int argc, char** argv) {
  attnscope::SetUsage(
      "attnscope-run",
      "one generation with attention capture in process (no server), for checks and "
      "benchmarks",
      "--model_dir DIR (--prompt_ids 1,2,3 | --random_prompt N) [--form ...] [flags]");
  attnscope::ParseFlags(argc, argv);
  attnscope::RetainFreedHostMemory(attnscope::kDefaultRetainedHostBytes);  // as the server
  absl::Status status = attnscope::Run();
  if (!status.ok()) {
    std::cerr << "attnscope-run: " << status << std::endl;
    return 1;
  }
  return 0;
}
