#include "core/intervention_text.h"

#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/capture_text.h"
#include "core/status_macros.h"

namespace attnscope {
namespace {

// "key=value" items of one entry, split on whitespace.
absl::StatusOr<std::vector<std::pair<std::string, std::string>>> Items(absl::string_view entry,
                                                                       absl::string_view what) {
  std::vector<std::pair<std::string, std::string>> out;
  for (absl::string_view item : absl::StrSplit(entry, absl::ByAnyChar(" \t"), absl::SkipEmpty())) {
    const size_t eq = item.find('=');
    if (eq == absl::string_view::npos || eq == 0)
      return MalformedItem(what, item, "is not key=value");
    std::string key(item.substr(0, eq));
    for (const auto& [k, v] : out) {
      if (k == key) return MalformedItem(what, item, "gives its key twice");
    }
    out.emplace_back(std::move(key), std::string(item.substr(eq + 1)));
  }
  return out;
}

// Non-empty entries separated by ';'.
std::vector<absl::string_view> Entries(absl::string_view text) {
  std::vector<absl::string_view> out;
  for (absl::string_view e : absl::StrSplit(text, ';')) {
    e = absl::StripAsciiWhitespace(e);
    if (!e.empty()) out.push_back(e);
  }
  return out;
}

absl::StatusOr<std::vector<PositionRange>> Ranges(absl::string_view text, absl::string_view what) {
  std::vector<PositionRange> out;
  for (absl::string_view r : absl::StrSplit(text, ',')) {
    const std::vector<absl::string_view> ab = absl::StrSplit(r, ':');
    PositionRange range;
    if (ab.size() != 2 || !absl::SimpleAtoi(ab[0], &range.begin) ||
        !absl::SimpleAtoi(ab[1], &range.end)) {
      return MalformedItem(what, r, "is not A:B (positions [A, B))");
    }
    if (range.begin < 0 || range.end <= range.begin) {
      return MalformedItem(what, r, "is empty or negative (B must exceed A >= 0)");
    }
    out.push_back(range);
  }
  return out;
}

// The shortest decimal that reads back as `v`.
std::string Decimal(double v) {
  for (int precision = 6; precision < 17; ++precision) {
    std::string text = absl::StrFormat("%.*g", precision, v);
    double back = 0;
    if (absl::SimpleAtod(text, &back) && back == v) return text;
  }
  return absl::StrFormat("%.17g", v);
}

std::string FormatRanges(const std::vector<PositionRange>& ranges) {
  return absl::StrJoin(ranges, ",", [](std::string* out, const PositionRange& r) {
    absl::StrAppend(out, r.begin, ":", r.end);
  });
}

absl::StatusOr<bool> Bool(absl::string_view text, absl::string_view what) {
  if (text == "true" || text == "1") return true;
  if (text == "false" || text == "0") return false;
  return MalformedItem(what, text, "is not true or false");
}

absl::Status ParseAblations(absl::string_view text, std::vector<HeadAblation>* out) {
  for (absl::string_view entry : Entries(text)) {
    ASSIGN_OR_RETURN(const auto items, Items(entry, "ablate"));
    HeadAblation a;
    bool has_layer = false;
    for (const auto& [key, value] : items) {
      if (key == "layer") {
        if (!absl::SimpleAtoi(value, &a.layer) || a.layer < 0) {
          return MalformedItem("ablate layer", value, "is not a layer index");
        }
        has_layer = true;
      } else if (key == "heads") {
        ASSIGN_OR_RETURN(a.heads, ParseIndexList(value, "ablate heads"));
      } else if (key == "kind") {
        const auto* kind = RowNamed(kAblationKinds, value);
        if (kind == nullptr) {
          return MalformedItem("ablate kind", value,
                               absl::StrCat("is not ", NamesOf(kAblationKinds)));
        }
        a.kind = kind->value;
      } else {
        return MalformedItem("ablate", key, "is not a key (layer, heads, kind)");
      }
    }
    if (!has_layer || a.heads.empty())
      return MalformedItem("ablate", entry, "needs layer=L and heads=H,...");
    out->push_back(std::move(a));
  }
  return absl::OkStatus();
}

absl::Status ParseKnockouts(absl::string_view text, std::vector<Knockout>* out) {
  for (absl::string_view entry : Entries(text)) {
    ASSIGN_OR_RETURN(const auto items, Items(entry, "knockout"));
    Knockout k;
    for (const auto& [key, value] : items) {
      if (key == "layers") {
        ASSIGN_OR_RETURN(k.layers, ParseIndexList(value, "knockout layers"));
      } else if (key == "heads") {
        ASSIGN_OR_RETURN(k.heads, ParseIndexList(value, "knockout heads"));
      } else if (key == "keys") {
        ASSIGN_OR_RETURN(k.keys, Ranges(value, "knockout keys"));
      } else if (key == "queries") {
        ASSIGN_OR_RETURN(k.queries, Ranges(value, "knockout queries"));
      } else {
        return MalformedItem("knockout", key, "is not a key (layers, heads, keys, queries)");
      }
    }
    if (k.keys.empty()) return MalformedItem("knockout", entry, "needs keys=A:B,...");
    out->push_back(std::move(k));
  }
  return absl::OkStatus();
}

absl::Status ParseKvPolicy(absl::string_view text, KvPolicy* policy) {
  text = absl::StripAsciiWhitespace(text);
  if (text.empty()) return absl::OkStatus();
  const size_t space = text.find_first_of(" \t");
  const absl::string_view name = text.substr(0, space);
  const auto* kind = RowNamed(kKvPolicyKinds, name);
  if (kind == nullptr || kind->value == KvPolicyKind::kNone) {
    return MalformedItem("kv_policy", name, "is not streaming_llm, h2o, snapkv or pyramidkv");
  }
  policy->kind = kind->value;
  ASSIGN_OR_RETURN(const auto items, Items(space == absl::string_view::npos ? absl::string_view()
                                                                            : text.substr(space),
                                           "kv_policy"));
  for (const auto& [key, value] : items) {
    const std::string what = absl::StrCat("kv_policy ", key);
    bool ok = true;
    if (key == "compression_ratio") {
      ok = absl::SimpleAtod(value, &policy->compression_ratio);
    } else if (key == "beta") {
      ok = absl::SimpleAtod(value, &policy->beta);
    } else if (key == "alpha_safeguard") {
      ok = absl::SimpleAtod(value, &policy->alpha_safeguard);
    } else if (key == "budget") {
      ok = absl::SimpleAtoi(value, &policy->budget);
    } else if (key == "n_sink") {
      ok = absl::SimpleAtoi(value, &policy->n_sink);
    } else if (key == "window_size") {
      ok = absl::SimpleAtoi(value, &policy->window_size);
    } else if (key == "kernel_size") {
      ok = absl::SimpleAtoi(value, &policy->kernel_size);
    } else if (key == "recent_size") {
      ok = absl::SimpleAtoi(value, &policy->recent_size);
    } else if (key == "decode_interval") {
      ok = absl::SimpleAtoi(value, &policy->decode_interval);
    } else if (key == "adaptive") {
      ASSIGN_OR_RETURN(policy->adaptive, Bool(value, what));
    } else if (key == "report_scores") {
      ASSIGN_OR_RETURN(policy->report_scores, Bool(value, what));
    } else {
      return MalformedItem(
          "kv_policy", key,
          "is not a key (compression_ratio, budget, n_sink, window_size, kernel_size, "
          "beta, recent_size, adaptive, alpha_safeguard, report_scores, decode_interval)");
    }
    if (!ok) return MalformedItem(what, value, "is not a number");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Interventions> ParseInterventions(const InterventionsText& text) {
  for (const std::string* t : {&text.ablate, &text.knockout, &text.kv_policy}) {
    if (t->size() > kMaxDialectText) return MalformedItem("interventions", *t, "are too long");
  }
  Interventions out;
  RETURN_IF_ERROR(ParseAblations(text.ablate, &out.ablations));
  RETURN_IF_ERROR(ParseKnockouts(text.knockout, &out.knockouts));
  RETURN_IF_ERROR(ParseKvPolicy(text.kv_policy, &out.kv_policy));
  return out;
}

InterventionsText FormatInterventions(const Interventions& interventions) {
  InterventionsText out;
  out.ablate =
      absl::StrJoin(interventions.ablations, "; ", [](std::string* s, const HeadAblation& a) {
        absl::StrAppend(s, "layer=", a.layer, " heads=", absl::StrJoin(a.heads, ","),
                        " kind=", RowOf(kAblationKinds, a.kind).name);
      });
  out.knockout =
      absl::StrJoin(interventions.knockouts, "; ", [](std::string* s, const Knockout& k) {
        std::vector<std::string> items;
        if (!k.layers.empty())
          items.push_back(absl::StrCat("layers=", absl::StrJoin(k.layers, ",")));
        if (!k.heads.empty()) items.push_back(absl::StrCat("heads=", absl::StrJoin(k.heads, ",")));
        items.push_back(absl::StrCat("keys=", FormatRanges(k.keys)));
        if (!k.queries.empty()) items.push_back(absl::StrCat("queries=", FormatRanges(k.queries)));
        absl::StrAppend(s, absl::StrJoin(items, " "));
      });
  const KvPolicy& p = interventions.kv_policy;
  if (p.kind != KvPolicyKind::kNone) {
    const KvPolicy d;
    out.kv_policy = std::string(RowOf(kKvPolicyKinds, p.kind).name);
    if (p.compression_ratio != 0)
      absl::StrAppend(&out.kv_policy, " compression_ratio=", Decimal(p.compression_ratio));
    if (p.budget != 0) absl::StrAppend(&out.kv_policy, " budget=", p.budget);
    if (p.n_sink != d.n_sink) absl::StrAppend(&out.kv_policy, " n_sink=", p.n_sink);
    if (p.window_size != d.window_size)
      absl::StrAppend(&out.kv_policy, " window_size=", p.window_size);
    if (p.kernel_size != d.kernel_size)
      absl::StrAppend(&out.kv_policy, " kernel_size=", p.kernel_size);
    if (p.beta != d.beta) absl::StrAppend(&out.kv_policy, " beta=", Decimal(p.beta));
    if (p.recent_size != d.recent_size)
      absl::StrAppend(&out.kv_policy, " recent_size=", p.recent_size);
    if (p.adaptive) absl::StrAppend(&out.kv_policy, " adaptive=true");
    if (p.alpha_safeguard != d.alpha_safeguard) {
      absl::StrAppend(&out.kv_policy, " alpha_safeguard=", Decimal(p.alpha_safeguard));
    }
    if (p.report_scores) absl::StrAppend(&out.kv_policy, " report_scores=true");
    if (p.decode_interval != 0)
      absl::StrAppend(&out.kv_policy, " decode_interval=", p.decode_interval);
  }
  return out;
}

}  // namespace attnscope
