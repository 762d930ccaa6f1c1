// The bounds and validation of a request's interventions (their types: core/intervention.h); the
// transformer applies them through a LayerInterventions per layer (layer_intervention.h). No
// libtorch here: engine.h carries these in its requests.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "core/intervention.h"

namespace attnscope {

// Bounds: each list, and the ranges of all knockouts together, are short (a what-if names a few
// heads and spans, not one entry per position).
inline constexpr int64_t kMaxAblations = 1024;
inline constexpr int64_t kMaxKnockouts = 64;
inline constexpr int64_t kMaxKnockoutRanges = 256;

// A policy's decode_interval: at most this many decode steps between decisions.
inline constexpr int64_t kMaxDecodeInterval = int64_t{1} << 20;

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
