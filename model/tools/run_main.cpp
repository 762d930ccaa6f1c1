// attnscope-run: runs the engine directly on token ids and stores what it captured in a
// safetensors file. For tests (fidelity against an independent reference) and benchmarks.
//
// Tensors written: "prompt" and "tokens" (I64); "logits" (F32 [steps, vocab]) with --logits;
// "attn/<phase>/<step>/<layer>/<query_begin>" per attention block (+ "/indices" for top_k);
// "stat/<kind>/<phase>/<step>/<layer>/<query_begin>" per statistics block. A JSON summary
// (tokens, finish reason, timings, bytes, peak RSS) is printed on stdout.
#include <sys/resource.h>

#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "model/engine.h"
#include "model/safetensors_writer.h"
#include "model/status_macros.h"

ABSL_FLAG(std::string, model_dir, "", "Hugging Face checkpoint folder");
ABSL_FLAG(std::string, device, "cpu", "cpu, cuda or cuda:N");
ABSL_FLAG(std::string, compute_dtype, "", "float32, bfloat16 or float16 (default: float32 on CPU)");
ABSL_FLAG(std::string, prompt_ids, "", "comma-separated prompt token ids");
ABSL_FLAG(int64_t, random_prompt, 0, "instead of --prompt_ids: this many pseudo-random ids");
ABSL_FLAG(int64_t, max_new_tokens, 8, "tokens to generate");
ABSL_FLAG(bool, ignore_eos, true, "keep generating past eos ids");
ABSL_FLAG(double, temperature, 0.0, "0 = greedy");
ABSL_FLAG(int64_t, top_k, 0, "sampling top-k (0 = off)");
ABSL_FLAG(double, top_p, 1.0, "sampling top-p (1 = off)");
ABSL_FLAG(uint64_t, seed, 0, "sampling seed");
ABSL_FLAG(std::string, layers, "", "captured layers, comma-separated (empty: all)");
ABSL_FLAG(std::string, heads, "", "captured heads, comma-separated (empty: all)");
ABSL_FLAG(std::string, phases, "prefill,decode", "prefill, decode or both");
ABSL_FLAG(std::string, form, "dense", "none, dense, head_mean, head_max, pooled, top_k");
ABSL_FLAG(int64_t, pool, 0, "tile side for --form pooled");
ABSL_FLAG(std::string, pool_op, "mean", "mean or max");
ABSL_FLAG(int64_t, capture_top_k, 0, "k for --form top_k");
ABSL_FLAG(int64_t, last_queries, 0, "capture only the last N prompt rows");
ABSL_FLAG(std::string, query_ranges, "", "prompt rows to capture, e.g. 0:4,10:12");
ABSL_FLAG(std::string, stats, "", "entropy,key_score:W,sink:K,local:W,variance");
ABSL_FLAG(std::string, element_type, "float32", "float32, float16 or bfloat16");
ABSL_FLAG(int64_t, query_block, 128, "attention rows materialized at once");
ABSL_FLAG(int64_t, block_elements, int64_t{1} << 24,
          "at most this many probabilities at once (0: no limit)");
ABSL_FLAG(bool, fast_attention, true, "fused attention for layers not captured (libtorch >= 2)");
ABSL_FLAG(bool, logits, false, "store the logits of every step");
ABSL_FLAG(std::string, out, "", "output safetensors file (empty: count bytes only)");

