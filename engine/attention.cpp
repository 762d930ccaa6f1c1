#include "engine/attention.h"

#include <torch/version.h>

#include <cmath>
#include <limits>

#include "core/status_macros.h"

namespace attnscope {
namespace {

// True where query position (pos0 + row) may not see key position col.
torch::Tensor MaskedPositions(int64_t first_query, int64_t rows, int64_t keys, int64_t window,
                              torch::Device device) {
  auto opts = torch::TensorOptions().dtype(torch::kInt64).device(device);
  torch::Tensor qpos =
      torch::arange(first_query, first_query + rows, opts).unsqueeze(1);  // (rows, 1)
  torch::Tensor kpos = torch::arange(0, keys, opts).unsqueeze(0);         // (1, keys)
  torch::Tensor masked = kpos > qpos;                                     // causal
  if (window > 0) masked = masked.logical_or(kpos <= qpos - window);      // sliding window
  return masked;
}

}  // namespace

absl::StatusOr<torch::Tensor> ExplicitAttention(const torch::Tensor& q, const torch::Tensor& k,
                                                const torch::Tensor& v, const AttentionShape& shape,
                                                const ProbsCallback* on_probs) {
  const int64_t heads = q.size(0), n = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k.size(0);
  const int64_t group = heads / kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(dim));
  const int64_t align = std::max<int64_t>(1, shape.row_multiple);
  const int64_t block = std::max<int64_t>(1, shape.query_block);
  torch::Tensor out = torch::empty({heads, n, dim}, q.options());
  for (int64_t b = 0, m = 0; b < n; b += m) {
    // Rows this block: at most query_block, and few enough that heads × rows × keys stays within
    // block_elements as the keys grow; a multiple of row_multiple unless it is the last block.
    m = block;
    if (shape.block_elements > 0)
      m = std::min(m, shape.block_elements / (heads * (shape.pos0 + b + block)));
    m = std::max(align, m / align * align);
    m = std::min(m, n - b);
    const int64_t keys = shape.pos0 + b + m;  // later keys are masked for every row of the block
    // Query heads sharing a kv head are stacked so no key or value is copied: (kv, group·m, dim).
    torch::Tensor qg = q.narrow(1, b, m).reshape({kv_heads, group * m, dim});
    torch::Tensor kb = k.narrow(1, 0, keys);  // (kv, keys, dim)
    torch::Tensor vb = v.narrow(1, 0, keys);  // (kv, keys, dim)
    // scores = q·kᵀ / sqrt(d) in the compute dtype, then float32 for the softmax
    torch::Tensor scores =
        (torch::matmul(qg, kb.transpose(1, 2)) * scale).view({heads, m, keys}).to(torch::kFloat32);
    // The lowest finite float rather than -inf: exp() of it is exactly 0 all the same, and a
    // product with a probability of 0 stays 0 (statistics take Σ p·s from these scores).
    scores.masked_fill_(MaskedPositions(shape.pos0 + b, m, keys, shape.window, q.device()),
                        std::numeric_limits<float>::lowest());
    torch::Tensor probs =
        torch::softmax(scores, -1);  // (heads, m, keys) float32; masked entries exactly 0
    if (on_probs != nullptr) RETURN_IF_ERROR((*on_probs)(b, probs, scores));
    torch::Tensor o =
        torch::matmul(probs.to(v.scalar_type()).view({kv_heads, group * m, keys}), vb);
    out.narrow(1, b, m).copy_(o.view({heads, m, dim}));
  }
  return out;
}

bool HasFusedAttention() {
#if TORCH_VERSION_MAJOR >= 2
  return true;
#else
  return false;
#endif
}

torch::Tensor FastAttention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                            const AttentionShape& shape) {
#if TORCH_VERSION_MAJOR >= 2
  const int64_t n = q.size(1);
  const int64_t keys = shape.pos0 + n;
  const int64_t group = q.size(0) / k.size(0);
  torch::Tensor kx =
      k.narrow(1, 0, keys).repeat_interleave(group, 0).unsqueeze(0);  // (1, heads, keys, dim)
  torch::Tensor vx =
      v.narrow(1, 0, keys).repeat_interleave(group, 0).unsqueeze(0);  // (1, heads, keys, dim)
  torch::Tensor out;
  if (shape.window == 0 && shape.pos0 == 0) {
    out = at::scaled_dot_product_attention(q.unsqueeze(0), kx, vx, {}, 0.0, /*is_causal=*/n > 1);
  } else if (shape.window == 0 && n == 1) {
    out = at::scaled_dot_product_attention(q.unsqueeze(0), kx, vx, {}, 0.0, /*is_causal=*/false);
  } else {
    torch::Tensor allowed =
        MaskedPositions(shape.pos0, n, keys, shape.window, q.device()).logical_not();
    out =
        at::scaled_dot_product_attention(q.unsqueeze(0), kx, vx, allowed, 0.0, /*is_causal=*/false);
  }
  return out.squeeze(0);
#else
  return ExplicitAttention(q, k, v, shape, nullptr).value();
#endif
}

}  // namespace attnscope
