#include "engine/capture_processor.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

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

// Row entropies [..., rows] of float32 probabilities and the scores they came from (same shape,
// rows contiguous), on the CPU in one read of each. With the rows' lse [..., rows] (the fused path)
// H = lse·Σp - Σ p·s: the recomputed p = exp(s - lse) sum to 1 only to the kernel's rounding of
// lse, and lse·(Σp - 1) would be an error of lse's size (1e-5 at lse ≈ 10). Else H = lse - Σ p·s
// with lse = s_max - log p_max (the softmax is monotonic: p is largest where s is).
// Eight independent lanes let the compiler use vector registers; rows are split across the intra-op
// threads.
torch::Tensor RowEntropyCpu(const torch::Tensor& probs, const torch::Tensor& scores,
                            const torch::Tensor& lse) {
  const torch::Tensor p = probs.contiguous(), s = scores.contiguous();
  const torch::Tensor l = lse.defined() ? lse.contiguous() : lse;
  const float* LSE = l.defined() ? l.data_ptr<float>() : nullptr;
  const int64_t k = p.size(-1), rows = k == 0 ? 0 : p.numel() / k;
  std::vector<int64_t> out_shape(p.sizes().begin(), p.sizes().end() - 1);
  torch::Tensor out = torch::empty(out_shape, p.options());
  const float* P = p.data_ptr<float>();
  const float* S = s.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    constexpr int L = 8;
    for (int64_t r = begin; r < end; ++r) {
      const float* pr = P + r * k;
      const float* sr = S + r * k;
      if (LSE != nullptr) {  // Σ p·s and Σ p
        float acc[L] = {}, mass[L] = {};
        int64_t j = 0;
        for (; j + L <= k; j += L) {
          for (int i = 0; i < L; ++i) {
            acc[i] += pr[j + i] * sr[j + i];
            mass[i] += pr[j + i];
          }
        }
        double dot = 0, sum = 0;
        for (; j < k; ++j) {
          dot += pr[j] * sr[j];
          sum += pr[j];
        }
        for (int i = 0; i < L; ++i) {
          dot += acc[i];
          sum += mass[i];
        }
        O[r] = static_cast<float>(std::max(0.0, static_cast<double>(LSE[r]) * sum - dot));
        continue;
      }
      float smax[L], pmax[L], acc[L];
      for (int i = 0; i < L; ++i) {
        smax[i] = std::numeric_limits<float>::lowest();
        pmax[i] = 0.0f;
        acc[i] = 0.0f;
      }
      int64_t j = 0;
      for (; j + L <= k; j += L) {
        for (int i = 0; i < L; ++i) {
          smax[i] = std::max(smax[i], sr[j + i]);
          pmax[i] = std::max(pmax[i], pr[j + i]);
          acc[i] += pr[j + i] * sr[j + i];
        }
      }
      for (; j < k; ++j) {
        smax[0] = std::max(smax[0], sr[j]);
        pmax[0] = std::max(pmax[0], pr[j]);
        acc[0] += pr[j] * sr[j];
      }
      float sm = smax[0], pm = pmax[0];
      double dot = 0;
      for (int i = 0; i < L; ++i) {
        sm = std::max(sm, smax[i]);
        pm = std::max(pm, pmax[i]);
        dot += acc[i];
      }
      O[r] = static_cast<float>(
          std::max(0.0, static_cast<double>(sm) - std::log(static_cast<double>(pm)) - dot));
    }
  });
  return out;
}

// Pads the last dimension with zeros up to `length` (keys past the causal limit are masked).
torch::Tensor PadKeys(const torch::Tensor& t, int64_t length) {
  const int64_t have = t.size(-1);
  if (have >= length) return t;
  return torch::constant_pad_nd(t, {0, length - have}, 0.0);
}

}  // namespace

