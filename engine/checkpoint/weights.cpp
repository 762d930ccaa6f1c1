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
    (spec.layer >= 0 ? w.layers[spec.layer] : w.global)[spec.id] = std::move(t);
  }
  if (config.tie_word_embeddings) w.global[TensorId::kLmHead] = w.global[TensorId::kTokenEmbedding];
  return w;
}

}  // namespace attnscope
