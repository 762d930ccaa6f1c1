// The engine side of capture: turns probability blocks into the spec's forms and statistics on
// the engine's device and hands them to the sink (core/block.h) as host memory.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "core/block.h"
#include "engine/cpu_flash.h"

namespace attnscope {

// Turns probability blocks into the spec's forms and statistics on the engine's device, and hands
// them to the sink. One per generation.
class CaptureProcessor {
 public:
  CaptureProcessor(const CaptureSpec& spec, int64_t num_layers, int64_t num_heads,
                   int64_t prompt_len, AttentionSink* sink);

  // Whether layer `layer` needs probabilities in this phase (else the fast path runs).
  bool Wants(Phase phase, int64_t layer) const;

  // The statistics of a pass over positions [pos0, pos0 + n) that the attention pass can compute
  // itself (CpuFlashAttention): the prefill's row entropy, sink mass, local mass and key score;
  // none in decode.
  FlashStatistics StatisticsForPass(Phase phase, int64_t pos0, int64_t n) const;

  // Rows of a forward pass over positions [pos0, pos0 + n) (0-based in the pass, half-open ranges)
  // whose probabilities the spec needs: the selected prompt rows if a form or a row statistic is
  // asked for, the key score's last rows (the statistics only when the pass does not compute them:
  // `statistics_in_pass`); in decode every row. Empty: every row.
  std::vector<std::pair<int64_t, int64_t>> RowsWanted(Phase phase, int64_t pos0, int64_t n,
                                                      bool statistics_in_pass = false) const;

  // probs: [heads, m, computed_keys] float32 for query rows [query_begin, query_begin + m); keys at
  // or past computed_keys (<= key_length) are masked, i.e. 0. scores: the softmax's input, same
  // shape (masked entries the lowest finite float). lse: each row's log-sum-exp [heads, m] float32
  // where the fused path knows it; undefined on the explicit path. `statistics_in_pass`: the
  // pass computed StatisticsForPass itself (OnPassStatistics emits them), so these rows do not.
  absl::Status OnProbs(Phase phase, int64_t step, int64_t layer, int64_t query_begin,
                       const torch::Tensor& probs, const torch::Tensor& scores,
                       const torch::Tensor& lse, int64_t key_length,
                       bool statistics_in_pass = false);

  // Emits the statistics an attention pass over positions [pos0, pos0 + n) computed as
  // StatisticsForPass asked (CpuFlashAttention's entropy, sink and local [heads, n] and key score
  // [heads, pos0 + n], float32), for the selected rows and heads.
  absl::Status OnPassStatistics(Phase phase, int64_t step, int64_t layer, int64_t pos0,
                                const FlashResult& pass, int64_t key_length);

  // Emits what accumulates across steps (key-score variance). Call once after the last step.
  absl::Status Finish();

 private:
  // `entropy`: the rows' entropies [heads, rows] (undefined when not asked for or when
  // `row_statistics` is false: then only the form is emitted).
  absl::Status EmitRows(Phase phase, int64_t step, int64_t layer, int64_t row_begin,
                        const torch::Tensor& rows, const torch::Tensor& entropy, int64_t key_length,
                        bool row_statistics = true);
  absl::Status EmitForm(Phase phase, int64_t step, int64_t layer, int64_t row_begin,
                        const torch::Tensor& rows, int64_t key_length);
  // t [model heads, ...] -> [selected heads, ...] (t itself when every head is selected).
  torch::Tensor SelectedHeads(const torch::Tensor& t);
  BlockHeader Header(BlockKind kind, Phase phase, int64_t step, int64_t layer, int64_t row_begin,
                     int64_t row_end, int64_t key_length) const;
  absl::Status EmitStat(StatKind kind, Phase phase, int64_t step, int64_t layer, int64_t row_begin,
                        int64_t row_end, int64_t key_length, const torch::Tensor& values);

  CaptureSpec spec_;
  int64_t prompt_len_;
  AttentionSink* sink_;
  std::vector<bool> layer_on_;
  std::vector<int64_t> heads_;           // resolved query heads
  std::vector<QueryRange> prompt_rows_;  // resolved prompt row ranges, sorted
  bool all_heads_ = true;
  torch::Tensor head_index_;               // on the probabilities' device, lazily
  std::vector<torch::Tensor> key_score_;   // per layer [heads, prompt] float32
  std::vector<torch::Tensor> var_sum_;     // per layer [heads, prompt] float64
  std::vector<torch::Tensor> var_sum_sq_;  // per layer [heads, prompt] float64
  int64_t decode_steps_seen_ = 0;
};

}  // namespace attnscope
