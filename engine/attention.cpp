#include "engine/attention.h"

#include <torch/version.h>

#include <cmath>
#include <limits>
#include <optional>
#include <utility>

#include "core/status_macros.h"

namespace attnscope {
namespace {

// True where query position first_query + row may not see key position key_begin + col.
torch::Tensor MaskedPositions(int64_t first_query, int64_t rows, int64_t key_begin, int64_t key_end,
                              int64_t window, torch::Device device) {
  auto opts = torch::TensorOptions().dtype(torch::kInt64).device(device);
  torch::Tensor qpos =
      torch::arange(first_query, first_query + rows, opts).unsqueeze(1);      // (rows, 1)
  torch::Tensor kpos = torch::arange(key_begin, key_end, opts).unsqueeze(0);  // (1, keys)
  torch::Tensor masked = kpos > qpos;                                         // causal
  if (window > 0) masked = masked.logical_or(kpos <= qpos - window);          // sliding window
  return masked;
}

// Sets the masked entries of scores (heads, rows, keys) for query positions from first_query on to
// the lowest finite float, touching only the columns where a mask can fall: keys after the first
// row (causal) and, with a window, keys before the last row's window.
void MaskScores(torch::Tensor& scores, int64_t first_query, int64_t window) {
  const int64_t rows = scores.size(1), keys = scores.size(2);
  auto fill = [&](int64_t c0, int64_t c1) {
    c0 = std::max<int64_t>(c0, 0);
    c1 = std::min(c1, keys);
    if (c0 >= c1) return;
    scores.narrow(2, c0, c1 - c0)
        .masked_fill_(MaskedPositions(first_query, rows, c0, c1, window, scores.device()),
                      std::numeric_limits<float>::lowest());
  };
  const int64_t last = first_query + rows - 1;  // the block's last query position
  if (window > 0) fill(0, last - window + 1);   // keys outside the window of some row
  fill(first_query + 1, keys);                  // keys in the future of some row
}

// Rows of the block starting at row b: at most query_block, and few enough that heads × rows × keys
// stays within block_elements as the keys grow; a multiple of row_multiple unless it is the last.
int64_t BlockRows(const AttentionShape& shape, int64_t heads, int64_t n, int64_t b) {
  const int64_t align = std::max<int64_t>(1, shape.row_multiple);
  const int64_t block = std::max<int64_t>(1, shape.query_block);
  int64_t m = block;
  if (shape.block_elements > 0)
    m = std::min(m, shape.block_elements / (heads * (shape.pos0 + b + block)));
  m = std::max(align, m / align * align);
  return std::min(m, n - b);
}

// Scores of query rows [b, b + m) against keys [0, keys) in float32: q·kᵀ·scale with the query
// heads that share a kv head stacked so no key is copied, masked entries the lowest finite float
// (exp() of it is exactly 0 all the same, and a product with a probability of 0 stays 0). In the
// compute type, then float32, as eager attention does (the explicit path).
torch::Tensor BlockScores(const torch::Tensor& q, const torch::Tensor& k,
                          const AttentionShape& shape, int64_t b, int64_t m, int64_t keys) {
  const int64_t heads = q.size(0), dim = q.size(2), kv_heads = k.size(0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(dim));
  torch::Tensor qg = q.narrow(1, b, m).reshape({kv_heads, (heads / kv_heads) * m, dim});
  torch::Tensor kb = k.narrow(1, 0, keys);  // (kv, keys, dim)
  torch::Tensor scores =
      (torch::matmul(qg, kb.transpose(1, 2)) * scale).view({heads, m, keys}).to(torch::kFloat32);
  MaskScores(scores, shape.pos0 + b, shape.window);
  if (shape.knockout != nullptr) shape.knockout->HideKeys(scores, shape.pos0 + b);
  return scores;
}

// Float32 blocks reused from one block to the next (a fresh 16 MiB tensor per block costs its page
// faults, more than the elementwise pass that fills it).
class BlockBuffers {
 public:
  // A contiguous float32 tensor of `shape` in buffer i (0 or 1), valid until the next call for i.
  torch::Tensor Get(int i, at::IntArrayRef shape, const torch::TensorOptions& options) {
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    if (!flat_[i].defined() || flat_[i].numel() < numel) {
      flat_[i] = torch::empty({numel}, options.dtype(torch::kFloat32));
    }
    return flat_[i].narrow(0, 0, numel).view(shape);
  }

