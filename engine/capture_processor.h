// The engine side of capture: turns probability blocks into the spec's forms and statistics on
// the engine's device and hands them to the sink (core/block.h) as host memory.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <deque>
#include <limits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "core/block.h"
#include "engine/cpu_flash.h"
#include "engine/device_copy.h"

namespace attnscope {

// Turns probability blocks into the spec's forms and statistics on the engine's device, and hands
// them to the sink. One per generation.
//
// With `queued_copies` a block's host copy is queued behind the work that computes it
// (HostCopyQueued) and the block reaches the sink later, in order: from the device once its copy
// is done, so the device never waits for the host in the middle of a pass; on the CPU, where
// nothing runs meanwhile, at the next Flush. Blocks wait at most until the next Flush, or while
// more than `max_queued_bytes` wait. A larger block is handed over at once, after those before it
// (no overlap is to be had, and pinned host memory stays within the bound). Blocks of a step the
// engine queued ahead of its stop check (HoldFrom) wait for Flush, or are dropped (Drop).
class CaptureProcessor {
 public:
  static constexpr int64_t kMaxQueuedBytes = int64_t{64} << 20;

  CaptureProcessor(const CaptureSpec& spec, int64_t num_layers, int64_t num_heads,
                   int64_t prompt_len, AttentionSink* sink, bool queued_copies = false,
                   int64_t max_queued_bytes = kMaxQueuedBytes);

  // Whether layer `layer` needs probabilities in this phase (else the fast path runs).
  bool Wants(Phase phase, int64_t layer) const;

  // The statistics of a pass over positions [pos0, pos0 + n) that the attention pass can compute
  // itself (CpuFlashAttention): the prefill's row entropy, sink mass, local mass and key score;
  // in decode the row statistics.
  FlashStatistics StatisticsForPass(Phase phase, int64_t pos0, int64_t n) const;

  // Rows of a forward pass over positions [pos0, pos0 + n) (0-based in the pass, half-open ranges)
  // whose probabilities the spec needs: the selected prompt rows if a form or a row statistic is
  // asked for, the key score's last rows (the statistics only when the pass does not compute them:
  // `statistics_in_pass`); in decode every row, or none with `statistics_in_pass` and neither a
  // form nor the key-score variance. Empty: every row.
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

  // Hands every waiting block of steps <= `through_step` to the sink, waiting for their copies.
  absl::Status Flush(int64_t through_step = std::numeric_limits<int64_t>::max());
  // Blocks of steps >= `step` wait for Flush (a step that may yet be dropped).
  void HoldFrom(int64_t step) { hold_from_ = step; }
  // Forgets the waiting blocks of steps >= `step` (a step queued past a stop), unhanded.
  void Drop(int64_t step);

  // Hands over what waits, then emits what accumulates across steps (key-score variance). Call
  // once after the last step.
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
  // Hands `block` with `values` (and `indices`, int32, where the form has them) to the sink now,
  // or queues their host copies (queued_copies_).
  absl::Status Hand(Block block, const torch::Tensor& values, const torch::Tensor& indices);
  // Whether a block of `step` and `bytes` is queued rather than handed over at once: with queued
  // copies, up to the bound, and always in a held step.
  bool Queues(int64_t step, int64_t bytes) const {
    return queued_copies_ && (bytes <= max_queued_bytes_ || step >= hold_from_);
  }
  // Hands over the waiting blocks before hold_from_ whose device copies are done, and waits for
  // more while over max_queued_bytes_.
  absl::Status HandReady();
  // Hands the oldest waiting block over once its copy is done.
  absl::Status HandOldest();

  struct Queued {
    Block block;                    // values and indices point into the host copies
    torch::Tensor values, indices;  // host copies
    DeviceEvent copied;
    bool from_device = false;  // copied from a device (else cloned on the CPU)
    int64_t bytes = 0;
  };

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
  bool queued_copies_ = false;
  std::deque<Queued> queued_;  // in the order the blocks were made
  int64_t queued_bytes_ = 0;
  int64_t max_queued_bytes_ = kMaxQueuedBytes;
  int64_t hold_from_ = std::numeric_limits<int64_t>::max();
};

}  // namespace attnscope