namespace attnscope {
namespace {

absl::StatusOr<std::vector<int64_t>> ParseInts(const std::string& text) {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int64_t v;
    if (!absl::SimpleAtoi(part, &v))
      return absl::InvalidArgumentError(absl::StrCat("not an integer: ", part));
    out.push_back(v);
  }
  return out;
}

class StoringSink : public AttentionSink {
 public:
  StoringSink(SafetensorsWriter* writer, bool logits) : writer_(writer), want_logits_(logits) {}
  absl::Status OnAttention(const AttentionBlock& b) override {
    const std::string name =
        absl::StrCat("attn/", PhaseName(b.phase), "/", b.step, "/", b.layer, "/", b.query_begin);
    Store(name, b.values);
    if (b.indices.defined()) Store(name + "/indices", b.indices);
    return absl::OkStatus();
  }
  absl::Status OnStatistic(const StatBlock& s) override {
    Store(absl::StrCat("stat/", StatKindName(s.kind), "/", PhaseName(s.phase), "/", s.step, "/",
                       s.layer, "/", s.query_begin),
          s.values);
    return absl::OkStatus();
  }
  bool WantsLogits() const override { return want_logits_; }
  absl::Status OnLogits(int64_t step, const HostArray& logits) override {
    const auto* begin = static_cast<const float*>(logits.data);
    logits_.insert(logits_.end(), begin, begin + logits.numel());
    ++logits_steps_;
    return absl::OkStatus();
  }
  int64_t bytes() const { return bytes_; }
  int64_t blocks() const { return blocks_; }
  // [steps, vocab] float32, row-major.
  const std::vector<float>& logits() const { return logits_; }
  int64_t logits_steps() const { return logits_steps_; }

 private:
  void Store(const std::string& name, const HostArray& a) {
    bytes_ += a.bytes;
    ++blocks_;
    if (writer_ != nullptr) writer_->Add(name, a.dtype, a.shape, a.data, a.bytes);
  }
  SafetensorsWriter* writer_;
  bool want_logits_;
  int64_t bytes_ = 0;
  int64_t blocks_ = 0;
  std::vector<float> logits_;
  int64_t logits_steps_ = 0;
};

absl::StatusOr<CaptureSpec> SpecFromFlags() {
  CaptureSpec spec;
  ASSIGN_OR_RETURN(spec.layers, ParseInts(absl::GetFlag(FLAGS_layers)));
  ASSIGN_OR_RETURN(spec.heads, ParseInts(absl::GetFlag(FLAGS_heads)));
  const std::string phases = absl::GetFlag(FLAGS_phases);
  spec.prefill = phases.find("prefill") != std::string::npos;
  spec.decode = phases.find("decode") != std::string::npos;
  const std::string form = absl::GetFlag(FLAGS_form);
  const std::pair<const char*, Form> forms[] = {
      {"none", Form::kNone},        {"dense", Form::kDense},   {"head_mean", Form::kHeadMean},
      {"head_max", Form::kHeadMax}, {"pooled", Form::kPooled}, {"top_k", Form::kTopK}};
  bool found = false;
  for (const auto& [name, f] : forms) {
    if (form == name) spec.form = f, found = true;
  }
  if (!found) return absl::InvalidArgumentError(absl::StrCat("unknown form ", form));
  spec.pool = absl::GetFlag(FLAGS_pool);
  spec.pool_op = absl::GetFlag(FLAGS_pool_op) == "max" ? PoolOp::kMax : PoolOp::kMean;
  spec.top_k = absl::GetFlag(FLAGS_capture_top_k);
  spec.last_queries = absl::GetFlag(FLAGS_last_queries);
  for (absl::string_view r :
       absl::StrSplit(absl::GetFlag(FLAGS_query_ranges), ',', absl::SkipEmpty())) {
    std::vector<std::string> ab = absl::StrSplit(r, ':');
    QueryRange q;
    if (ab.size() != 2 || !absl::SimpleAtoi(ab[0], &q.begin) || !absl::SimpleAtoi(ab[1], &q.end)) {
      return absl::InvalidArgumentError(absl::StrCat("bad query range ", r));
    }
    spec.query_ranges.push_back(q);
  }
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_stats), ',', absl::SkipEmpty())) {
    std::vector<std::string> kv = absl::StrSplit(s, ':');
    int64_t v = 0;
    if (kv.size() == 2 && !absl::SimpleAtoi(kv[1], &v))
      return absl::InvalidArgumentError(absl::StrCat("bad stat ", s));
    if (kv[0] == "entropy")
      spec.stats.row_entropy = true;
    else if (kv[0] == "key_score")
      spec.stats.key_score_window = v;
    else if (kv[0] == "sink")
      spec.stats.sink_tokens = v;
    else if (kv[0] == "local")
      spec.stats.local_window = v;
    else if (kv[0] == "variance")
      spec.stats.key_score_variance = true;
    else
      return absl::InvalidArgumentError(absl::StrCat("unknown statistic ", s));
  }
  const std::string et = absl::GetFlag(FLAGS_element_type);
  spec.element_type = et == "float16"    ? ElementType::kFloat16
                      : et == "bfloat16" ? ElementType::kBFloat16
                                         : ElementType::kFloat32;
  return spec;
}

