// The capture spec's and the interventions' command-line flags, shared by attnscope-capture and
// attnscope-run so that both speak the dialects of core/capture_text.h and core/intervention_text.h
// under the same names: --form, --stats, --layers, --heads, --phases, --rows, --element_type;
// --ablate, --knockout, --kv_policy, --reference_leads, --capture_reference.
#pragma once

#include "absl/status/statusor.h"
#include "core/capture_spec.h"
#include "core/intervention.h"

namespace attnscope {

// The capture spec's flags, by name (without --).
inline constexpr const char* kCaptureSpecFlags[] = {"form",   "stats", "layers",      "heads",
                                                    "phases", "rows",  "element_type"};

// The spec the flags describe; errors name the flag.
absl::StatusOr<CaptureSpec> CaptureSpecFromFlags();

// The interventions the flags describe (empty: none); errors name the flag.
absl::StatusOr<Interventions> InterventionsFromFlags();
// --reference_leads: the unmodified model chooses the tokens.
bool ReferenceLeadsFromFlags();
// --capture_reference: the captures are of the unmodified model's run.
bool CaptureReferenceFromFlags();

}  // namespace attnscope
