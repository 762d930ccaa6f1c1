#include "engine/head_detector.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace attnscope {
namespace {

// Accumulates Σ p·pattern and Σ p per (layer, head, kind) from dense float32 prefill blocks.
class DetectorSink : public AttentionSink {
 public:
  DetectorSink(const std::vector<int64_t>& ids, const HeadProbe& probe, int64_t layers,
               int64_t heads)
      : probe_(probe),
        heads_(heads),
        hit_(layers * heads * kNumHeadKinds, 0.0),
        mass_(layers * heads * kNumHeadKinds, 0.0) {
    // Per row, the keys of the duplicate-token and induction patterns (previous-token is i - 1).
    const int64_t n = static_cast<int64_t>(ids.size());
    duplicate_.resize(n);
    induction_.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < i; ++j) {
        if (ids[j] != ids[i]) continue;
        duplicate_[i].push_back(j);
        induction_[i].push_back(j + 1);  // j + 1 <= i
      }
    }
  }

  absl::Status OnBlock(const Block& block) override {
    const BlockHeader& h = block.header;
    if (h.kind != BlockKind::kAttention || h.form != Form::kDense ||
        h.element_type != ElementType::kFloat32 || h.phase != Phase::kPrefill ||
        block.values == nullptr) {
      return absl::InternalError("head detector: expected dense float32 prefill blocks");
    }
    const float* p = static_cast<const float*>(block.values);
    const int64_t rows = h.query_end - h.query_begin;
    const int64_t keys = h.key_length;
    for (size_t hi = 0; hi < h.heads.size(); ++hi) {
      double* hit = &hit_[(h.layer * heads_ + h.heads[hi]) * kNumHeadKinds];
      double* mass = &mass_[(h.layer * heads_ + h.heads[hi]) * kNumHeadKinds];
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = h.query_begin + r;
        const float* row = p + (static_cast<int64_t>(hi) * rows + r) * keys;
        // The row's mass after the exclusions (the same denominator for the three patterns).
        double total = 0;
        for (int64_t j = 0; j <= i; ++j) total += row[j];
        if (probe_.exclude_bos) total -= row[0];
        if (probe_.exclude_current_token && !(probe_.exclude_bos && i == 0)) total -= row[i];
        auto kept = [&](int64_t j) {
          return !(probe_.exclude_bos && j == 0) && !(probe_.exclude_current_token && j == i);
        };
        double prev = 0, dup = 0, ind = 0;
        if (i >= 1 && kept(i - 1)) prev = row[i - 1];
        for (int64_t j : duplicate_[i])
          if (kept(j)) dup += row[j];
        for (int64_t j : induction_[i])
          if (kept(j)) ind += row[j];
        const double parts[3] = {prev, dup, ind};
        for (int k = 0; k < 3; ++k) {
          hit[k] += parts[k];
          mass[k] += total;
        }
        if (i >= 1) {  // sink: the mean of p(i, 0) over rows i >= 1
          hit[3] += row[0];
          mass[3] += 1;
        }
      }
    }
    return absl::OkStatus();
  }

  std::vector<double> Scores() const {
    std::vector<double> out(hit_.size());
    for (size_t k = 0; k < out.size(); ++k) out[k] = mass_[k] > 0 ? hit_[k] / mass_[k] : 0.0;
    return out;
  }

 private:
  const HeadProbe& probe_;
  int64_t heads_;
  std::vector<std::vector<int64_t>> duplicate_, induction_;
  std::vector<double> hit_, mass_;  // [layer][head][kind]
};

// The probe's ids (the length against the context is ProbeIds' check).
absl::StatusOr<std::vector<int64_t>> BuildProbe(const ModelInfo& info, const HeadProbe& probe) {
  if (!probe.ids.empty()) {
    const int64_t n = static_cast<int64_t>(probe.ids.size());
    if (n < 2 || n > kMaxProbeTokens) {
      return absl::InvalidArgumentError(
          absl::StrCat("probe_ids has ", n, " ids; a probe has 2 to ", kMaxProbeTokens, " ids"));
    }
    return probe.ids;
  }
  if (probe.span < 1 || probe.span > kMaxProbeSpan) {
    return absl::InvalidArgumentError(
        absl::StrCat("span = ", probe.span, " must be in [1, ", kMaxProbeSpan, "]"));
  }
  // The special ids inside the vocabulary, each once (the random ids avoid them).
  std::vector<int64_t> special;
  auto add_special = [&](int64_t id) {
    if (id >= 0 && id < info.vocab_size &&
        std::find(special.begin(), special.end(), id) == special.end()) {
      special.push_back(id);
    }
  };
  for (int64_t id : info.eos_token_ids) add_special(id);
  if (info.bos_token_id.has_value()) add_special(*info.bos_token_id);
  if (static_cast<int64_t>(special.size()) >= info.vocab_size) {
    return absl::FailedPreconditionError("the vocabulary has no ids besides its special ones");
  }
  std::vector<int64_t> span;
  uint64_t x = 0x9E3779B97F4A7C15ull ^ probe.seed;
  if (x == 0) x = 1;
  while (static_cast<int64_t>(span.size()) < probe.span) {
    x ^= x << 13;  // xorshift64
    x ^= x >> 7;
    x ^= x << 17;
    const int64_t id = static_cast<int64_t>(x % static_cast<uint64_t>(info.vocab_size));
    if (std::find(special.begin(), special.end(), id) == special.end()) span.push_back(id);
  }
  std::vector<int64_t> ids;
  if (info.bos_token_id.has_value()) ids.push_back(*info.bos_token_id);
  ids.insert(ids.end(), span.begin(), span.end());
  ids.insert(ids.end(), span.begin(), span.end());
  return ids;
}

}  // namespace

absl::StatusOr<std::vector<int64_t>> ProbeIds(const ModelInfo& info, const HeadProbe& probe) {
  ASSIGN_OR_RETURN(std::vector<int64_t> ids, BuildProbe(info, probe));
  if (static_cast<int64_t>(ids.size()) > info.max_position_embeddings) {
    return absl::OutOfRangeError(absl::StrCat("the probe has ", ids.size(),
                                              " ids, more than the model's context of ",
                                              info.max_position_embeddings));
  }
  return ids;
}

absl::StatusOr<HeadDetection> DetectHeads(const Engine& engine, const HeadProbe& probe,
                                          const CancelToken* cancel) {
  const ModelInfo& info = engine.info();
  HeadDetection out;
  ASSIGN_OR_RETURN(out.probe_ids, ProbeIds(info, probe));
  out.num_layers = info.num_layers;
  out.num_heads = info.num_heads;
  GenerateRequest request;
  request.prompt_ids = out.probe_ids;
  request.max_new_tokens = 0;
  CaptureSpec capture;
  capture.form = Form::kDense;
  capture.decode = false;
  ASSIGN_OR_RETURN(const ValidatedRequest valid, engine.Validate(request, capture));
  DetectorSink sink(out.probe_ids, probe, info.num_layers, info.num_heads);
  ASSIGN_OR_RETURN(const GenerateResult result, engine.Generate(valid, &sink, cancel));
  if (result.finish == FinishReason::kCancelled) {
    return absl::CancelledError("the head detection was cancelled");
  }
  out.scores = sink.Scores();
  return out;
}

}  // namespace attnscope