CaptureProcessor::CaptureProcessor(const CaptureSpec& spec, int64_t num_layers, int64_t num_heads,
                                   int64_t prompt_len, AttentionSink* sink, bool queued_copies,
                                   int64_t max_queued_bytes)
    : spec_(spec),
      prompt_len_(prompt_len),
      sink_(sink),
      queued_copies_(queued_copies),
      max_queued_bytes_(max_queued_bytes) {
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

FlashStatistics CaptureProcessor::StatisticsForPass(Phase phase, int64_t pos0, int64_t n) const {
  FlashStatistics s;
  s.entropy = spec_.stats.row_entropy;
  s.sink = spec_.stats.sink_mass;
  s.local = spec_.stats.local_mass;
  if (phase == Phase::kPrefill && spec_.stats.key_score > 0) {  // the last prompt rows
    s.key_score_begin = std::clamp<int64_t>(prompt_len_ - spec_.stats.key_score - pos0, 0, n);
    s.key_score_end = std::clamp<int64_t>(prompt_len_ - pos0, 0, n);
  }
  return s;
}

std::vector<std::pair<int64_t, int64_t>> CaptureProcessor::RowsWanted(
    Phase phase, int64_t pos0, int64_t n, bool statistics_in_pass) const {
  std::vector<std::pair<int64_t, int64_t>> rows;
  if (phase != Phase::kPrefill) {
    // Every row, or none where the pass computes the statistics and nothing else is captured.
    const bool probs = spec_.form != Form::kNone || spec_.stats.key_score_variance;
    if (statistics_in_pass && !probs) rows.emplace_back(0, 0);
    return rows;
  }
  auto add = [&](int64_t begin, int64_t end) {  // absolute positions
    begin = std::max<int64_t>(begin - pos0, 0);
    end = std::min<int64_t>(end - pos0, n);
    if (begin < end) rows.emplace_back(begin, end);
  };
  const auto& st = spec_.stats;
  const bool row_statistics =
      !statistics_in_pass && (st.row_entropy != 0 || st.sink_mass > 0 || st.local_mass > 0);
  if (spec_.form != Form::kNone || row_statistics) {
    for (const QueryRange& r : prompt_rows_) add(r.begin, r.end);
  }
  if (st.key_score > 0 && !statistics_in_pass) add(prompt_len_ - st.key_score, prompt_len_);
  if (rows.empty()) rows.emplace_back(0, 0);  // none (an empty list would mean all)
  return rows;
}

absl::Status CaptureProcessor::OnProbs(Phase phase, int64_t step, int64_t layer,
                                       int64_t query_begin, const torch::Tensor& probs,
                                       const torch::Tensor& scores, const torch::Tensor& lse,
                                       int64_t key_length, bool statistics_in_pass) {
  const bool row_entropy_wanted = spec_.stats.row_entropy && !statistics_in_pass;
  const torch::Tensor p = SelectedHeads(probs);  // [heads, m, computed_keys]
  // The scores and lse only where the entropy reads them.
  const torch::Tensor s = row_entropy_wanted ? SelectedHeads(scores) : scores;
  torch::Tensor row_lse = row_entropy_wanted ? SelectedHeads(lse) : lse;  // [heads, m] or undefined
  // Row entropy of the whole block at once, from the scores: with lse the softmax's
  // log-normaliser, H = -Σ p log p = -Σ p (s - lse) = lse·Σp - Σ p·s (Σp = 1 up to rounding). The
  // fused path knows lse; on the explicit path lse = s_max - log p_max (at the row's largest score
  // p is largest, so its log is exact). On the CPU one pass over the block (RowEntropyCpu);
  // elsewhere tensor operations.
  torch::Tensor entropy;
  if (row_entropy_wanted && p.device().is_cpu() && p.scalar_type() == torch::kFloat32 &&
      s.scalar_type() == torch::kFloat32) {
    entropy = RowEntropyCpu(p, s, row_lse);  // [h, m]
  } else if (row_entropy_wanted) {
    if (row_lse.defined()) {
      entropy = (row_lse * p.sum(-1) - (p * s).sum(-1)).clamp_min_(0.0);  // [h, m]
    } else {
      auto [smax, arg] = s.max(-1, /*keepdim=*/true);          // [h, m, 1]
      row_lse = (smax - p.gather(-1, arg).log()).squeeze(-1);  // [h, m]
      entropy = (row_lse - (p * s).sum(-1)).clamp_min_(0.0);   // [h, m]
    }
  }
  const int64_t m = p.size(1);
  const int64_t computed = p.size(2);

  if (phase == Phase::kPrefill) {
    // Key score: attention each key receives, summed over the last W prompt rows.
    const int64_t w = statistics_in_pass ? 0 : spec_.stats.key_score;
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
          EmitRows(phase, step, layer, a, p.narrow(1, a - query_begin, b - a),
                   entropy.defined() ? entropy.narrow(1, a - query_begin, b - a) : entropy,
                   key_length, !statistics_in_pass));
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
  // With the statistics in the pass only the form is emitted from the rows.
  return EmitRows(phase, step, layer, query_begin, p, entropy, key_length, !statistics_in_pass);
}

absl::Status CaptureProcessor::OnPassStatistics(Phase phase, int64_t step, int64_t layer,
                                                int64_t pos0, const FlashResult& pass,
                                                int64_t key_length) {
  const int64_t n = pass.lse.size(1);
  const torch::Tensor entropy = SelectedHeads(pass.entropy);  // [heads, n] or undefined
  const torch::Tensor sink = SelectedHeads(pass.sink);
  const torch::Tensor local = SelectedHeads(pass.local);
  // The selected prompt rows inside the pass, absolute; in decode every row.
  const std::vector<QueryRange> decode_rows = {{pos0, pos0 + n}};
  for (const QueryRange& r : phase == Phase::kPrefill ? prompt_rows_ : decode_rows) {
    const int64_t a = std::max(r.begin, pos0), b = std::min(r.end, pos0 + n);
    if (a >= b) continue;
    if (entropy.defined()) {
      RETURN_IF_ERROR(EmitStat(StatKind::kRowEntropy, phase, step, layer, a, b, key_length,
                               entropy.narrow(1, a - pos0, b - a)));
    }
    if (sink.defined()) {
      RETURN_IF_ERROR(EmitStat(StatKind::kSinkMass, phase, step, layer, a, b, key_length,
                               sink.narrow(1, a - pos0, b - a)));
    }
    if (local.defined()) {
      RETURN_IF_ERROR(EmitStat(StatKind::kLocalMass, phase, step, layer, a, b, key_length,
                               local.narrow(1, a - pos0, b - a)));
    }
  }
  if (pass.key_score.defined()) {  // this pass's share of the last rows' sums, over its keys
    if (!key_score_[layer].defined()) {
      key_score_[layer] = torch::zeros({static_cast<int64_t>(heads_.size()), prompt_len_},
                                       pass.key_score.options());
    }
    const int64_t keys = std::min(pass.key_score.size(1), prompt_len_);
    key_score_[layer].narrow(1, 0, keys).add_(SelectedHeads(pass.key_score).narrow(1, 0, keys));
    if (pos0 + n >= prompt_len_) {
      RETURN_IF_ERROR(EmitStat(StatKind::kKeyScore, phase, step, layer, 0, prompt_len_, prompt_len_,
                               key_score_[layer]));
      key_score_[layer] = torch::Tensor();
    }
  }
  return absl::OkStatus();
}

absl::Status CaptureProcessor::EmitRows(Phase phase, int64_t step, int64_t layer, int64_t row_begin,
                                        const torch::Tensor& rows, const torch::Tensor& entropy,
                                        int64_t key_length, bool row_statistics) {
  const int64_t m = rows.size(1);
  const int64_t computed = rows.size(2);
  const auto& st = spec_.stats;
  if (!row_statistics) {
    if (spec_.form != Form::kNone)
      RETURN_IF_ERROR(EmitForm(phase, step, layer, row_begin, rows, key_length));
    return absl::OkStatus();
  }
  if (st.row_entropy) {
    RETURN_IF_ERROR(EmitStat(StatKind::kRowEntropy, phase, step, layer, row_begin, row_begin + m,
                             key_length, entropy));
  }
  if (st.sink_mass > 0) {
    const int64_t k = std::min(st.sink_mass, computed);
    RETURN_IF_ERROR(EmitStat(StatKind::kSinkMass, phase, step, layer, row_begin, row_begin + m,
                             key_length, rows.narrow(-1, 0, k).sum(-1)));
  }
  if (st.local_mass > 0) {
    // Row at position i: mass on keys (i - w, i], gathered (w per row) rather than masked (all
    // keys).
    const int64_t w = std::min(st.local_mass, computed);
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
  Block block;
  BlockHeader& h = block.header;
  h = Header(BlockKind::kAttention, phase, step, layer, row_begin, row_begin + m, key_length);
  h.form = spec_.form;
  h.pool = spec_.pool;
  h.element_type = spec_.element_type;
  const int64_t dense_bytes =
      rows.size(0) * m * std::max(rows.size(2), key_length) * ElementSize(spec_.element_type);
  if (spec_.form == Form::kDense && sink_->PlacesValues() && !Queues(step, dense_bytes)) {
    // Written piece by piece where the sink places them (keys padded with 0 on the way): no
    // materialized copy of the block. After the blocks made before it.
    RETURN_IF_ERROR(Flush());
    const int64_t heads = rows.size(0), have = rows.size(2);
    const int64_t keys = std::max(have, key_length);
    h.shape = {heads, m, keys};
    const auto options = torch::TensorOptions().dtype(TorchType(spec_.element_type));
    block.fill = [&rows, m, have, keys, options](int64_t first, int64_t count, void* dst) {
      char* out = static_cast<char*>(dst);
      const int64_t elem = static_cast<int64_t>(options.dtype().itemsize());
      for (int64_t at = first, end = first + count; at < end;) {
        const int64_t row = at / keys, col = at % keys;  // row: over (head, query row)
        const int64_t head = row / m, r = row % m;
        int64_t n = 0;
        if (col == 0 && r == 0 && end - at >= m * keys) {  // whole heads, in one copy
          const int64_t count_heads = (end - at) / (m * keys);
          torch::Tensor d = torch::from_blob(out, {count_heads, m, keys}, options);
          d.narrow(2, 0, have).copy_(rows.narrow(0, head, count_heads));
          if (keys > have) d.narrow(2, have, keys - have).zero_();
          n = count_heads * m * keys;
        } else if (col == 0 && end - at >= keys) {  // whole rows of one head
          const int64_t count_rows = std::min(m - r, (end - at) / keys);
          torch::Tensor d = torch::from_blob(out, {count_rows, keys}, options);
          d.narrow(1, 0, have).copy_(rows[head].narrow(0, r, count_rows));
          if (keys > have) d.narrow(1, have, keys - have).zero_();
          n = count_rows * keys;
        } else {  // part of one row
          const int64_t stop = std::min(keys, col + (end - at));
          const int64_t copied = std::min(std::max(have, col), stop);
          torch::Tensor d = torch::from_blob(out, {stop - col}, options);
          if (copied > col)
            d.narrow(0, 0, copied - col).copy_(rows[head][r].narrow(0, col, copied - col));
          if (stop > copied) d.narrow(0, copied - col, stop - copied).zero_();
          n = stop - col;
        }
        out += n * elem;
        at += n;
      }
    };
    return sink_->OnBlock(block);
  }
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
      indices = idx.to(torch::kInt32);
      break;
    }
  }
  values = values.to(TorchType(spec_.element_type));
  h.shape.assign(values.sizes().begin(), values.sizes().end());
  return Hand(std::move(block), values, indices);
}

