#include "engine/transformer.h"

#include <optional>

#include "core/status_macros.h"
#include "engine/attention.h"
#include "engine/kv_policy.h"
#include "engine/rope.h"

namespace attnscope {
namespace {

torch::Tensor Linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  return b.defined() ? torch::addmm(b, x, w.t()) : torch::matmul(x, w.t());
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
  const int64_t n = static_cast<int64_t>(ids.size());
  const int64_t pos0 = cache->length;
  const int64_t heads = config_.num_heads, kv_heads = config_.num_kv_heads, dim = config_.head_dim;
  torch::Tensor ids_t = torch::tensor(ids, torch::dtype(torch::kInt64)).to(device_);
  torch::Tensor x =
      weights_.global[TensorId::kTokenEmbedding].index_select(0, ids_t);  // (n, hidden)
  auto [cos, sin] = RopeTables(inv_freq_, pos0, n, dtype_);               // (n, head_dim) each

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
    cache->k[l].narrow(1, pos0, n).copy_(k);
    cache->v[l].narrow(1, pos0, n).copy_(v);

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
    // A KV policy scores this layer's prompt keys from the prefill's probabilities and decides
    // after its attention.
    std::optional<KvPolicyScorer> scorer;
    if (intervention != nullptr && intervention->policy() != nullptr && phase == Phase::kPrefill) {
      scorer.emplace(*intervention->policy(), l, config_.num_layers, heads, kv_heads, n);
    }
    const bool capturing = capture != nullptr && capture->Wants(phase, l);
    const bool scoring = scorer.has_value() && scorer->NeedsProbs();
    torch::Tensor attn;  // (heads, n, dim)
    const ProbsCallback* probs_callback = nullptr;
    ProbsCallback on_probs;
    RowRanges rows;  // empty: every row
    if (capturing || scoring || measure != nullptr) {
      // Everything the callback reads outlives it: key_length is captured by value because the
      // callback runs after this block ends (inside the attention call below).
      const int64_t key_length = pos0 + n;
      on_probs = [&, key_length, capturing, scoring, measure](
                     int64_t begin, const torch::Tensor& probs, const torch::Tensor& scores,
                     const torch::Tensor& lse) -> absl::Status {
        if (capturing) {
          RETURN_IF_ERROR(
              capture->OnProbs(phase, step, l, pos0 + begin, probs, scores, lse, key_length));
        }
        if (scoring) scorer->OnProbs(begin, probs);
        const int64_t last = n - 1 - begin;  // the last row's index in this block, if it holds it
        if (measure != nullptr && last >= 0 && last < probs.size(1)) {
          // The reference's measure: the last row's mass on the keys the intervened run hides.
          interventions->hidden_mass[l] = measure->HiddenMass(probs.select(1, last), pos0 + n - 1);
        }
        return absl::OkStatus();
      };
      probs_callback = &on_probs;
      // The rows each consumer reads, together (the capture's empty list: every row).
      const RowRanges wanted = capturing ? capture->RowsWanted(phase, pos0, n) : RowRanges{};
      if (!capturing || !wanted.empty()) {
        rows = wanted;
        if (scoring) {
          for (const auto& r : scorer->Rows()) rows.push_back(r);
        }
        if (measure != nullptr) rows.push_back({n - 1, n});
      }
    }
    if (options.fast_attention) {
      ASSIGN_OR_RETURN(attn,
                       FusedAttention(q, cache->k[l], cache->v[l], shape, probs_callback, rows));
    } else {
      ASSIGN_OR_RETURN(attn, ExplicitAttention(q, cache->k[l], cache->v[l], shape, probs_callback));
    }
    if (scorer.has_value()) {
      const KvPolicyScorer::Choice choice = scorer->Decide();
      intervention->Evict(choice.kept, heads / kv_heads, pos0 + n);
      const int64_t bytes_per_key = 2 * dim * cache->k[l].element_size();
      interventions->decisions.push_back(
          ToKvDecision(l, choice, intervention->policy()->report_scores, bytes_per_key));
    }
    if (intervention != nullptr && intervention->ablates()) intervention->Ablate(attn, phase);
    x = x +
        Linear(attn.transpose(0, 1).reshape({n, heads * dim}), w[TensorId::kWo], w[TensorId::kBo]);

    // MLP block: RMSNorm, SwiGLU: down(silu(gate(h)) * up(h)).
    h = RmsNorm(x, w[TensorId::kMlpNorm]);
    x = x + torch::matmul(torch::silu(torch::matmul(h, w[TensorId::kWGate].t())) *
                              torch::matmul(h, w[TensorId::kWUp].t()),
                          w[TensorId::kWDown].t());
  }
  cache->length = pos0 + n;
  // Final norm and LM head on the last position only.
  torch::Tensor last =
      RmsNorm(x.narrow(0, n - 1, 1), weights_.global[TensorId::kFinalNorm]);  // (1, hidden)
  return torch::matmul(last, weights_.global[TensorId::kLmHead].t()).squeeze(0).to(torch::kFloat32);
}

}  // namespace attnscope
