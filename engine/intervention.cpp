#include "engine/intervention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "engine/layer_intervention.h"

namespace attnscope {
namespace {

absl::Status CheckLayers(const std::vector<int64_t>& layers, int64_t num_layers,
                         const std::string& field) {
  if (static_cast<int64_t>(layers.size()) > num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " lists ", layers.size(), " layers; the model has ", num_layers));
  }
  for (int64_t l : layers) {
    if (l < 0 || l >= num_layers) {
      return absl::OutOfRangeError(absl::StrCat(field, ": layer ", l, " requested, model has ",
                                                num_layers, " layers (0-", num_layers - 1, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckHeads(const std::vector<int64_t>& heads, int64_t num_heads,
                        const std::string& field) {
  if (static_cast<int64_t>(heads.size()) > num_heads) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " lists ", heads.size(), " heads; the model has ", num_heads));
  }
  for (int64_t h : heads) {
    if (h < 0 || h >= num_heads) {
      return absl::OutOfRangeError(absl::StrCat(field, ": head ", h, " requested, model has ",
                                                num_heads, " attention heads (0-", num_heads - 1,
                                                ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckRanges(const std::vector<PositionRange>& ranges, int64_t limit,
                         const std::string& field, const char* limit_name) {
  for (const PositionRange& r : ranges) {
    if (r.begin < 0 || r.end <= r.begin) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": range [", r.begin, ", ", r.end,
                       ") is empty or negative (begin < end, from 0)"));
    }
    if (r.end > limit) {
      return absl::OutOfRangeError(absl::StrCat(field, ": range [", r.begin, ", ", r.end,
                                                ") ends past ", limit_name, " (", limit, ")"));
    }
  }
  return absl::OkStatus();
}

bool Contains(const std::vector<int64_t>& list, int64_t x) {
  return std::find(list.begin(), list.end(), x) != list.end();
}

}  // namespace

absl::Status ValidateKvPolicy(const KvPolicy& p, int64_t num_layers, int64_t num_kv_heads,
                              int64_t prompt_len) {
  if (p.kind == KvPolicyKind::kNone) return absl::OkStatus();
  const std::string name = absl::StrCat("kv_policy (", RowOf(kKvPolicyKinds, p.kind).name, ")");
  auto invalid = [&](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": ", parts...));
  };
  if (prompt_len < 2) return invalid("needs a prompt of at least 2 tokens, got ", prompt_len);
  const bool ratio = p.compression_ratio != 0, budget = p.budget != 0;
  if (ratio == budget) {
    return invalid(
        "set exactly one of compression_ratio (in (0, 1)) and budget (keys kept per kv "
        "head, at least 1)");
  }
  if (ratio && !(p.compression_ratio > 0 && p.compression_ratio < 1)) {
    return invalid("compression_ratio ", p.compression_ratio, " is outside (0, 1)");
  }
  if (p.budget < 0) return invalid("budget ", p.budget, " is negative");
  if (p.budget > prompt_len) {
    return absl::OutOfRangeError(
        absl::StrCat(name, ": budget ", p.budget, " keys is more than the prompt's ", prompt_len));
  }
  switch (p.kind) {
    case KvPolicyKind::kStreamingLlm:
      if (p.n_sink < 0 || p.n_sink >= prompt_len) {
        return invalid("n_sink ", p.n_sink, " must be in [0, ", prompt_len,
                       ") (the prompt's length)");
      }
      break;
    case KvPolicyKind::kH2o:
      if (p.recent_size < 0 || p.recent_size >= prompt_len) {
        return invalid("recent_size ", p.recent_size, " must be in [0, ", prompt_len,
                       ") (the prompt's length)");
      }
      break;
    case KvPolicyKind::kSnapKv:
    case KvPolicyKind::kPyramidKv:
      if (p.window_size < 1 || p.window_size >= prompt_len) {
        return invalid("window_size ", p.window_size, " must be in [1, ", prompt_len,
                       ") (the prompt's length)");
      }
      if (p.kernel_size < 1 || p.kernel_size > 1023 || p.kernel_size % 2 == 0) {
        return invalid("kernel_size ", p.kernel_size, " must be odd, from 1 to 1023");
      }
      if (p.kind == KvPolicyKind::kPyramidKv && !(p.beta >= 1 && p.beta <= 1e6)) {
        return invalid("beta ", p.beta, " must be in [1, 1e6]");
      }
      break;
    case KvPolicyKind::kNone:
      break;
  }
  if (p.adaptive) {
    if (p.kind == KvPolicyKind::kPyramidKv) {
      return invalid(
          "adaptive (Ada-KV) shares one budget across a layer's heads; pyramidkv sets "
          "its own per layer: choose one");
    }
    if (!(p.alpha_safeguard >= 0 && p.alpha_safeguard <= 1)) {
      return invalid("alpha_safeguard ", p.alpha_safeguard, " is outside [0, 1]");
    }
  }
  if (p.decode_interval != 0) {
    if (p.kind != KvPolicyKind::kStreamingLlm && p.kind != KvPolicyKind::kH2o) {
      return invalid(
          "decode_interval applies to streaming_llm and h2o, whose scores are defined on decode "
          "rows; this policy scores the prompt's observation window, once");
    }
    if (p.decode_interval < 0 || p.decode_interval > kMaxDecodeInterval) {
      return invalid("decode_interval ", p.decode_interval, " must be in [1, ", kMaxDecodeInterval,
                     "] (0: decide once, after the prefill)");
    }
    if (p.report_scores) {
      return invalid(
          "report_scores is for one decision after the prefill; with decode_interval read the "
          "kept bits");
    }
  }
  if (p.report_scores && num_layers * num_kv_heads * prompt_len > kMaxReportedScores) {
    return invalid("report_scores: ", num_layers, " layers x ", num_kv_heads, " kv heads x ",
                   prompt_len, " keys is more than ", kMaxReportedScores,
                   " scores per request; read the kept bits instead");
  }
  return absl::OkStatus();
}

int64_t KeptKeys(const KvPolicy& p, int64_t layer, int64_t num_layers, int64_t n) {
  const double kept = p.budget > 0 ? static_cast<double>(p.budget) : n * (1 - p.compression_ratio);
  if (p.kind != KvPolicyKind::kPyramidKv || num_layers < 2) return static_cast<int64_t>(kept);
  // PyramidKV (kvpress' get_layer_budget, after KVCache-Factory): budgets fall linearly with depth
  // from max_num to min_num around the mean, the observation window on top; uniform where the
  // pyramid does not fit.
  const double w = static_cast<double>(p.window_size);
  const double max_capacity = w + kept;
  double min_num = (max_capacity - w) / p.beta;
  double max_num = (max_capacity - w) * 2 - min_num;
  if (max_num >= n - w) {
    max_num = n - w;
    min_num = (max_capacity - w) * 2 - max_num;
  }
  if (!(n >= max_num && max_num >= min_num && min_num >= w)) {
    return static_cast<int64_t>(std::nearbyint(kept));  // Python's round: half to even
  }
  const double steps = (max_num - min_num) / static_cast<double>(num_layers - 1);
  return static_cast<int64_t>(std::nearbyint(max_num - layer * steps));
}

absl::Status ValidateInterventions(const Interventions& iv, int64_t num_layers, int64_t num_heads,
                                   int64_t num_kv_heads, int64_t prompt_len,
                                   int64_t max_positions) {
  RETURN_IF_ERROR(ValidateKvPolicy(iv.kv_policy, num_layers, num_kv_heads, prompt_len));
  if (static_cast<int64_t>(iv.ablations.size()) > kMaxAblations) {
    return absl::InvalidArgumentError(
        absl::StrCat("ablations has ", iv.ablations.size(), " entries, more than ", kMaxAblations));
  }
  if (static_cast<int64_t>(iv.knockouts.size()) > kMaxKnockouts) {
    return absl::InvalidArgumentError(
        absl::StrCat("knockouts has ", iv.knockouts.size(), " entries, more than ", kMaxKnockouts));
  }
  for (size_t i = 0; i < iv.ablations.size(); ++i) {
    const HeadAblation& a = iv.ablations[i];
    const std::string field = absl::StrCat("ablations[", i, "]");
    RETURN_IF_ERROR(CheckLayers({a.layer}, num_layers, field));
    if (a.heads.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".heads is empty: name the heads"));
    }
    RETURN_IF_ERROR(CheckHeads(a.heads, num_heads, field + ".heads"));
  }
  int64_t ranges = 0;
  for (const Knockout& k : iv.knockouts) {
    ranges += static_cast<int64_t>(k.keys.size() + k.queries.size());
  }
  if (ranges > kMaxKnockoutRanges) {
    return absl::InvalidArgumentError(absl::StrCat(
        "knockouts hold ", ranges, " ranges together, more than ", kMaxKnockoutRanges));
  }
  for (size_t i = 0; i < iv.knockouts.size(); ++i) {
    const Knockout& k = iv.knockouts[i];
    const std::string field = absl::StrCat("knockouts[", i, "]");
    RETURN_IF_ERROR(CheckLayers(k.layers, num_layers, field + ".layers"));
    RETURN_IF_ERROR(CheckHeads(k.heads, num_heads, field + ".heads"));
    if (k.keys.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".keys is empty: name the key positions to hide"));
    }
    RETURN_IF_ERROR(CheckRanges(k.keys, prompt_len, field + ".keys", "the prompt"));
    RETURN_IF_ERROR(
        CheckRanges(k.queries, max_positions, field + ".queries", "the model's context"));
  }
  return absl::OkStatus();
}