 private:
  torch::Tensor flat_[2];
};

// The fused path's scores: the product itself in float32 whatever the compute type (the kernel's
// lse comes from float32 accumulation, so float32 scores make each row sum to one; bfloat16 scores
// would not), the scale folded into the product, written into buffer 0.
torch::Tensor BlockScores32(const torch::Tensor& q, const torch::Tensor& k,
                            const AttentionShape& shape, int64_t b, int64_t m, int64_t keys,
                            BlockBuffers* buffers) {
  const int64_t heads = q.size(0), dim = q.size(2), kv_heads = k.size(0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(dim));
  torch::Tensor qg = q.narrow(1, b, m).reshape({kv_heads, (heads / kv_heads) * m, dim});
  torch::Tensor kb = k.narrow(1, 0, keys);  // (kv, keys, dim)
  if (qg.scalar_type() != torch::kFloat32) {
    qg = qg.to(torch::kFloat32);
    kb = kb.to(torch::kFloat32);
  }
  torch::Tensor scores = buffers->Get(0, {kv_heads, (heads / kv_heads) * m, keys}, q.options());
  scores.baddbmm_(qg, kb.transpose(1, 2), /*beta=*/0.0, /*alpha=*/scale);
  scores = scores.view({heads, m, keys});
  MaskScores(scores, shape.pos0 + b, shape.window);
  return scores;
}

}  // namespace

absl::StatusOr<torch::Tensor> ExplicitAttention(const torch::Tensor& q, const torch::Tensor& k,
                                                const torch::Tensor& v, const AttentionShape& shape,
                                                const ProbsCallback* on_probs) {
  const int64_t heads = q.size(0), n = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k.size(0);
  const int64_t group = heads / kv_heads;
  torch::Tensor out = torch::empty({heads, n, dim}, q.options());
  for (int64_t b = 0, m = 0; b < n; b += m) {
    m = BlockRows(shape, heads, n, b);
    const int64_t keys = shape.pos0 + b + m;  // later keys are masked for every row of the block
    // scores = q·kᵀ / sqrt(d) in the compute dtype (as eager attention), then float32
    torch::Tensor scores = BlockScores(q, k, shape, b, m, keys);
    torch::Tensor probs =
        torch::softmax(scores, -1);  // (heads, m, keys) float32; masked entries exactly 0
    if (on_probs != nullptr) RETURN_IF_ERROR((*on_probs)(b, probs, scores, torch::Tensor()));
    torch::Tensor o = torch::matmul(probs.to(v.scalar_type()).view({kv_heads, group * m, keys}),
                                    v.narrow(1, 0, keys));
    out.narrow(1, b, m).copy_(o.view({heads, m, dim}));
  }
  return out;
}

absl::StatusOr<torch::Tensor> CompactedAttention(const torch::Tensor& q, const torch::Tensor& k,
                                                 const torch::Tensor& v,
                                                 const torch::Tensor& positions,
                                                 const AttentionShape& shape,
                                                 const ProbsCallback* on_probs) {
  const int64_t heads = q.size(0), n = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k.size(0), slots = k.size(1), group = heads / kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(dim));
  // Scores in the compute type, then float32, as the explicit path.
  torch::Tensor scores =
      (torch::matmul(q.reshape({kv_heads, group * n, dim}), k.transpose(1, 2)) * scale)
          .view({heads, n, slots})
          .to(torch::kFloat32);
  auto i64 = torch::TensorOptions().dtype(torch::kInt64).device(q.device());
  torch::Tensor pos = positions.repeat_interleave(group, 0).unsqueeze(1);  // (heads, 1, slots)
  torch::Tensor qpos = torch::arange(shape.pos0, shape.pos0 + n, i64).view({1, n, 1});
  torch::Tensor masked = (pos < 0).logical_or(pos > qpos);  // padding; causal within the rows
  if (shape.window > 0) masked = masked.logical_or(pos <= qpos - shape.window);
  const int64_t keys = shape.pos0 + n;
  torch::Tensor index = pos.clamp_min(0).expand({heads, n, slots});
  if (shape.knockout != nullptr && shape.knockout->knocks_out()) {
    torch::Tensor marks = torch::zeros({heads, n, keys}, q.options().dtype(torch::kFloat32));
    shape.knockout->HideKnockouts(marks, shape.pos0);
    masked = masked.logical_or(marks.lt(0).gather(2, index));
  }
  scores.masked_fill_(masked, std::numeric_limits<float>::lowest());
  torch::Tensor probs = torch::softmax(scores, -1);  // (heads, n, slots); masked entries exactly 0
  if (on_probs != nullptr) {
    // Scattered to their positions; padding slots go to a spare last column, dropped after.
    torch::Tensor to = pos.masked_fill(pos < 0, keys).expand({heads, n, slots});
    torch::Tensor full_probs = torch::zeros({heads, n, keys + 1}, probs.options());
    full_probs.scatter_(2, to, probs);
    torch::Tensor full_scores =
        torch::full({heads, n, keys + 1}, std::numeric_limits<float>::lowest(), probs.options());
    full_scores.scatter_(2, to, scores);
    RETURN_IF_ERROR((*on_probs)(0, full_probs.narrow(2, 0, keys).contiguous(),
                                full_scores.narrow(2, 0, keys).contiguous(), torch::Tensor()));
  }
  return torch::matmul(probs.to(v.scalar_type()).view({kv_heads, group * n, slots}), v)
      .view({heads, n, dim});
}

