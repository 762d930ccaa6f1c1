// Interventions a request may make on the computation (issue 24): head ablations (a head's output
// zeroed, or replaced by its mean over the prompt) and attention knockouts (key positions hidden
// from given layers, heads and query rows). Bounded and validated like the capture spec; the
// transformer applies them through a LayerInterventions per layer (layer_intervention.h). No
// libtorch here: engine.h carries these in its requests.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "core/capture_spec.h"

namespace attnscope {

enum class AblationKind { kZero, kMean };
inline constexpr Named<AblationKind> kAblationKinds[] = {{AblationKind::kZero, "zero"},
                                                         {AblationKind::kMean, "mean"}};

// Positions [begin, end).
struct PositionRange {
  int64_t begin = 0;
  int64_t end = 0;
};

struct HeadAblation {
  int64_t layer = 0;
  std::vector<int64_t> heads;  // query heads, at least one
  AblationKind kind = AblationKind::kZero;
};

// Hides the keys in `keys` from the query rows in `queries` (every row when empty) of the given
// layers and heads (every one when empty). A row never loses its own position: the hidden keys of
// the row at position p are keys ∩ [0, p), so every row keeps at least one key.
struct Knockout {
  std::vector<int64_t> layers;
  std::vector<int64_t> heads;
  std::vector<PositionRange> keys;     // prompt positions, at least one range
  std::vector<PositionRange> queries;  // positions (prompt or generated); empty: all
};

// KV-cache eviction policies, scored as kvpress's presses score them (DESIGN.md says which rows
// each score sums). At the end of the prefill each (layer, kv head) keeps its best-scored prompt
// keys; the evicted ones are hidden from every later row of that layer's heads.
enum class KvPolicyKind { kNone, kStreamingLlm, kH2o, kSnapKv, kPyramidKv };
inline constexpr Named<KvPolicyKind> kKvPolicyKinds[] = {
    {KvPolicyKind::kNone, "none"},
    {KvPolicyKind::kStreamingLlm, "streaming_llm"},
    {KvPolicyKind::kH2o, "h2o"},
    {KvPolicyKind::kSnapKv, "snapkv"},
    {KvPolicyKind::kPyramidKv, "pyramidkv"}};

struct KvPolicy {
  KvPolicyKind kind = KvPolicyKind::kNone;
  // How many prompt keys each (layer, kv head) keeps: int(n * (1 - compression_ratio)) (kvpress),
  // or `budget` when set; exactly one of them.
  double compression_ratio = 0;
  int64_t budget = 0;
  int64_t n_sink = 4;            // streaming_llm: first keys always kept
  int64_t window_size = 64;      // snapkv, pyramidkv: the observation window (the last rows)
  int64_t kernel_size = 5;       // snapkv, pyramidkv: the scores' pooling kernel (odd)
  double beta = 20;              // pyramidkv: the pyramid's steepness
  int64_t recent_size = 0;       // h2o: the last keys always kept (0: kvpress's observed attention)
  bool adaptive = false;         // Ada-KV: one layer's budget shared across its kv heads by score
  double alpha_safeguard = 0.2;  // Ada-KV: each head keeps at least this share of the budget
  bool report_scores = false;    // decisions carry the key scores
};

struct Interventions {
  std::vector<HeadAblation> ablations;
  std::vector<Knockout> knockouts;
  KvPolicy kv_policy;
  bool empty() const {
    return ablations.empty() && knockouts.empty() && kv_policy.kind == KvPolicyKind::kNone;
  }
};

// Bounds: each list, and the ranges of all knockouts together, are short (a what-if names a few
// heads and spans, not one entry per position).
inline constexpr int64_t kMaxAblations = 1024;
inline constexpr int64_t kMaxKnockouts = 64;
inline constexpr int64_t kMaxKnockoutRanges = 256;

// Key scores are reported only up to this many floats per request (layers × kv heads × keys: 8
// MiB).
inline constexpr int64_t kMaxReportedScores = int64_t{1} << 21;

// INVALID_ARGUMENT naming the field for an empty or oversized list, an empty range or a policy
// parameter outside its range; OUT_OF_RANGE for a layer or head outside the model, key positions
// outside the prompt, query positions outside the model's context or a budget past the prompt.
absl::Status ValidateInterventions(const Interventions& interventions, int64_t num_layers,
                                   int64_t num_heads, int64_t num_kv_heads, int64_t prompt_len,
                                   int64_t max_positions);

// The keys (layer) keeps per kv head before Ada-KV's sharing: the budget, or int(n * (1 -
// compression_ratio)); PyramidKV's budget falls with depth (kvpress's get_layer_budget).
int64_t KeptKeys(const KvPolicy& policy, int64_t layer, int64_t num_layers, int64_t n);

}  // namespace attnscope
