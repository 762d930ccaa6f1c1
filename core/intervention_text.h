// Interventions as text: the dialect of the CLIs' --ablate, --knockout and --kv_policy flags, with
// the names of the proto fields and of the Python client's keywords. Entries are separated by ';',
// items by spaces, lists by ',', position ranges are A:B ([A, B)) as in the capture spec's rows:
//
//   ablate     layer=L heads=H[,H...] [kind=zero|mean]              e.g. "layer=1 heads=3; layer=0
//   heads=0,2 kind=mean" knockout   [layers=L,...] [heads=H,...] keys=A:B[,C:D] [queries=A:B,...]
//              (empty layers or heads: all; no queries: every row)  e.g. "layers=1 keys=1:9
//              queries=41:81"
//   kv_policy  KIND [key=value ...], KIND one of kKvPolicyKinds' names and the keys kvpress'
//              parameters: compression_ratio, budget, n_sink, window_size, kernel_size, beta,
//              recent_size, adaptive, alpha_safeguard, report_scores (true|false)
//                                                                   e.g. "snapkv
//                                                                   compression_ratio=0.5
//                                                                   window_size=8 adaptive=true"
//
// Parsing checks the syntax and the names (INVALID_ARGUMENT naming the flag and the item); the
// engine's ValidateInterventions checks them against the model and the prompt.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/intervention.h"

namespace attnscope {

// The dialect's parts, as the three flags give them (empty: none).
struct InterventionsText {
  std::string ablate;
  std::string knockout;
  std::string kv_policy;
};

absl::StatusOr<Interventions> ParseInterventions(const InterventionsText& text);
// Back to the dialect: ParseInterventions(FormatInterventions(x)) gives x back.
InterventionsText FormatInterventions(const Interventions& interventions);

}  // namespace attnscope