bool HasFusedAttention() {
#if TORCH_VERSION_MAJOR >= 2
  return true;
#else
  return false;
#endif
}

#if TORCH_VERSION_MAJOR >= 2
namespace {

// The fused kernel over every row: (out (heads, n, dim), lse (heads, n) float32 when want_lse), or
// nullopt where this build has no such kernel for the device and type.
std::optional<std::pair<torch::Tensor, torch::Tensor>> FusedKernel(const torch::Tensor& q,
                                                                   const torch::Tensor& k,
                                                                   const torch::Tensor& v,
                                                                   const AttentionShape& shape,
                                                                   bool want_lse) {
  const int64_t heads = q.size(0), n = q.size(1), dim = q.size(2), kv_heads = k.size(0);
  const int64_t keys = shape.pos0 + n;
  const int64_t group = heads / kv_heads;
  // Key and value heads repeated for their query heads: (1, heads, keys, dim).
  auto expand = [&](const torch::Tensor& t) {
    torch::Tensor x = t.narrow(1, 0, keys);
    if (group > 1)
      x = x.unsqueeze(1).expand({kv_heads, group, keys, dim}).reshape({heads, keys, dim});
    return x.unsqueeze(0);
  };
  torch::Tensor q4 = q.unsqueeze(0), k4 = expand(k), v4 = expand(v);
  // Causal from row 0 where the queries start at key 0; all keys for one unwindowed row; else a
  // mask.
  const bool causal = shape.window == 0 && shape.pos0 == 0 && n > 1;
  const bool unmasked = shape.window == 0 && (shape.pos0 == 0 || n == 1);
  auto allowed = [&] {
    return MaskedPositions(shape.pos0, n, 0, keys, shape.window, q.device()).logical_not();
  };
  if (!want_lse) {
    torch::Tensor out = unmasked
                            ? at::scaled_dot_product_attention(q4, k4, v4, {}, 0.0, causal)
                            : at::scaled_dot_product_attention(q4, k4, v4, allowed(), 0.0, false);
    return std::make_pair(out.squeeze(0), torch::Tensor());
  }
  // An additive mask in the compute type (0 where allowed, -inf elsewhere): every row sees at least
  // its own key, so no row is all -inf.
  auto bias = [&](int64_t padded_keys) {
    torch::Tensor b =
        torch::full({1, 1, n, padded_keys}, -std::numeric_limits<float>::infinity(), q.options());
    b.narrow(3, 0, keys).masked_fill_(allowed(), 0.0);
    return b.narrow(3, 0, keys);
  };
  if (q.device().is_cpu()) {
    std::optional<torch::Tensor> mask;
    if (!unmasked) mask = bias(keys);
    auto [out, lse] =
        at::_scaled_dot_product_flash_attention_for_cpu(q4, k4, v4, 0.0, causal, mask);
    return std::make_pair(out.squeeze(0), lse.squeeze(0).to(torch::kFloat32));
  }
  if (q.device().is_cuda()) {
    // The memory-efficient kernel takes a bias (its rows 16-element aligned, hence the padding) and
    // returns the lse padded to a multiple of 32 rows.
    std::optional<torch::Tensor> b;
    if (!unmasked) b = bias((keys + 15) / 16 * 16);
    auto result = at::_scaled_dot_product_efficient_attention(q4, k4, v4, b, true, 0.0, causal);
    return std::make_pair(std::get<0>(result).squeeze(0),
                          std::get<1>(result).squeeze(0).narrow(1, 0, n).to(torch::kFloat32));
  }
  return std::nullopt;
}

bool Overlaps(const RowRanges& rows, int64_t b, int64_t e) {
  if (rows.empty()) return true;
  for (const auto& [rb, re] : rows)
    if (rb < e && b < re) return true;
  return false;
}

}  // namespace
#endif

