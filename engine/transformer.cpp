#include "engine/transformer.h"

#include "core/status_macros.h"
#include "engine/attention.h"
#include "engine/cpu_matvec.h"
#include "engine/kv_policy.h"
#include "engine/rope.h"

namespace attnscope {
namespace {

torch::Tensor Linear(const torch::Tensor& x, const torch::Tensor& w,
                     const torch::Tensor& b = torch::Tensor()) {
  if (CpuMatvecSupports(x, w)) {  // one row (decode, the LM head) on the CPU
    torch::Tensor y = CpuMatvec(x, w);
    return b.defined() ? y.add_(b) : y;
  }
  return b.defined() ? torch::addmm(b, x, w.t()) : torch::matmul(x, w.t());
}

// Drops from layer l's cache the keys and values a policy did not keep (kept: (kv_heads, length)
// bool over positions): each kv head's kept positions, in order, fill slots [0, its count); the
// layer's slots are its fullest head's count (the others padded, position -1) plus `headroom`
// for the positions to come. The old tensors are released.
void Compact(KVCache* cache, size_t l, const torch::Tensor& kept, int64_t headroom) {
  const torch::Tensor& k = cache->k[l];
  const int64_t kv_heads = k.size(0), dim = k.size(2);
  auto i64 = torch::TensorOptions().dtype(torch::kInt64).device(k.device());
  const int64_t length = kept.size(1);
  if (cache->positions.size() <= l) {
    cache->positions.resize(cache->k.size());
    cache->filled.resize(cache->k.size(), 0);
  }
  // Slots held now and their positions.
  const bool compacted = cache->positions[l].defined();
  const int64_t held = compacted ? cache->filled[l] : length;
  torch::Tensor old_positions = compacted ? cache->positions[l].narrow(1, 0, held)
                                          : torch::arange(held, i64).expand({kv_heads, held});
  torch::Tensor keep = kept.to(k.device())
                           .gather(1, old_positions.clamp_min(0))
                           .logical_and(old_positions >= 0);  // (kv_heads, held)
  const torch::Tensor counts = keep.sum(1);
  const int64_t slots = counts.max().item<int64_t>();
  // Kept slots first, in slot (= position) order.
  torch::Tensor order = std::get<1>(
      (keep.logical_not().to(torch::kInt64) * held + torch::arange(held, i64).unsqueeze(0))
          .sort(1));
  order = order.narrow(1, 0, slots);
  torch::Tensor valid = torch::arange(slots, i64).unsqueeze(0) < counts.unsqueeze(1);
  torch::Tensor new_positions = torch::full({kv_heads, slots + headroom}, -1, i64);
  new_positions.narrow(1, 0, slots).copy_(old_positions.gather(1, order).masked_fill(~valid, -1));
  torch::Tensor index = order.unsqueeze(-1).expand({kv_heads, slots, dim});
  for (std::vector<torch::Tensor>* t : {&cache->k, &cache->v}) {
    torch::Tensor fresh = torch::empty({kv_heads, slots + headroom, dim}, k.options());
    fresh.narrow(1, 0, slots).copy_((*t)[l].narrow(1, 0, held).gather(1, index));
    (*t)[l] = fresh;
  }
  cache->positions[l] = new_positions;
  cache->filled[l] = slots;
}

}  // namespace

Transformer::Transformer(ModelConfig config, Weights weights, torch::Device device,
                         torch::ScalarType dtype)
    : config_(std::move(config)), weights_(std::move(weights)), device_(device), dtype_(dtype) {
  inv_freq_ = RopeInverseFrequencies(config_.rope, config_.head_dim).to(device_);
}

KVCache Transformer::NewCache(int64_t capacity) const {
  KVCache cache;
  cache.capacity = capacity;
  auto opts = torch::TensorOptions().dtype(dtype_).device(device_);
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    cache.k.push_back(torch::empty({config_.num_kv_heads, capacity, config_.head_dim}, opts));
    cache.v.push_back(torch::empty({config_.num_kv_heads, capacity, config_.head_dim}, opts));
  }
  return cache;
}

torch::Tensor Transformer::RmsNorm(const torch::Tensor& x, const torch::Tensor& weight) const {
  // x / sqrt(mean(x²) + eps) in float32, scaled by the weight in the compute dtype
  torch::Tensor xf = x.to(torch::kFloat32);
  torch::Tensor normed =
      xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + config_.rms_norm_eps);
  return weight * normed.to(dtype_);
}

absl::StatusOr<torch::Tensor> Transformer::Forward(const std::vector<int64_t>& ids, KVCache* cache,
                                                   CaptureProcessor* capture, Phase phase,
                                                   int64_t step, const ForwardOptions& options,
                                                   ForwardInterventions* interventions) const {
  return Forward(torch::tensor(ids, torch::dtype(torch::kInt64)).to(device_), cache, capture, phase,
                 step, options, interventions);
}

