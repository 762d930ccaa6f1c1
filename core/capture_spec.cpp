#include "core/capture_spec.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "absl/strings/str_cat.h"
#include "core/block.h"

namespace attnscope {

std::array<int64_t, 3> BlockShape(Form form, int64_t heads, int64_t rows, int64_t keys,
                                  int64_t pool, int64_t top_k) {
  const FormInfo& info = RowOf(kForms, form);
  if (info.shape == nullptr) return {0, 0, 0};
  return info.shape(heads, rows, keys, std::max<int64_t>(1, pool), top_k);
}

std::string BlockName(const BlockHeader& h) {
  if (h.kind == BlockKind::kStatistic) {
    return absl::StrCat("statistic.", StatKindName(h.stat), ".", PhaseName(h.phase), ".", h.layer,
                        ".", h.step, ".", h.query_begin);
  }
  return absl::StrCat("attention.", PhaseName(h.phase), ".", h.layer, ".", h.step, ".",
                      h.query_begin);
}

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

namespace {

int64_t RowCount(const std::vector<QueryRange>& rows) {
  int64_t n = 0;
  for (const auto& r : rows) n += std::max<int64_t>(0, r.end - r.begin);
  return n;
}

}  // namespace

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
  for (const StatisticInfo& st : kStatistics) {
    const int64_t v = spec.stats.*st.param;
    if (v < 0 || (!st.takes_value && v > 1)) {
      return absl::InvalidArgumentError(absl::StrCat("statistic ", st.name, ": ", v, " is not ",
                                                     st.takes_value ? ">= 0" : "0 or 1"));
    }
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
  const FormInfo& form = RowOf(kForms, spec.form);
  const int64_t elem = ElementSize(spec.element_type) + (form.indices ? 4 : 0);
  // Bytes of one block of `r` rows over `keys` keys. In double: a request may describe more bytes
  // than int64 holds (exact below 2^53, 9 PB); the result saturates.
  auto block_bytes = [&](int64_t r, int64_t keys) -> double {
    if (form.shape == nullptr || r <= 0) return 0;
    const auto s = form.shape(heads, std::min<int64_t>(r, int64_t{1} << 40), keys,
                              std::max<int64_t>(1, spec.pool), spec.top_k);
    return static_cast<double>(s[0]) * static_cast<double>(s[1]) * static_cast<double>(s[2]) *
           static_cast<double>(elem);
  };
  double per_layer = block_bytes(rows, prompt_len);
  // Decode blocks grow by one key per step (steps are bounded by the model's context, which
  // Engine::Validate checks before anything estimates).
  for (int64_t t = 1; t <= steps; ++t) per_layer += block_bytes(1, prompt_len + t);
  for (const StatisticInfo& st : kStatistics) {
    if (spec.stats.*st.param <= 0) continue;
    if (st.axis == StatAxis::kRows) {
      per_layer += 4.0 * heads * (rows + steps);
    } else if (st.value == StatKind::kKeyScore ? spec.prefill : steps > 0) {
      per_layer += 4.0 * heads * prompt_len;
    }
  }
  const double total = per_layer * layers;
  return total >= 9.2e18 ? std::numeric_limits<int64_t>::max() : static_cast<int64_t>(total);
}

}  // namespace attnscope
