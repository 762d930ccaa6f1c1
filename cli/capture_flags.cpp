#include "cli/capture_flags.h"

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "core/capture_text.h"

ABSL_FLAG(std::string, form, attnscope::CaptureSpecText{}.form,
          "attention matrices: none, dense, head_mean, head_max, pooled:P[:mean|max], top_k:K");
ABSL_FLAG(std::string, stats, "",
          "statistics, comma-separated: row_entropy, sink_mass:K, local_mass:W, key_score:W, "
          "key_score_variance");
ABSL_FLAG(std::string, layers, "", "layers to capture, e.g. 0,8,16 (empty: all)");
ABSL_FLAG(std::string, heads, "", "query heads to capture, e.g. 0,3 (empty: all)");
ABSL_FLAG(std::string, phases, attnscope::CaptureSpecText{}.phases,
          "prefill, decode, or prefill,decode");
ABSL_FLAG(std::string, rows, "",
          "prompt rows to capture: empty (all), last:N, or ranges A:B,C:D of positions");
ABSL_FLAG(std::string, element_type, attnscope::CaptureSpecText{}.element_type,
          "element type of captured matrices: float32, float16, bfloat16 (statistics are float32)");

namespace attnscope {

absl::StatusOr<CaptureSpec> CaptureSpecFromFlags() {
  CaptureSpecText text;
  text.form = absl::GetFlag(FLAGS_form);
  text.stats = absl::GetFlag(FLAGS_stats);
  text.layers = absl::GetFlag(FLAGS_layers);
  text.heads = absl::GetFlag(FLAGS_heads);
  text.phases = absl::GetFlag(FLAGS_phases);
  text.rows = absl::GetFlag(FLAGS_rows);
  text.element_type = absl::GetFlag(FLAGS_element_type);
  auto spec = ParseCaptureSpec(text);
  if (!spec.ok()) return absl::InvalidArgumentError(absl::StrCat("--", spec.status().message()));
  return spec;
}

}  // namespace attnscope