LayerInterventions::LayerInterventions(const Interventions& iv, int64_t layer, int64_t num_heads) {
  for (const Knockout& k : iv.knockouts) {
    if (!k.layers.empty() && !Contains(k.layers, layer)) continue;
    rules_.push_back(Rule{k.heads, k.keys, k.queries});
  }
  for (const HeadAblation& a : iv.ablations) {
    if (a.layer != layer) continue;
    std::vector<int64_t>& list = a.kind == AblationKind::kZero ? zero_ : mean_;
    for (int64_t h : a.heads)
      if (!Contains(list, h)) list.push_back(h);
  }
  if (iv.kv_policy.kind != KvPolicyKind::kNone) policy_ = &iv.kv_policy;
  // A head both zeroed and mean-ablated is zeroed.
  mean_.erase(
      std::remove_if(mean_.begin(), mean_.end(), [&](int64_t h) { return Contains(zero_, h); }),
      mean_.end());
  (void)num_heads;
}

void LayerInterventions::Evict(const torch::Tensor& kept, int64_t group, int64_t from_position) {
  constexpr int64_t kHeld = std::numeric_limits<int64_t>::max();
  const int64_t keys = kept.size(1);
  torch::Tensor at = torch::full({kept.size(0) * group, keys}, kHeld, torch::kInt64);
  if (evicted_at_.defined()) at.narrow(1, 0, evicted_at_.size(1)).copy_(evicted_at_);
  torch::Tensor newly = kept.logical_not().repeat_interleave(group, 0).logical_and(at == kHeld);
  evicted_at_ = at.masked_fill(newly, from_position);
}

