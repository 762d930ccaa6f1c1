#include "engine/checkpoint/weights.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/safetensors.h"
#include "core/status_macros.h"

namespace attnscope {
namespace {

absl::StatusOr<torch::Tensor> ToTensor(const TensorView& view, torch::Device device,
                                       torch::ScalarType dtype) {
  torch::ScalarType stored;
  switch (view.dtype) {
    case StoredDType::kF32:
      stored = torch::kFloat32;
      break;
    case StoredDType::kF16:
      stored = torch::kFloat16;
      break;
    case StoredDType::kBF16:
      stored = torch::kBFloat16;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("tensor '", view.name, "' in ", view.file,
                                                     " has dtype ", StoredDTypeName(view.dtype),
                                                     "; weights must be F32, F16 or BF16"));
  }
  // The mapping is read-only and outlives this call; `to(..., copy=true)` leaves it untouched.
  torch::Tensor mapped =
      torch::from_blob(const_cast<void*>(view.data), view.shape, torch::dtype(stored));
  return mapped.to(device, dtype, /*non_blocking=*/false, /*copy=*/true);
}

}  // namespace

absl::StatusOr<Weights> LoadWeights(const std::string& dir, const ModelConfig& config,
                                    torch::Device device, torch::ScalarType dtype) {
  ASSIGN_OR_RETURN(auto checkpoint, CheckpointTensors::Open(dir));
  Weights w;
  w.layers.resize(config.num_layers);
  for (const TensorSpec& spec : ExpectedTensors(config)) {
    if (!spec.required) continue;
    ASSIGN_OR_RETURN(TensorView view, checkpoint->Get(spec.name));
    if (view.shape != spec.shape) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", spec.name, "' in ", view.file, " has shape [",
                       absl::StrJoin(view.shape, ", "), "], config.json implies [",
                       absl::StrJoin(spec.shape, ", "), "]"));
    }
    torch::Tensor t;
    try {
      ASSIGN_OR_RETURN(t, ToTensor(view, device, dtype));
    } catch (const c10::Error& e) {
      return absl::ResourceExhaustedError(absl::StrCat("cannot place tensor '", spec.name, "' on ",
                                                       device.str(), ": ",
                                                       e.what_without_backtrace()));
    }
    LayerWeights* layer = spec.layer >= 0 ? &w.layers[spec.layer] : nullptr;
    switch (spec.id) {
      case TensorId::kTokenEmbedding:
        w.token_embedding = t;
        break;
      case TensorId::kFinalNorm:
        w.final_norm = t;
        break;
      case TensorId::kLmHead:
        w.lm_head = t;
        break;
      case TensorId::kAttnNorm:
        layer->attn_norm = t;
        break;
      case TensorId::kWq:
        layer->wq = t;
        break;
      case TensorId::kBq:
        layer->bq = t;
        break;
      case TensorId::kWk:
        layer->wk = t;
        break;
      case TensorId::kBk:
        layer->bk = t;
        break;
      case TensorId::kWv:
        layer->wv = t;
        break;
      case TensorId::kBv:
        layer->bv = t;
        break;
      case TensorId::kWo:
        layer->wo = t;
        break;
      case TensorId::kBo:
        layer->bo = t;
        break;
      case TensorId::kMlpNorm:
        layer->mlp_norm = t;
        break;
      case TensorId::kWGate:
        layer->w_gate = t;
        break;
      case TensorId::kWUp:
        layer->w_up = t;
        break;
      case TensorId::kWDown:
        layer->w_down = t;
        break;
    }
  }
  if (config.tie_word_embeddings) w.lm_head = w.token_embedding;
  return w;
}

}  // namespace attnscope