absl::StatusOr<torch::Tensor> FusedAttention(const torch::Tensor& q, const torch::Tensor& k,
                                             const torch::Tensor& v, const AttentionShape& shape,
                                             const ProbsCallback* on_probs, const RowRanges& rows,
                                             PassStatistics* pass) {
  if (shape.knockout != nullptr && shape.knockout->hides_keys()) {
    return ExplicitAttention(q, k, v, shape, on_probs);  // the fused kernel knows no such mask
  }
#if TORCH_VERSION_MAJOR >= 2
  std::optional<std::pair<torch::Tensor, torch::Tensor>> fused;
  if (pass != nullptr) {
    pass->result = CpuFlashAttention(q, k, v, shape.pos0, shape.window, pass->wanted);
    fused = std::make_pair(pass->result.out, pass->result.lse);
  } else {
    fused = FusedKernel(q, k, v, shape, on_probs != nullptr);
  }
  if (!fused.has_value()) return ExplicitAttention(q, k, v, shape, on_probs);
  if (on_probs == nullptr) return fused->first;
  const torch::Tensor& lse = fused->second;  // (heads, n) float32
  const int64_t heads = q.size(0), n = q.size(1);
  BlockBuffers buffers;
  for (int64_t b = 0, m = 0; b < n; b += m) {
    m = BlockRows(shape, heads, n, b);
    if (!Overlaps(rows, b, b + m)) continue;
    const int64_t keys = shape.pos0 + b + m;
    torch::Tensor scores = BlockScores32(q, k, shape, b, m, keys, &buffers);
    torch::Tensor block_lse = lse.narrow(1, b, m);
    torch::Tensor probs = buffers.Get(1, {heads, m, keys}, q.options());
    torch::sub_out(probs, scores, block_lse.unsqueeze(-1)).exp_();
    RETURN_IF_ERROR((*on_probs)(b, probs, scores, block_lse));
  }
  return fused->first;
#else
  return ExplicitAttention(q, k, v, shape, on_probs);
#endif
}

bool StatisticsInPass(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                      const AttentionShape& shape) {
  return HasFusedAttention() && (shape.knockout == nullptr || !shape.knockout->hides_keys()) &&
         CpuFlashSupports(q, k, v);
}

}  // namespace attnscope