absl::Status CaptureProcessor::EmitStat(StatKind kind, Phase phase, int64_t step, int64_t layer,
                                        int64_t row_begin, int64_t row_end, int64_t key_length,
                                        const torch::Tensor& values) {
  Block block;
  BlockHeader& h = block.header;
  h = Header(BlockKind::kStatistic, phase, step, layer, row_begin, row_end, key_length);
  h.stat = kind;
  h.element_type = ElementType::kFloat32;
  h.shape.assign(values.sizes().begin(), values.sizes().end());
  return Hand(std::move(block), values.to(torch::kFloat32), torch::Tensor());
}

absl::Status CaptureProcessor::Hand(Block block, const torch::Tensor& values,
                                    const torch::Tensor& indices) {
  if (!Queues(block.header.step,
              values.nbytes() + (indices.defined() ? indices.nbytes() : int64_t{0}))) {
    RETURN_IF_ERROR(Flush());  // the blocks made before it first
    const torch::Tensor host = values.cpu().contiguous();
    const torch::Tensor host_indices = indices.defined() ? indices.cpu().contiguous() : indices;
    block.values = host.data_ptr();
    if (host_indices.defined()) block.indices = host_indices.data_ptr();
    return sink_->OnBlock(block);
  }
  Queued q;
  q.values = HostCopyQueued(values);
  if (indices.defined()) q.indices = HostCopyQueued(indices);
  q.copied = DeviceEvent(values.device());
  q.from_device = !values.device().is_cpu();
  q.block = std::move(block);
  q.block.values = q.values.data_ptr();
  if (q.indices.defined()) q.block.indices = q.indices.data_ptr();
  q.bytes = q.values.nbytes() + (q.indices.defined() ? q.indices.nbytes() : 0);
  queued_bytes_ += q.bytes;
  queued_.push_back(std::move(q));
  return HandReady();
}

