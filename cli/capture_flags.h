// The capture spec's command-line flags, shared by attnscope-capture and attnscope-run so that both
// speak the dialect of core/capture_text.h under the same names: --form, --stats, --layers,
// --heads,
// --phases, --rows, --element_type.
#pragma once

#include "absl/status/statusor.h"
#include "core/capture_spec.h"

namespace attnscope {

// The spec the flags describe; errors name the flag.
absl::StatusOr<CaptureSpec> CaptureSpecFromFlags();

}  // namespace attnscope
