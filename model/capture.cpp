#include "model/capture.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "absl/strings/str_cat.h"
#include "model/status_macros.h"

namespace attnscope {
namespace {

torch::ScalarType TorchType(ElementType t) {
  switch (t) {
    case ElementType::kFloat32:
      return torch::kFloat32;
    case ElementType::kFloat16:
      return torch::kFloat16;
    case ElementType::kBFloat16:
      return torch::kBFloat16;
  }
  return torch::kFloat32;
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The host memory of a CPU, contiguous tensor (which must outlive the view).
HostArray HostView(const torch::Tensor& t) {
  HostArray a;
  switch (t.scalar_type()) {
    case torch::kFloat16:
      a.dtype = "F16";
      break;
    case torch::kBFloat16:
      a.dtype = "BF16";
      break;
    case torch::kInt32:
      a.dtype = "I32";
      break;
    default:
      a.dtype = "F32";
      break;
  }
  a.data = t.data_ptr();
  a.shape.assign(t.sizes().begin(), t.sizes().end());
  a.bytes = t.numel() * static_cast<int64_t>(t.element_size());
  return a;
}

// Pads the last dimension with zeros up to `length` (keys past the causal limit are masked).
torch::Tensor PadKeys(const torch::Tensor& t, int64_t length) {
  const int64_t have = t.size(-1);
  if (have >= length) return t;
  return torch::constant_pad_nd(t, {0, length - have}, 0.0);
}

// Resolved prompt rows of the spec, as sorted disjoint ranges.
std::vector<QueryRange> PromptRows(const CaptureSpec& spec, int64_t prompt_len) {
  std::vector<QueryRange> rows;
  if (spec.last_queries > 0) {
    rows.push_back({std::max<int64_t>(0, prompt_len - spec.last_queries), prompt_len});
  } else if (!spec.query_ranges.empty()) {
    rows = spec.query_ranges;
    std::sort(rows.begin(), rows.end(),
              [](const QueryRange& a, const QueryRange& b) { return a.begin < b.begin; });
    for (auto& r : rows) r.end = std::min(r.end, prompt_len);
  } else {
    rows.push_back({0, prompt_len});
  }
  return rows;
}

int64_t RowCount(const std::vector<QueryRange>& rows) {
  int64_t n = 0;
  for (const auto& r : rows) n += std::max<int64_t>(0, r.end - r.begin);
  return n;
}

}  // namespace

const char* PhaseName(Phase phase) { return phase == Phase::kPrefill ? "prefill" : "decode"; }

const char* FormName(Form form) {
  switch (form) {
    case Form::kNone:
      return "none";
    case Form::kDense:
      return "dense";
    case Form::kHeadMean:
      return "head_mean";
    case Form::kHeadMax:
      return "head_max";
    case Form::kPooled:
      return "pooled";
    case Form::kTopK:
      return "top_k";
  }
  return "?";
}

const char* ElementTypeName(ElementType type) {
  switch (type) {
    case ElementType::kFloat32:
      return "float32";
    case ElementType::kFloat16:
      return "float16";
    case ElementType::kBFloat16:
      return "bfloat16";
  }
  return "?";
}

int64_t ElementSize(ElementType type) { return type == ElementType::kFloat32 ? 4 : 2; }

const char* StatKindName(StatKind kind) {
  switch (kind) {
    case StatKind::kRowEntropy:
      return "row_entropy";
    case StatKind::kSinkMass:
      return "sink_mass";
    case StatKind::kLocalMass:
      return "local_mass";
    case StatKind::kKeyScore:
      return "key_score";
    case StatKind::kKeyScoreVariance:
      return "key_score_variance";
  }
  return "?";
}

absl::Status ValidateCaptureSpec(const CaptureSpec& spec, int64_t num_layers, int64_t num_heads,
                                 int64_t prompt_len) {
  std::set<int64_t> seen;
  for (int64_t l : spec.layers) {
    if (l < 0 || l >= num_layers) {
      return absl::OutOfRangeError(absl::StrCat("layer ", l, " requested, model has ", num_layers,
                                                " layers (0-", num_layers - 1, ")"));
    }
    if (!seen.insert(l).second)
      return absl::InvalidArgumentError(absl::StrCat("layer ", l, " is listed twice"));
  }
  seen.clear();
  for (int64_t h : spec.heads) {
    if (h < 0 || h >= num_heads) {
      return absl::OutOfRangeError(absl::StrCat("head ", h, " requested, model has ", num_heads,
                                                " attention heads (0-", num_heads - 1, ")"));
    }
    if (!seen.insert(h).second)
      return absl::InvalidArgumentError(absl::StrCat("head ", h, " is listed twice"));
  }
  if (spec.Enabled() && !spec.prefill && !spec.decode) {
    return absl::InvalidArgumentError("capture selects neither the prefill nor the decode phase");
  }
  if (spec.last_queries < 0) return absl::InvalidArgumentError("last_queries must be >= 0");
  if (spec.last_queries > 0 && !spec.query_ranges.empty()) {
    return absl::InvalidArgumentError("give either last_queries or query_ranges, not both");
  }
  std::vector<QueryRange> ranges = spec.query_ranges;
  std::sort(ranges.begin(), ranges.end(),
            [](const QueryRange& a, const QueryRange& b) { return a.begin < b.begin; });
  for (size_t i = 0; i < ranges.size(); ++i) {
    const auto& r = ranges[i];
    if (r.begin < 0 || r.end <= r.begin) {
      return absl::InvalidArgumentError(
          absl::StrCat("query range [", r.begin, ", ", r.end, ") is empty or negative"));
    }
    if (i > 0 && r.begin < ranges[i - 1].end) {
      return absl::InvalidArgumentError(absl::StrCat("query ranges [", ranges[i - 1].begin, ", ",
                                                     ranges[i - 1].end, ") and [", r.begin, ", ",
                                                     r.end, ") overlap"));
    }
    if (prompt_len >= 0 && r.end > prompt_len) {
      return absl::OutOfRangeError(absl::StrCat("query range [", r.begin, ", ", r.end,
                                                ") goes past the prompt of ", prompt_len,
                                                " tokens"));
    }
  }
  if (spec.form == Form::kPooled && spec.pool <= 0) {
    return absl::InvalidArgumentError("pooled form needs a tile size pool >= 1");
  }
  if (spec.form == Form::kTopK && spec.top_k <= 0)
    return absl::InvalidArgumentError("top_k form needs k >= 1");
  const auto& st = spec.stats;
  if (st.key_score_window < 0 || st.sink_tokens < 0 || st.local_window < 0) {
    return absl::InvalidArgumentError("statistics windows must be >= 0");
  }
  return absl::OkStatus();
}

int64_t EstimateCaptureBytes(const CaptureSpec& spec, int64_t num_layers, int64_t num_heads,
                             int64_t prompt_len, int64_t max_new_tokens) {
  if (!spec.Enabled()) return 0;
  const int64_t layers =
      spec.layers.empty() ? num_layers : static_cast<int64_t>(spec.layers.size());
  const int64_t heads = spec.heads.empty() ? num_heads : static_cast<int64_t>(spec.heads.size());
  const int64_t rows = spec.prefill ? RowCount(PromptRows(spec, prompt_len)) : 0;
  const int64_t steps = spec.decode ? std::max<int64_t>(0, max_new_tokens - 1) : 0;
  const int64_t elem = ElementSize(spec.element_type);
  // Bytes of one block of `r` rows over `keys` keys. In double: a request may describe more bytes
  // than int64 holds (exact below 2^53, 9 PB); the result saturates.
  auto block_bytes = [&](double r, int64_t keys) -> double {
    switch (spec.form) {
      case Form::kNone:
        return 0;
      case Form::kDense:
        return heads * r * keys * elem;
      case Form::kHeadMean:
      case Form::kHeadMax:
        return r * keys * elem;
      case Form::kPooled:
        return heads * std::ceil(r / spec.pool) * std::ceil(static_cast<double>(keys) / spec.pool) *
               elem;
      case Form::kTopK:
        return heads * r * std::min(spec.top_k, keys) * (elem + 4);
    }
    return 0;
  };
  double per_layer = rows > 0 ? block_bytes(rows, prompt_len) : 0;
  for (int64_t t = 1; t <= steps; ++t) per_layer += block_bytes(1, prompt_len + t);
  const auto& st = spec.stats;
  const int64_t row_stats =
      (st.row_entropy ? 1 : 0) + (st.sink_tokens > 0 ? 1 : 0) + (st.local_window > 0 ? 1 : 0);
  per_layer += 4.0 * row_stats * heads * (rows + steps);
  if (st.key_score_window > 0 && spec.prefill) per_layer += 4.0 * heads * prompt_len;
  if (st.key_score_variance && steps > 0) per_layer += 4.0 * heads * prompt_len;
  const double total = per_layer * layers;
  return total >= 9.2e18 ? std::numeric_limits<int64_t>::max() : static_cast<int64_t>(total);
}

CaptureProcessor::CaptureProcessor(const CaptureSpec& spec, int64_t num_layers, int64_t num_heads,
                                   int64_t prompt_len, AttentionSink* sink)
    : spec_(spec), prompt_len_(prompt_len), sink_(sink) {
  layer_on_.assign(num_layers, spec.layers.empty());
  for (int64_t l : spec.layers) layer_on_[l] = true;
  all_heads_ = spec.heads.empty();
  if (all_heads_) {
    for (int64_t h = 0; h < num_heads; ++h) heads_.push_back(h);
  } else {
    heads_ = spec.heads;
  }
  prompt_rows_ = PromptRows(spec, prompt_len);
  key_score_.resize(num_layers);
  var_sum_.resize(num_layers);
  var_sum_sq_.resize(num_layers);
}

bool CaptureProcessor::Wants(Phase phase, int64_t layer) const {
  if (sink_ == nullptr || !spec_.Enabled() || !layer_on_[layer]) return false;
  return phase == Phase::kPrefill ? spec_.prefill : spec_.decode;
}

absl::Status CaptureProcessor::OnProbs(Phase phase, int64_t step, int64_t layer,
                                       int64_t query_begin, const torch::Tensor& probs,
                                       int64_t key_length) {
  torch::Tensor p = probs;  // [heads, m, computed_keys]
  if (!all_heads_) {
    if (!head_index_.defined() || head_index_.device() != probs.device()) {
      head_index_ = torch::tensor(heads_, torch::dtype(torch::kInt64)).to(probs.device());
    }
    p = p.index_select(0, head_index_);
  }
  const int64_t m = p.size(1);
  const int64_t computed = p.size(2);

  if (phase == Phase::kPrefill) {
    // Key score: attention each key receives, summed over the last W prompt rows.
    const int64_t w = spec_.stats.key_score_window;
    if (w > 0) {
      const int64_t from = std::max<int64_t>(query_begin, prompt_len_ - w);
      const int64_t to = query_begin + m;
      if (!key_score_[layer].defined()) {
        key_score_[layer] = torch::zeros({p.size(0), prompt_len_}, p.options());
      }
      if (from < to) {
        key_score_[layer]
            .narrow(1, 0, computed)
            .add_(p.narrow(1, from - query_begin, to - from).sum(1));
      }
      if (to == prompt_len_) {
        RETURN_IF_ERROR(EmitStat(StatKind::kKeyScore, phase, step, layer, 0, prompt_len_,
                                 prompt_len_, key_score_[layer]));
        key_score_[layer] = torch::Tensor();
      }
    }
    // Rows the spec selects, as contiguous runs inside this block.
    for (const QueryRange& r : prompt_rows_) {
      const int64_t a = std::max(r.begin, query_begin);
      const int64_t b = std::min(r.end, query_begin + m);
      if (a >= b) continue;
      RETURN_IF_ERROR(
          EmitRows(phase, step, layer, a, p.narrow(1, a - query_begin, b - a), key_length));
    }
    return absl::OkStatus();
  }

  // Decode: one row over every earlier position.
  if (spec_.stats.key_score_variance) {
    const int64_t keys = std::min(prompt_len_, computed);
    torch::Tensor row = p.select(1, 0).narrow(1, 0, keys).to(torch::kFloat64);  // [heads, prompt]
    if (!var_sum_[layer].defined()) {
      var_sum_[layer] = torch::zeros({p.size(0), prompt_len_}, row.options());
      var_sum_sq_[layer] = torch::zeros({p.size(0), prompt_len_}, row.options());
    }
    var_sum_[layer].narrow(1, 0, keys).add_(row);
    var_sum_sq_[layer].narrow(1, 0, keys).add_(row * row);
    decode_steps_seen_ = std::max(decode_steps_seen_, step);
  }
  return EmitRows(phase, step, layer, query_begin, p, key_length);
}

absl::Status CaptureProcessor::EmitRows(Phase phase, int64_t step, int64_t layer, int64_t row_begin,
                                        const torch::Tensor& rows, int64_t key_length) {
  const int64_t m = rows.size(1);
  const int64_t computed = rows.size(2);
  const auto& st = spec_.stats;
  if (st.row_entropy) {
    // H = -Σ p log p, with 0 log 0 = 0: log(p + 1e-30) is log p for every p a float32 softmax
    // produces above 1e-30 and finite at 0; one block-sized temporary (xlogy is far slower on CPU).
    torch::Tensor logp = (rows + 1e-30f).log_();
    RETURN_IF_ERROR(EmitStat(StatKind::kRowEntropy, phase, step, layer, row_begin, row_begin + m,
                             key_length, -(logp.mul_(rows)).sum(-1)));
  }
  if (st.sink_tokens > 0) {
    const int64_t k = std::min(st.sink_tokens, computed);
    RETURN_IF_ERROR(EmitStat(StatKind::kSinkMass, phase, step, layer, row_begin, row_begin + m,
                             key_length, rows.narrow(-1, 0, k).sum(-1)));
  }
  if (st.local_window > 0) {
    // Row at position i: mass on keys (i - w, i], gathered (w per row) rather than masked (all
    // keys).
    const int64_t w = std::min(st.local_window, computed);
    auto opts = torch::TensorOptions().dtype(torch::kInt64).device(rows.device());
    torch::Tensor pos = torch::arange(row_begin, row_begin + m, opts).unsqueeze(1);  // (m, 1)
    torch::Tensor key = pos - torch::arange(0, w, opts).unsqueeze(0);                // (m, w)
    torch::Tensor valid = (key >= 0).to(rows.scalar_type());                         // (m, w)
    torch::Tensor index = key.clamp_min(0).unsqueeze(0).expand({rows.size(0), m, w});
    RETURN_IF_ERROR(EmitStat(StatKind::kLocalMass, phase, step, layer, row_begin, row_begin + m,
                             key_length, (rows.gather(-1, index) * valid).sum(-1)));
  }
  if (spec_.form != Form::kNone)
    RETURN_IF_ERROR(EmitForm(phase, step, layer, row_begin, rows, key_length));
  return absl::OkStatus();
}

absl::Status CaptureProcessor::EmitForm(Phase phase, int64_t step, int64_t layer, int64_t row_begin,
                                        const torch::Tensor& rows, int64_t key_length) {
  const int64_t m = rows.size(1);
  AttentionBlock block;
  block.phase = phase;
  block.step = step;
  block.layer = layer;
  block.heads = &heads_;
  block.query_begin = row_begin;
  block.query_end = row_begin + m;
  block.key_length = key_length;
  block.form = spec_.form;
  block.pool = spec_.pool;
  torch::Tensor values, indices;
  switch (spec_.form) {
    case Form::kNone:
      return absl::OkStatus();
    case Form::kDense:
      values = PadKeys(rows, key_length);
      break;
    case Form::kHeadMean:
      values = PadKeys(rows.mean(0, /*keepdim=*/true), key_length);
      break;
    case Form::kHeadMax:
      values = PadKeys(std::get<0>(rows.max(0, /*keepdim=*/true)), key_length);
      break;
    case Form::kPooled: {
      // Tiles start at the block's first row and at key 0; edge tiles average what they cover.
      // A tile side past the block is one tile either way; clamping it keeps the padding small.
      const int64_t p = std::min(spec_.pool, std::max(m, key_length));
      const int64_t tr = CeilDiv(m, p);
      const int64_t tk = CeilDiv(key_length, p);
      // Keys first (the block shrinks p-fold), then rows; zero padding never wins a max of
      // probabilities.
      const bool max = spec_.pool_op == PoolOp::kMax;
      torch::Tensor keys = torch::constant_pad_nd(rows, {0, tk * p - rows.size(2)}, 0.0)
                               .view({rows.size(0), m, tk, p});
      keys = max ? keys.amax(-1) : keys.sum(-1);  // (heads, m, tk)
      torch::Tensor tiles =
          torch::constant_pad_nd(keys, {0, 0, 0, tr * p - m}, 0.0).view({rows.size(0), tr, p, tk});
      if (max) {
        values = tiles.amax(2);
      } else {
        auto opts = torch::TensorOptions().dtype(torch::kFloat32).device(rows.device());
        torch::Tensor row_count = (m - torch::arange(tr, opts) * p).clamp_max(p);           // (tr)
        torch::Tensor key_count = (key_length - torch::arange(tk, opts) * p).clamp_max(p);  // (tk)
        values = tiles.sum(2) / (row_count.unsqueeze(1) * key_count.unsqueeze(0));
      }
      break;
    }
    case Form::kTopK: {
      const int64_t k = std::min(spec_.top_k, key_length);
      auto [v, idx] = PadKeys(rows, key_length).topk(k, /*dim=*/-1);
      values = v;
      indices = idx.to(torch::kInt32).cpu().contiguous();
      block.indices = HostView(indices);
      break;
    }
  }
  const torch::Tensor host = values.to(TorchType(spec_.element_type)).cpu().contiguous();
  block.values = HostView(host);
  return sink_->OnAttention(block);
}

absl::Status CaptureProcessor::EmitStat(StatKind kind, Phase phase, int64_t step, int64_t layer,
                                        int64_t row_begin, int64_t row_end, int64_t key_length,
                                        const torch::Tensor& values) {
  StatBlock stat;
  stat.kind = kind;
  stat.phase = phase;
  stat.step = step;
  stat.layer = layer;
  stat.heads = &heads_;
  stat.query_begin = row_begin;
  stat.query_end = row_end;
  stat.key_length = key_length;
  const torch::Tensor host = values.to(torch::kFloat32).cpu().contiguous();
  stat.values = HostView(host);
  return sink_->OnStatistic(stat);
}

absl::Status CaptureProcessor::Finish() {
  if (!spec_.stats.key_score_variance || decode_steps_seen_ == 0) return absl::OkStatus();
  for (size_t layer = 0; layer < var_sum_.size(); ++layer) {
    if (!var_sum_[layer].defined()) continue;
    const double n = static_cast<double>(decode_steps_seen_);
    torch::Tensor mean = var_sum_[layer] / n;
    torch::Tensor var = (var_sum_sq_[layer] / n - mean * mean).clamp_min(0.0);
    RETURN_IF_ERROR(EmitStat(StatKind::kKeyScoreVariance, Phase::kDecode, decode_steps_seen_,
                             static_cast<int64_t>(layer), 0, prompt_len_, prompt_len_, var));
  }
  return absl::OkStatus();
}

}  // namespace attnscope