absl::StatusOr<torch::Tensor> Transformer::Forward(const torch::Tensor& ids_t, KVCache* cache,
                                                   CaptureProcessor* capture, Phase phase,
                                                   int64_t step, const ForwardOptions& options,
                                                   ForwardInterventions* interventions) const {
  const int64_t n = ids_t.size(0);
  const int64_t pos0 = cache->length;
  const int64_t heads = config_.num_heads, kv_heads = config_.num_kv_heads, dim = config_.head_dim;
  torch::Tensor x =
      weights_.global[TensorId::kTokenEmbedding].index_select(0, ids_t);  // (n, hidden)
  auto [cos, sin] = cache->rope.Rows(inv_freq_, pos0, n, dtype_);         // (n, head_dim) each

  if (interventions != nullptr && interventions->measure) {
    interventions->hidden_mass.assign(config_.num_layers, torch::Tensor());
  }
  if (interventions != nullptr) interventions->decisions.clear();
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    const TensorSet& w = weights_.layers[l];
    // Attention block: RMSNorm, q/k/v projections, per-head q/k norms (Qwen3), RoPE on q and k,
    // cache append.
    torch::Tensor h = RmsNorm(x, w[TensorId::kAttnNorm]);
    torch::Tensor q = Linear(h, w[TensorId::kWq], w[TensorId::kBq])
                          .view({n, heads, dim})
                          .transpose(0, 1);  // (heads, n, dim)
    torch::Tensor k = Linear(h, w[TensorId::kWk], w[TensorId::kBk])
                          .view({n, kv_heads, dim})
                          .transpose(0, 1);  // (kv, n, dim)
    torch::Tensor v = Linear(h, w[TensorId::kWv], w[TensorId::kBv])
                          .view({n, kv_heads, dim})
                          .transpose(0, 1);  // (kv, n, dim)
    if (w[TensorId::kQNorm].defined()) q = RmsNorm(q, w[TensorId::kQNorm]);
    if (w[TensorId::kKNorm].defined()) k = RmsNorm(k, w[TensorId::kKNorm]);
    q = ApplyRope(q, cos, sin);
    k = ApplyRope(k, cos, sin);
    const bool compacted =
        l < static_cast<int64_t>(cache->positions.size()) && cache->positions[l].defined();
    if (compacted) {
      // A policy's compacted layer: the new positions take the next slots.
      const int64_t f = cache->filled[l];
      cache->k[l].narrow(1, f, n).copy_(k);
      cache->v[l].narrow(1, f, n).copy_(v);
      cache->positions[l].narrow(1, f, n).copy_(
          torch::arange(pos0, pos0 + n, torch::dtype(torch::kInt64).device(device_))
              .expand({kv_heads, n}));
      cache->filled[l] = f + n;
    } else {
      cache->k[l].narrow(1, pos0, n).copy_(k);
      cache->v[l].narrow(1, pos0, n).copy_(v);
    }

    AttentionShape shape;
    shape.pos0 = pos0;
    shape.window = config_.sliding_window[l];
    shape.query_block = options.query_block;
    shape.block_elements = options.block_elements;
    shape.row_multiple = options.row_multiple;
    LayerInterventions* intervention =
        interventions != nullptr && !interventions->measure ? &interventions->layers[l] : nullptr;
    if (intervention != nullptr && intervention->hides_keys()) shape.knockout = intervention;
    // The reference's measure: the last row's mass on the keys the intervened run hides.
    const LayerInterventions* measure =
        interventions != nullptr && interventions->measure && interventions->layers[l].hides_keys()
            ? &interventions->layers[l]
            : nullptr;
    // A KV policy scores this layer's keys from the prefill's probabilities (and h2o, with a
    // decode_interval, from the decode rows') and decides after its attention: at the end of the
    // prefill, then every decode_interval decode steps.
    KvPolicyScorer* scorer = nullptr;
    bool deciding = false;
    if (intervention != nullptr && intervention->policy() != nullptr) {
      auto& scorers = interventions->scorers;
      if (scorers.size() != static_cast<size_t>(config_.num_layers)) {
        scorers.resize(config_.num_layers);
      }
      if (phase == Phase::kPrefill) {
        scorers[l] = std::make_shared<KvPolicyScorer>(*intervention->policy(), l,
                                                      config_.num_layers, heads, kv_heads, n);
      }
      scorer = scorers[l].get();
      const int64_t every = intervention->policy()->decode_interval;
      deciding = scorer != nullptr &&
                 (phase == Phase::kPrefill || (every > 0 && step > 0 && step % every == 0));
    }
    const bool capturing = capture != nullptr && capture->Wants(phase, l);
    const bool scoring = scorer != nullptr && scorer->NeedsProbs(phase);
    torch::Tensor attn;  // (heads, n, dim)
    // Where the CPU flash pass runs, it gives every layer's output and lse, captured or not, so a
    // capture never changes the model's numbers (torch's kernel rounds differently); and the
    // capture's statistics come from inside it.
    const bool flash = options.fast_attention && !compacted &&
                       StatisticsInPass(q, cache->k[l], cache->v[l], shape);
    PassStatistics pass;
    if (capturing && flash) pass.wanted = capture->StatisticsForPass(phase, pos0, n);
    const bool in_pass = flash && pass.wanted.any();
    const ProbsCallback* probs_callback = nullptr;
    ProbsCallback on_probs;
    RowRanges rows;  // empty: every row
    if (capturing || scoring || measure != nullptr) {
      // Everything the callback reads outlives it: key_length is captured by value because the
      // callback runs after this block ends (inside the attention call below).
      const int64_t key_length = pos0 + n;
      on_probs = [&, key_length, capturing, scoring, measure, in_pass](
                     int64_t begin, const torch::Tensor& probs, const torch::Tensor& scores,
                     const torch::Tensor& lse) -> absl::Status {
        if (capturing) {
          RETURN_IF_ERROR(capture->OnProbs(phase, step, l, pos0 + begin, probs, scores, lse,
                                           key_length, in_pass));
        }
        if (scoring) scorer->OnProbs(pos0 + begin, probs);
        const int64_t last = n - 1 - begin;  // the last row's index in this block, if it holds it
        if (measure != nullptr && last >= 0 && last < probs.size(1)) {
          // The reference's measure: the last row's mass on the keys the intervened run hides.
          interventions->hidden_mass[l] = measure->HiddenMass(probs.select(1, last), pos0 + n - 1);
        }
        return absl::OkStatus();
      };
      probs_callback = &on_probs;
      // The rows each consumer reads, together (the capture's empty list: every row).
      const RowRanges wanted =
          capturing ? capture->RowsWanted(phase, pos0, n, in_pass) : RowRanges{};
      if (!capturing || !wanted.empty()) {
        rows = wanted;
        if (scoring) {
          if (phase == Phase::kPrefill) {
            for (const auto& r : scorer->Rows()) rows.push_back(r);
          } else {
            rows.push_back({0, n});
          }
        }
        if (measure != nullptr) rows.push_back({n - 1, n});
      }
    }
    if (compacted) {
      const int64_t slots = cache->filled[l];
      ASSIGN_OR_RETURN(
          attn,
          CompactedAttention(q, cache->k[l].narrow(1, 0, slots), cache->v[l].narrow(1, 0, slots),
                             cache->positions[l].narrow(1, 0, slots), shape, probs_callback));
    } else if (options.fast_attention) {
      ASSIGN_OR_RETURN(attn, FusedAttention(q, cache->k[l], cache->v[l], shape, probs_callback,
                                            rows, flash ? &pass : nullptr));
      if (in_pass) {
        RETURN_IF_ERROR(capture->OnPassStatistics(phase, step, l, pos0, pass.result, pos0 + n));
      }
    } else {
      ASSIGN_OR_RETURN(attn, ExplicitAttention(q, cache->k[l], cache->v[l], shape, probs_callback));
    }
    if (deciding) {
      // Decide, hide the evicted keys from the reference's measure, and drop them from the cache
      // (room left for the positions until the next decision, or until the cache's end).
      const int64_t length = pos0 + n;
      const KvPolicyScorer::Choice choice = scorer->Decide(length);
      intervention->Evict(choice.kept, heads / kv_heads, length);
      const int64_t remaining = std::max<int64_t>(cache->capacity - length, 0);
      const int64_t every = intervention->policy()->decode_interval;
      Compact(cache, l, choice.kept, every > 0 ? std::min(every, remaining) : remaining);
      const int64_t bytes_per_key = 2 * dim * cache->k[l].element_size();
      KvDecision decision =
          ToKvDecision(step, l, choice, intervention->policy()->report_scores, bytes_per_key);
      decision.cache_bytes = cache->LayerBytes(l);
      interventions->decisions.push_back(std::move(decision));
    }
    if (intervention != nullptr && intervention->ablates()) intervention->Ablate(attn, phase);
    x = x +
        Linear(attn.transpose(0, 1).reshape({n, heads * dim}), w[TensorId::kWo], w[TensorId::kBo]);

    // MLP block: RMSNorm, SwiGLU: down(silu(gate(h)) * up(h)).
    h = RmsNorm(x, w[TensorId::kMlpNorm]);
    x = x + Linear(torch::silu(Linear(h, w[TensorId::kWGate])) * Linear(h, w[TensorId::kWUp]),
                   w[TensorId::kWDown]);
  }
  cache->length = pos0 + n;
  // Final norm and LM head on the last position only.
  torch::Tensor last =
      RmsNorm(x.narrow(0, n - 1, 1), weights_.global[TensorId::kFinalNorm]);  // (1, hidden)
  return Linear(last, weights_.global[TensorId::kLmHead]).squeeze(0).to(torch::kFloat32);
}

}  // namespace attnscope
