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

struct Interventions {
  std::vector<HeadAblation> ablations;
  std::vector<Knockout> knockouts;
  bool empty() const { return ablations.empty() && knockouts.empty(); }
};

// Bounds: each list, and the ranges of all knockouts together, are short (a what-if names a few
// heads and spans, not one entry per position).
inline constexpr int64_t kMaxAblations = 1024;
inline constexpr int64_t kMaxKnockouts = 64;
inline constexpr int64_t kMaxKnockoutRanges = 256;

// INVALID_ARGUMENT naming the field for an empty or oversized list or an empty range; OUT_OF_RANGE
// for a layer or head outside the model, key positions outside the prompt or query positions
// outside the model's context.
absl::Status ValidateInterventions(const Interventions& interventions, int64_t num_layers,
                                   int64_t num_heads, int64_t prompt_len, int64_t max_positions);

}  // namespace attnscope
