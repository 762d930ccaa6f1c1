#include "engine/kv_policy.h"

#include <limits>

namespace attnscope {

KvPolicyScorer::KvPolicyScorer(const KvPolicy& policy, int64_t layer, int64_t num_layers,
                               int64_t num_heads, int64_t num_kv_heads, int64_t n)
    : policy_(policy),
      layer_(layer),
      num_layers_(num_layers),
      heads_(num_heads),
      kv_heads_(num_kv_heads),
      n_(n),
      kept_(std::clamp<int64_t>(KeptKeys(policy, layer, num_layers, n), 0, n)) {
  reads_prefill_ = policy_.kind == KvPolicyKind::kH2o || policy_.kind == KvPolicyKind::kSnapKv ||
                   policy_.kind == KvPolicyKind::kPyramidKv;
  reads_decode_ = policy_.kind == KvPolicyKind::kH2o && policy_.decode_interval > 0;
}

bool KvPolicyScorer::NeedsProbs(Phase phase) const {
  return phase == Phase::kPrefill ? reads_prefill_ : reads_decode_;
}

RowRanges KvPolicyScorer::Rows() const {
  switch (policy_.kind) {
    case KvPolicyKind::kH2o:
      return {{0, n_}};
    case KvPolicyKind::kSnapKv:
    case KvPolicyKind::kPyramidKv:
      return {{n_ - policy_.window_size, n_}};
    default:
      return {};
  }
}

void KvPolicyScorer::OnProbs(int64_t position, const torch::Tensor& probs) {
  if (!reads_prefill_) return;
  const int64_t m = probs.size(1), keys = probs.size(2);
  if (policy_.kind == KvPolicyKind::kH2o) {
    if (!sums_.defined() || sums_.size(1) < keys) {
      // Room for the prompt, then for the decode rows' keys, grown a prompt's length at a time.
      const int64_t width = std::max(n_, keys + (reads_decode_ ? n_ : 0));
      torch::Tensor grown = torch::zeros({heads_, width}, probs.options().dtype(torch::kFloat64));
      if (sums_.defined()) grown.narrow(1, 0, sums_.size(1)).copy_(sums_);
      sums_ = grown;
    }
    sums_.narrow(1, 0, keys).add_(probs.sum(1).to(torch::kFloat64));
    return;
  }
  const int64_t w0 = n_ - policy_.window_size;  // the window's first row
  const int64_t r0 = std::max(position, w0), r1 = std::min(position + m, n_);
  if (r0 >= r1) return;
  if (!sums_.defined()) {
    sums_ = torch::zeros({heads_, w0}, probs.options().dtype(torch::kFloat64));
  }
  const int64_t cols = std::min(keys, w0);
  sums_.narrow(1, 0, cols)
      .add_(probs.narrow(1, r0 - position, r1 - r0).narrow(2, 0, cols).sum(1).to(torch::kFloat64));
}

KvPolicyScorer::Choice KvPolicyScorer::Decide(int64_t length) {
  const int64_t group = heads_ / kv_heads_;
  const int64_t L = length;
  torch::Tensor scores;  // (kv_heads, L) float32 on the CPU
  switch (policy_.kind) {
    case KvPolicyKind::kStreamingLlm: {
      const int64_t pruned = L - kept_;
      scores = torch::ones({kv_heads_, L});
      const int64_t b = std::min(policy_.n_sink, L), e = std::min(policy_.n_sink + pruned, L);
      if (e > b) scores.narrow(1, b, e - b).zero_();
      break;
    }
    case KvPolicyKind::kH2o: {
      torch::Tensor seen = torch::arange(L, 0, -1, torch::kFloat64);  // rows that see key j
      torch::Tensor sums = sums_.narrow(1, 0, L).to(torch::kCPU);
      scores = (sums / seen).view({kv_heads_, group, L}).mean(1).to(torch::kFloat32);
      if (policy_.recent_size > 0) {
        scores.narrow(1, L - policy_.recent_size, policy_.recent_size)
            .fill_(scores.max().item<float>() + 1);
      }
      break;
    }
    case KvPolicyKind::kSnapKv:
    case KvPolicyKind::kPyramidKv: {
      const int64_t w = policy_.window_size, k = policy_.kernel_size;
      torch::Tensor mean =
          (sums_.to(torch::kCPU) / static_cast<double>(w)).to(torch::kFloat32);  // (heads, n - w)
      torch::Tensor pooled = torch::avg_pool1d(mean.unsqueeze(0), {k}, {1}, {k / 2}).squeeze(0);
      torch::Tensor per_kv = pooled.view({kv_heads_, group, n_ - w}).mean(1);
      scores = torch::cat({per_kv, torch::full({kv_heads_, w}, per_kv.max().item<float>() + 1)}, 1);
      break;
    }
    case KvPolicyKind::kNone:
      scores = torch::ones({kv_heads_, L});
      break;
  }
  // The keys still held: those the last decision kept, and every later one.
  torch::Tensor alive = torch::ones({kv_heads_, L}, torch::kBool);
  if (kept_before_.defined()) {
    alive.narrow(1, 0, kept_before_.size(1)).copy_(kept_before_);
    scores.masked_fill_(alive.logical_not(), -std::numeric_limits<float>::infinity());
  }
  const int64_t kept = std::min(kept_, L);
  torch::Tensor mask;
  if (!policy_.adaptive) {
    mask = torch::zeros({kv_heads_, L}, torch::kBool);
    mask.scatter_(1, std::get<1>(scores.topk(kept, -1)), true);
  } else {
    // Ada-KV (kvpress' AdaKVPress): each head's top int(kept * alpha) are safe; the layer evicts
    // its kv_heads * (n - kept) lowest scores over all heads together.
    torch::Tensor s = scores.clone();
    const auto safe = static_cast<int64_t>(static_cast<double>(kept) * policy_.alpha_safeguard);
    s.scatter_(-1, std::get<1>(s.topk(safe, -1)), std::numeric_limits<float>::max());
    const int64_t pruned = kv_heads_ * (L - kept);
    mask = torch::ones({kv_heads_ * L}, torch::kBool);
    mask.index_fill_(0, std::get<1>((-s.reshape({-1})).topk(pruned)), false);
    mask = mask.view({kv_heads_, L});
  }
  kept_before_ = mask;
  return {scores, mask, alive};
}

KvDecision ToKvDecision(int64_t step, int64_t layer, const KvPolicyScorer::Choice& choice,
                        bool with_scores, int64_t bytes_per_key) {
  KvDecision d;
  d.step = step;
  d.layer = layer;
  d.kv_heads = choice.kept.size(0);
  d.keys = choice.kept.size(1);
  const torch::Tensor kept = choice.kept.contiguous();
  const bool* bits = kept.data_ptr<bool>();
  const torch::Tensor alive = choice.alive.contiguous();
  const bool* held = alive.data_ptr<bool>();
  const int64_t total = d.kv_heads * d.keys;
  d.kept.assign((total + 7) / 8, 0);
  d.kept_per_head.assign(d.kv_heads, 0);
  int64_t evicted = 0;
  for (int64_t i = 0; i < total; ++i) {
    if (bits[i]) {
      d.kept[i / 8] |= static_cast<uint8_t>(1u << (i % 8));
      ++d.kept_per_head[i / d.keys];
    } else if (held[i]) {
      ++evicted;  // by this decision
    }
  }
  d.bytes_freed = evicted * bytes_per_key;
  if (with_scores) {
    const torch::Tensor s = choice.scores.contiguous();
    d.scores.assign(s.data_ptr<float>(), s.data_ptr<float>() + total);
  }
  return d;
}

}  // namespace attnscope
