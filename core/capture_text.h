// The capture spec as text: one dialect for both CLIs (as flags), for stored files (written back
// whole) and for error messages. Every name comes from the tables in capture_spec.h.
//
//   form    none | dense | head_mean | head_max | pooled:P[:mean|max] | top_k:K
//   stats   comma-separated: row_entropy, sink_mass:K, local_mass:W, key_score:W,
//           key_score_variance  (empty: none; kStatistics' names)
//   layers  comma-separated indices (empty: all)      heads   the same
//   phases  prefill, decode or prefill,decode
//   rows    empty: every prompt row; last:N; or ranges A:B,C:D of prompt positions
//   element_type  float32 | float16 | bfloat16  (of matrices; statistics are float32)
//
// A whole spec is the form followed by key=value items, e.g.
//   "pooled:64:max stats=row_entropy,sink_mass:4 layers=0,8 phases=prefill rows=last:128
//    element_type=float16"
// Before 0.2 the statistics were spelled entropy, sink:K, local:W, variance and element_type was
// dtype; both are still read (for one release) and never written.
#pragma once

#include <cstddef>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/capture_spec.h"

namespace attnscope {

// The dialect's parts, as separate flags give them (defaults: what a bare capture does).
struct CaptureSpecText {
  std::string form = "dense";
  std::string stats;
  std::string layers;
  std::string heads;
  std::string phases = "prefill,decode";
  std::string rows;
  std::string element_type = "float32";
};

// Each error names the part (`what`: "form", or the flag that gave it) and the malformed text.
absl::StatusOr<CaptureSpec> ParseCaptureSpec(const CaptureSpecText& text);
// A whole spec ("pooled:4 stats=row_entropy layers=0,1"); missing items take CaptureSpecText's
// defaults.
absl::StatusOr<CaptureSpec> ParseCaptureSpec(absl::string_view text);
// The whole spec in the dialect; ParseCaptureSpec(FormatCaptureSpec(s)) gives s back.
std::string FormatCaptureSpec(const CaptureSpec& spec);

// Flags and metadata, not data: a dialect text longer than this is refused ("is too long").
inline constexpr size_t kMaxDialectText = 1 << 16;
// The INVALID_ARGUMENT of a malformed item of the CLIs' dialects (this one and
// core/intervention_text.h's): "<what>: '<text, its first 80 characters>' <why>".
absl::Status MalformedItem(absl::string_view what, absl::string_view text, absl::string_view why);

// The single parts (also used by the whole-spec parser).
absl::Status ParseForm(absl::string_view text, CaptureSpec* spec);
absl::Status ParseStatistics(absl::string_view text, StatisticsSpec* stats);
absl::StatusOr<std::vector<int64_t>> ParseIndexList(absl::string_view text, absl::string_view what);
std::string FormatForm(const CaptureSpec& spec);
std::string FormatStatistics(const StatisticsSpec& stats);

}  // namespace attnscope
