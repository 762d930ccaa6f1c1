// A captured block, described once: the engine fills it, the server's chunker cuts it into
// messages, the clients' reassemblers rebuild it from them, and files name it by BlockName. No
// libtorch here.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "core/capture_spec.h"

namespace attnscope {

enum class BlockKind { kAttention, kStatistic };

struct BlockHeader {
  BlockKind kind = BlockKind::kAttention;
  StatKind stat = StatKind::kRowEntropy;  // kStatistic
  Phase phase = Phase::kPrefill;
  int64_t step = 0;  // 0 for prefill; t = 1, 2, ... for the token fed at decode step t
  int64_t layer = 0;
  std::vector<int64_t> heads;  // query heads covered (reduced over, for head forms)
  int64_t query_begin = 0;     // absolute positions of the rows: [query_begin, query_end)
  int64_t query_end = 0;
  int64_t key_length = 0;    // keys [0, key_length); prefill: prompt length; decode t: prompt + t
  Form form = Form::kDense;  // kAttention
  int64_t pool = 0;          // kPooled
  ElementType element_type = ElementType::kFloat32;  // of the values; statistics are float32
  // Of the values (and of the indices, for forms that have them). Attention: per kForms' shape
  // rule. Row statistics: [heads, query_end - query_begin]; key statistics: [heads, prompt].
  std::vector<int64_t> shape;

  bool has_indices() const { return kind == BlockKind::kAttention && RowOf(kForms, form).indices; }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  int64_t value_bytes() const { return numel() * ElementSize(element_type); }
  int64_t index_bytes() const { return has_indices() ? numel() * 4 : 0; }
};

// Writes the values' elements [first, first + count) (row-major, header.element_type) to `dst`.
using BlockFill = std::function<void(int64_t first, int64_t count, void* dst)>;

// A block with its bytes: little-endian, row-major, valid only during the sink call.
struct Block {
  BlockHeader header;
  const void* values = nullptr;   // header.value_bytes(); null when `fill` is given instead
  const void* indices = nullptr;  // int32 key indices, header.index_bytes()
  // Only for a sink whose PlacesValues() is true, and only for dense attention blocks: the values
  // are not materialized; the sink has them written straight where they go (its shared ring),
  // piece by piece, during OnBlock.
  BlockFill fill;
};

// The one naming of stored blocks (safetensors tensor names, the Python readers' keys):
//   attention.<phase>.<layer>.<step>.<query_begin>        (+ ".indices" for the key indices)
//   statistic.<kind>.<phase>.<layer>.<step>.<query_begin>
std::string BlockName(const BlockHeader& header);
inline std::string IndexName(const BlockHeader& header) { return BlockName(header) + ".indices"; }

// Host memory of an array outside blocks (logits): contiguous, little-endian, row-major.
struct HostArray {
  const char* dtype = "F32";  // safetensors' name
  const void* data = nullptr;
  std::vector<int64_t> shape;
  int64_t bytes = 0;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

// What a request's interventions changed at generated token `step` (1-based), against the
// unmodified model run in lock-step on the same tokens.
struct DivergenceStep {
  int64_t step = 0;
  double kl = 0;            // KL(full || intervened) of the next-token distributions, nats
  bool top1_agree = false;  // the two argmax tokens are the same
  int64_t rank = 0;         // the rank of the chosen token under the full model (1: its top-1)
  int64_t token = 0;        // the chosen token
  double logprob_full = 0;  // its log-probability under each model (nats; minus each one's loss)
  double logprob_intervened = 0;
  // [layers][heads]: the attention mass the full model's row that produced this step puts on the
  // keys the intervened model does not see (0 where nothing is hidden).
  std::vector<float> lost_mass;
};

// A KV policy's decision for one layer (at the end of the prefill: step 0; or after decode step
// `step`): which of the keys [0, keys) each kv head keeps.
struct KvDecision {
  int64_t step = 0;
  int64_t layer = 0;
  int64_t keys = 0;
  int64_t kv_heads = 0;
  // [kv_heads][keys] row-major, one bit per key (1: kept), packed little-endian within each byte
  // (numpy's packbits(bitorder="little")).
  std::vector<uint8_t> kept;
  std::vector<int64_t> kept_per_head;  // [kv_heads]
  std::vector<float> scores;           // [kv_heads][keys], when the request asked for them
  int64_t bytes_freed = 0;             // the bytes of the keys and values this decision evicted
  // The layer's intervened cache after the decision: its slots (the fullest kv head's kept keys,
  // plus room for the positions until the next decision) x kv heads x (k and v).
  int64_t cache_bytes = 0;
};

// Receives results while a generation runs, on the engine's thread. A non-OK status stops the
// generation and is returned by Engine::Generate.
class AttentionSink {
 public:
  virtual ~AttentionSink() = default;
  virtual absl::Status OnBlock(const Block& block) { return absl::OkStatus(); }
  // True: dense attention blocks may come with Block::fill instead of values (one copy fewer).
  virtual bool PlacesValues() const { return false; }
  // Generated token number `step` (1-based), as soon as it is chosen.
  virtual absl::Status OnToken(int64_t step, int64_t token_id) { return absl::OkStatus(); }
  // Logits ([vocab] float32) that chose token `step`; only when WantsLogits().
  virtual bool WantsLogits() const { return false; }
  virtual absl::Status OnLogits(int64_t step, const HostArray& logits) { return absl::OkStatus(); }
  // Per generated step, for a request with interventions.
  virtual absl::Status OnDivergence(const DivergenceStep& divergence) { return absl::OkStatus(); }
  // Per layer at each KV policy decision, before the steps it affects.
  virtual absl::Status OnKvDecision(const KvDecision& decision) { return absl::OkStatus(); }
};

}  // namespace attnscope
