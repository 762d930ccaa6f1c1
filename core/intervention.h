// The interventions a request may make on the computation (issue 24), as plain types every room
// shares (the engine applies and validates them, engine/intervention.h; the CLIs write them in the
// dialect of core/intervention_text.h; proto/contract.h converts them): head ablations (a head's
// output zeroed, or replaced by its mean over the prompt), attention knockouts (key positions
// hidden from given layers, heads and query rows) and a KV-cache eviction policy.
#pragma once

#include <cstdint>
#include <vector>

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
// keys and the rest leave the intervened cache; with decode_interval, every that many decode steps
// the policy decides again among the keys still held, bringing each kv head back to its budget.
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
  // streaming_llm, h2o: decide again every this many decode steps (0: once, after the prefill).
  int64_t decode_interval = 0;
};

struct Interventions {
  std::vector<HeadAblation> ablations;
  std::vector<Knockout> knockouts;
  KvPolicy kv_policy;
  bool empty() const {
    return ablations.empty() && knockouts.empty() && kv_policy.kind == KvPolicyKind::kNone;
  }
};

}  // namespace attnscope
