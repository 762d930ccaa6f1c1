#include "cli/capture_flags.h"

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "core/capture_text.h"
#include "core/intervention_text.h"

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
ABSL_FLAG(std::string, ablate, "",
          "head ablations, ';'-separated: layer=L heads=H,... [kind=zero|mean], e.g. "
          "\"layer=1 heads=3; layer=0 heads=0,2 kind=mean\"");
ABSL_FLAG(std::string, knockout, "",
          "attention knockouts, ';'-separated: [layers=L,...] [heads=H,...] keys=A:B,... "
          "[queries=A:B,...] (positions [A, B); empty layers or heads: all), e.g. "
          "\"layers=1 keys=1:9 queries=41:81\"");
ABSL_FLAG(std::string, kv_policy, "",
          "a KV-cache eviction policy: streaming_llm|h2o|snapkv|pyramidkv [key=value ...] with "
          "kvpress' parameters (compression_ratio, budget, n_sink, window_size, kernel_size, beta, "
          "recent_size, adaptive, alpha_safeguard, report_scores, decode_interval), e.g. "
          "\"snapkv compression_ratio=0.5 window_size=8\"");
ABSL_FLAG(bool, reference_leads, false,
          "with interventions: the unmodified model chooses the tokens (default: the intervened)");
ABSL_FLAG(bool, capture_reference, false,
          "with interventions: capture the unmodified model's run (default: the intervened one's)");

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

absl::StatusOr<Interventions> InterventionsFromFlags() {
  InterventionsText text;
  text.ablate = absl::GetFlag(FLAGS_ablate);
  text.knockout = absl::GetFlag(FLAGS_knockout);
  text.kv_policy = absl::GetFlag(FLAGS_kv_policy);
  auto interventions = ParseInterventions(text);
  if (!interventions.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--", interventions.status().message()));
  }
  return interventions;
}

bool ReferenceLeadsFromFlags() { return absl::GetFlag(FLAGS_reference_leads); }
bool CaptureReferenceFromFlags() { return absl::GetFlag(FLAGS_capture_reference); }

}  // namespace attnscope
