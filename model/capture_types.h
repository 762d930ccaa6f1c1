// What to capture of the model's attention (CaptureSpec), the blocks handed out as they are
// computed (AttentionBlock, StatBlock) and the sink that receives them. No libtorch here: blocks
// carry plain host memory, so that the server and the tools see bytes and shapes, not tensors
// (the engine's CaptureProcessor, in capture.h, fills them).
//
// Attention weights are softmax(q·kᵀ/sqrt(head_dim) + mask) in float32, q and k after RoPE, per
// query head (a query head reads the key/value head it shares under GQA), exactly what eager
// `transformers` returns with output_attentions=True.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace attnscope {

enum class Phase { kPrefill, kDecode };
enum class Form {
  kNone,      // matrices off: statistics only
  kDense,     // probabilities: [heads, queries, keys]
  kHeadMean,  // mean over the selected heads: [1, queries, keys]
  kHeadMax,   // max over the selected heads: [1, queries, keys]
  kPooled,    // p×p tiles (mean or max): [heads, ceil(queries/p), ceil(keys/p)]
  kTopK,      // k largest per query row: values and key indices [heads, queries, k]
};
enum class PoolOp { kMean, kMax };
enum class ElementType { kFloat32, kFloat16, kBFloat16 };

const char* PhaseName(Phase phase);
const char* FormName(Form form);
const char* ElementTypeName(ElementType type);
int64_t ElementSize(ElementType type);

// Half-open range [begin, end) of prompt positions.
struct QueryRange {
  int64_t begin = 0;
  int64_t end = 0;
};

// Small per-layer, per-head statistics, computed where the probabilities are.
struct StatisticsSpec {
  bool row_entropy = false;         // entropy (nats) of each attention row: [heads, queries]
  int64_t key_score_window = 0;     // W > 0: attention each key receives summed over the last W
                                    // prompt queries (SnapKV / H2O score): [heads, prompt]
  int64_t sink_tokens = 0;          // k > 0: mass on positions [0, k) per row: [heads, queries]
  int64_t local_window = 0;         // w > 0: mass on the last w positions (the query's own
                                    // included) per row: [heads, queries]
  bool key_score_variance = false;  // per prompt key, variance (ddof 0) over decode steps of the
                                    // attention it receives: [heads, prompt]
  bool Any() const {
    return row_entropy || key_score_window > 0 || sink_tokens > 0 || local_window > 0 ||
           key_score_variance;
  }
};

struct CaptureSpec {
  std::vector<int64_t> layers;  // empty: every layer
  std::vector<int64_t> heads;   // empty: every query head
  bool prefill = true;
  bool decode = true;
  // Prompt rows (prefill). At most one of the two; both empty: every row. Decode rows are the
  // generated tokens' and are all captured when `decode` is set.
  int64_t last_queries = 0;              // > 0: the last N prompt rows (SnapKV observation window)
  std::vector<QueryRange> query_ranges;  // explicit prompt rows
  Form form = Form::kNone;               // kNone: no matrices (statistics only, or nothing)
  int64_t pool = 0;                      // tile side, kPooled
  PoolOp pool_op = PoolOp::kMean;        // kPooled
  int64_t top_k = 0;                     // kTopK
  StatisticsSpec stats;
  ElementType element_type = ElementType::kFloat32;  // of matrices; statistics are float32

  bool Enabled() const { return form != Form::kNone || stats.Any(); }
};

// Checks the spec against the model: OUT_OF_RANGE for layer or head indices outside it,
// INVALID_ARGUMENT for malformed fields. `prompt_len` < 0 skips the checks that need it.
absl::Status ValidateCaptureSpec(const CaptureSpec& spec, int64_t num_layers, int64_t num_heads,
                                 int64_t prompt_len);

// Bytes of matrices and statistics that the spec produces for a prompt of `prompt_len` tokens and
// up to `max_new_tokens` generated ones (an upper bound: generation may stop earlier).
int64_t EstimateCaptureBytes(const CaptureSpec& spec, int64_t num_layers, int64_t num_heads,
                             int64_t prompt_len, int64_t max_new_tokens);

// Host memory of a block: contiguous, little-endian, row-major, valid only during the sink call.
struct HostArray {
  const char* dtype = "F32";  // safetensors' name: F32, F16, BF16 (values) or I32 (indices)
  const void* data = nullptr;
  std::vector<int64_t> shape;
  int64_t bytes = 0;
  bool defined() const { return data != nullptr || bytes > 0 || !shape.empty(); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

// One block of captured attention, handed out as soon as it is computed.
struct AttentionBlock {
  Phase phase = Phase::kPrefill;
  int64_t step = 0;  // 0 for prefill; t = 1, 2, ... for the token fed at decode step t
  int64_t layer = 0;
  const std::vector<int64_t>* heads =
      nullptr;              // query heads covered (reduced over, for head forms)
  int64_t query_begin = 0;  // absolute positions of the rows: [query_begin, query_end)
  int64_t query_end = 0;
  int64_t key_length = 0;  // keys [0, key_length); prefill: prompt length; decode t: prompt + t
  Form form = Form::kDense;
  int64_t pool = 0;
  HostArray values;   // element type; shape per Form
  HostArray indices;  // kTopK only: int32 key indices, same shape as values
};

enum class StatKind { kRowEntropy, kSinkMass, kLocalMass, kKeyScore, kKeyScoreVariance };
const char* StatKindName(StatKind kind);

// One block of statistics. Row statistics: values [heads, query_end - query_begin]. Key
// statistics (kKeyScore after each layer's prefill, kKeyScoreVariance at the end): [heads, prompt].
struct StatBlock {
  StatKind kind = StatKind::kRowEntropy;
  Phase phase = Phase::kPrefill;
  int64_t step = 0;
  int64_t layer = 0;
  const std::vector<int64_t>* heads = nullptr;
  int64_t query_begin = 0;
  int64_t query_end = 0;
  int64_t key_length = 0;
  HostArray values;  // float32
};

// Receives results while a generation runs, on the engine's thread. A non-OK status stops the
// generation and is returned by Engine::Generate.
class AttentionSink {
 public:
  virtual ~AttentionSink() = default;
  virtual absl::Status OnAttention(const AttentionBlock& block) { return absl::OkStatus(); }
  virtual absl::Status OnStatistic(const StatBlock& stat) { return absl::OkStatus(); }
  // Generated token number `step` (1-based), as soon as it is chosen.
  virtual absl::Status OnToken(int64_t step, int64_t token_id) { return absl::OkStatus(); }
  // Logits ([vocab] float32) that chose token `step`; only when WantsLogits().
  virtual bool WantsLogits() const { return false; }
  virtual absl::Status OnLogits(int64_t step, const HostArray& logits) { return absl::OkStatus(); }
};

}  // namespace attnscope