absl::Status Run() {
  EngineOptions options;
  options.model_dir = absl::GetFlag(FLAGS_model_dir);
  options.device = absl::GetFlag(FLAGS_device);
  options.dtype = absl::GetFlag(FLAGS_compute_dtype);
  options.query_block = absl::GetFlag(FLAGS_query_block);
  options.block_elements = absl::GetFlag(FLAGS_block_elements);
  options.fast_attention = absl::GetFlag(FLAGS_fast_attention);
  auto t0 = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(auto engine, Engine::Load(options));
  const double load_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

  GenerateRequest request;
  ASSIGN_OR_RETURN(request.prompt_ids, ParseInts(absl::GetFlag(FLAGS_prompt_ids)));
  if (const int64_t n = absl::GetFlag(FLAGS_random_prompt); n > 0) {
    uint64_t x = 88172645463325252ull;  // xorshift64: the same ids on every run
    for (int64_t i = 0; i < n; ++i) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      request.prompt_ids.push_back(
          static_cast<int64_t>(x % static_cast<uint64_t>(engine->info().vocab_size)));
    }
  }
  request.max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  request.ignore_eos = absl::GetFlag(FLAGS_ignore_eos);
  request.sampling.temperature = absl::GetFlag(FLAGS_temperature);
  request.sampling.top_k = absl::GetFlag(FLAGS_top_k);
  request.sampling.top_p = absl::GetFlag(FLAGS_top_p);
  request.sampling.seed = absl::GetFlag(FLAGS_seed);
  ASSIGN_OR_RETURN(CaptureSpec spec, SpecFromFlags());

  const std::string out = absl::GetFlag(FLAGS_out);
  SafetensorsWriter writer;
  StoringSink sink(out.empty() ? nullptr : &writer, absl::GetFlag(FLAGS_logits));
  ASSIGN_OR_RETURN(GenerateResult result, engine->Generate(request, spec, &sink, nullptr));

  if (!out.empty()) {
    writer.Add("prompt", "I64", {static_cast<int64_t>(request.prompt_ids.size())},
               request.prompt_ids.data(), request.prompt_ids.size() * sizeof(int64_t));
    writer.Add("tokens", "I64", {static_cast<int64_t>(result.tokens.size())}, result.tokens.data(),
               result.tokens.size() * sizeof(int64_t));
    if (sink.logits_steps() > 0) {
      const int64_t steps = sink.logits_steps(),
                    vocab = static_cast<int64_t>(sink.logits().size()) / steps;
      writer.Add("logits", "F32", {steps, vocab}, sink.logits().data(),
                 sink.logits().size() * sizeof(float));
    }
    RETURN_IF_ERROR(writer.Write(out));
  }
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
  };
  std::cout << summary.dump() << std::endl;
  return absl::OkStatus();
}

}  // namespace
}  // namespace attnscope

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  absl::Status status = attnscope::Run();
  if (!status.ok()) {
    std::cerr << "attnscope-run: " << status << std::endl;
    return 1;
  }
  return 0;
}