absl::Status CaptureProcessor::HandReady() {
  while (!queued_.empty() && queued_.front().block.header.step < hold_from_ &&
         (queued_bytes_ > max_queued_bytes_ ||
          (queued_.front().from_device && queued_.front().copied.Done()))) {
    RETURN_IF_ERROR(HandOldest());
  }
  return absl::OkStatus();
}

absl::Status CaptureProcessor::Flush(int64_t through_step) {
  while (!queued_.empty() && queued_.front().block.header.step <= through_step) {
    RETURN_IF_ERROR(HandOldest());
  }
  return absl::OkStatus();
}

absl::Status CaptureProcessor::HandOldest() {
  Queued q = std::move(queued_.front());
  queued_.pop_front();
  queued_bytes_ -= q.bytes;
  q.copied.Wait();
  return sink_->OnBlock(q.block);
}

void CaptureProcessor::Drop(int64_t step) {
  while (!queued_.empty() && queued_.back().block.header.step >= step) {
    queued_bytes_ -= queued_.back().bytes;
    queued_.pop_back();
  }
}

torch::Tensor CaptureProcessor::SelectedHeads(const torch::Tensor& t) {
  if (all_heads_ || !t.defined()) return t;
  if (!head_index_.defined() || head_index_.device() != t.device()) {
    head_index_ = torch::tensor(heads_, torch::dtype(torch::kInt64)).to(t.device());
  }
  return t.index_select(0, head_index_);
}