void LayerInterventions::HideKeys(torch::Tensor& scores, int64_t first_query) const {
  const int64_t rows = scores.size(1), keys = scores.size(2);
  if (evicted_at_.defined()) {
    const int64_t cols = std::min(keys, evicted_at_.size(1));
    auto opts = torch::TensorOptions().dtype(torch::kInt64).device(scores.device());
    torch::Tensor qpos = torch::arange(first_query, first_query + rows, opts).view({1, rows, 1});
    torch::Tensor hidden = evicted_at_.narrow(1, 0, cols).to(scores.device()).unsqueeze(1) <= qpos;
    scores.narrow(2, 0, cols).masked_fill_(hidden, std::numeric_limits<float>::lowest());
  }
  HideKnockouts(scores, first_query);
}

void LayerInterventions::HideKnockouts(torch::Tensor& scores, int64_t first_query) const {
  const int64_t heads = scores.size(0), rows = scores.size(1), keys = scores.size(2);
  const int64_t last = first_query + rows;  // one past the block's last query position
  for (const Rule& rule : rules_) {
    std::vector<PositionRange> queries = rule.queries;
    if (queries.empty()) queries.push_back({0, last});
    for (const PositionRange& q : queries) {
      const int64_t r0 = std::max(q.begin, first_query), r1 = std::min(q.end, last);
      if (r0 >= r1) continue;
      for (const PositionRange& k : rule.keys) {
        // Keys before the row's own position only: the row at p hides keys ∩ [0, p).
        const int64_t c0 = k.begin, c1 = std::min({k.end, keys, r1 - 1});
        if (c0 >= c1) continue;
        auto opts = torch::TensorOptions().dtype(torch::kInt64).device(scores.device());
        torch::Tensor qpos = torch::arange(r0, r1, opts).unsqueeze(1);
        torch::Tensor kpos = torch::arange(c0, c1, opts).unsqueeze(0);
        torch::Tensor hidden = kpos < qpos;  // (rows, cols)
        auto fill = [&](int64_t h) {
          scores[h]
              .narrow(0, r0 - first_query, r1 - r0)
              .narrow(1, c0, c1 - c0)
              .masked_fill_(hidden, std::numeric_limits<float>::lowest());
        };
        if (rule.heads.empty()) {
          for (int64_t h = 0; h < heads; ++h) fill(h);
        } else {
          for (int64_t h : rule.heads) fill(h);
        }
      }
    }
  }
}

torch::Tensor LayerInterventions::HiddenMass(const torch::Tensor& probs_row,
                                             int64_t position) const {
  torch::Tensor marked = probs_row.unsqueeze(1).clone();  // (heads, 1, keys)
  HideKeys(marked, position);                             // hidden entries: the lowest float
  return (probs_row * marked.squeeze(1).lt(0)).sum(-1);
}

void LayerInterventions::Ablate(torch::Tensor& attn, Phase phase) {
  for (int64_t h : zero_) attn[h].zero_();
  if (mean_.empty()) return;
  if (phase == Phase::kPrefill) {
    std::vector<torch::Tensor> means;
    for (int64_t h : mean_) means.push_back(attn[h].to(torch::kFloat32).mean(0));
    means_ = torch::stack(means);  // (heads ablated, dim) float32
  }
  for (size_t i = 0; i < mean_.size(); ++i) {
    attn[mean_[i]].copy_(
        means_[static_cast<int64_t>(i)].to(attn.scalar_type()).expand_as(attn[mean_[i]]));
  }
}

}  // namespace attnscope
