// Head detectors: scores every (layer, head) by how much of its attention, on a probe the engine
// runs, falls where a previous-token, duplicate-token, induction or sink head would put it.
// The first three are TransformerLens' detect_head ("mul" error measure): score = Σ p·pattern /
// Σ p over the probe's rows, where pattern is
//   previous_token   1 at (i, i - 1)
//   duplicate_token  1 at (i, j), j < i, token[j] == token[i]
//   induction        1 at (i, j), 1 <= j <= i, token[j - 1] == token[i]
// (with exclude_bos key 0's probability, with exclude_current_token the diagonal's, taken out of
// both sums); sink is the mean over rows i >= 1 of p(i, 0). On the default probe (BOS, then `span`
// random ids, then the same ids again) a perfect induction head scores span / (2 span + 1).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/engine.h"

namespace attnscope {

// The probe's attention costs layers x heads x n^2 reads: bounded like a short prompt's dense
// capture.
inline constexpr int64_t kMaxProbeTokens = 1025;  // 2 x 512 + BOS
inline constexpr int64_t kMaxProbeSpan = 512;

struct HeadProbe {
  std::vector<int64_t> ids;  // the probe itself; empty: the random repeated probe below
  int64_t span = 32;         // random ids per copy, 1..kMaxProbeSpan
  uint64_t seed = 0;         // of the random ids (xorshift64; the same probe for the same seed)
  bool exclude_bos = false;  // leave key 0 out of every score but sink
  bool exclude_current_token = false;  // leave the diagonal out
};

// One kind of head: its name (the proto's and the clients' column) and how to read it.
enum class HeadKind { kPreviousToken, kDuplicateToken, kInduction, kSink };
inline constexpr Named<HeadKind> kHeadKinds[] = {
    {HeadKind::kPreviousToken, "previous_token"},
    {HeadKind::kDuplicateToken, "duplicate_token"},
    {HeadKind::kInduction, "induction"},
    {HeadKind::kSink, "sink"},
};
inline constexpr int kNumHeadKinds = 4;

struct HeadDetection {
  std::vector<int64_t> probe_ids;  // what ran
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  // [layer][head][kind], kind in kHeadKinds' order.
  std::vector<double> scores;
  double score(int64_t layer, int64_t head, HeadKind kind) const {
    return scores[(layer * num_heads + head) * kNumHeadKinds + static_cast<int>(kind)];
  }
};

// The probe the engine runs for `probe` (BOS if the model has one, then span random ids that are
// not the model's special ids, twice), or its ids as given. INVALID_ARGUMENT for a span outside
// 1..kMaxProbeSpan or a probe of fewer than 2 or more than kMaxProbeTokens ids; OUT_OF_RANGE for a
// probe longer than the model's context (and, in DetectHeads, ids outside the vocabulary).
absl::StatusOr<std::vector<int64_t>> ProbeIds(const ModelInfo& info, const HeadProbe& probe);

// Runs the probe's prefill with every layer's attention captured and scores every head.
absl::StatusOr<HeadDetection> DetectHeads(const Engine& engine, const HeadProbe& probe,
                                          const CancelToken* cancel);

}  // namespace attnscope