BlockHeader CaptureProcessor::Header(BlockKind kind, Phase phase, int64_t step, int64_t layer,
                                     int64_t row_begin, int64_t row_end, int64_t key_length) const {
  BlockHeader h;
  h.kind = kind;
  h.phase = phase;
  h.step = step;
  h.layer = layer;
  h.heads = heads_;
  h.query_begin = row_begin;
  h.query_end = row_end;
  h.key_length = key_length;
  return h;
}

absl::Status CaptureProcessor::Finish() {
  RETURN_IF_ERROR(Flush());
  if (!spec_.stats.key_score_variance || decode_steps_seen_ == 0) return absl::OkStatus();
  for (size_t layer = 0; layer < var_sum_.size(); ++layer) {
    if (!var_sum_[layer].defined()) continue;
    const double n = static_cast<double>(decode_steps_seen_);
    torch::Tensor mean = var_sum_[layer] / n;
    torch::Tensor var = (var_sum_sq_[layer] / n - mean * mean).clamp_min(0.0);
    RETURN_IF_ERROR(EmitStat(StatKind::kKeyScoreVariance, Phase::kDecode, decode_steps_seen_,
                             static_cast<int64_t>(layer), 0, prompt_len_, prompt_len_, var));
  }
  return Flush();
}

}  // namespace attnscope
