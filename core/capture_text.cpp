#include "core/capture_text.h"

#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "core/status_macros.h"

namespace attnscope {

absl::Status MalformedItem(absl::string_view what, absl::string_view text, absl::string_view why) {
  const std::string shown(text.substr(0, 80));
  return absl::InvalidArgumentError(
      absl::StrCat(what, ": '", shown, text.size() > 80 ? "...'" : "'", " ", why));
}

namespace {

absl::StatusOr<int64_t> Number(absl::string_view text, absl::string_view what, int64_t min) {
  int64_t v = 0;
  if (!absl::SimpleAtoi(text, &v)) return MalformedItem(what, text, "is not an integer");
  if (v < min) return MalformedItem(what, text, absl::StrCat("must be at least ", min));
  return v;
}

}  // namespace

absl::StatusOr<std::vector<int64_t>> ParseIndexList(absl::string_view text,
                                                    absl::string_view what) {
  if (text.size() > kMaxDialectText) return MalformedItem(what, text, "is too long");
  std::vector<int64_t> out;
  text = absl::StripAsciiWhitespace(text);
  if (text.empty() || text == "all") return out;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    ASSIGN_OR_RETURN(const int64_t v, Number(part, what, 0));
    out.push_back(v);
  }
  return out;
}

absl::Status ParseForm(absl::string_view text, CaptureSpec* spec) {
  const std::vector<absl::string_view> parts = absl::StrSplit(text, ':');
  const FormInfo* form = RowNamed(kForms, parts[0]);
  if (form == nullptr) return MalformedItem("form", text, absl::StrCat("is not ", NamesOf(kForms)));
  spec->form = form->value;
  spec->pool = 0;
  spec->top_k = 0;
  spec->pool_op = PoolOp::kMean;
  switch (form->arg) {
    case FormArg::kNone:
      if (parts.size() != 1) return MalformedItem("form", text, "takes no argument");
      break;
    case FormArg::kPool: {
      if (parts.size() < 2 || parts.size() > 3)
        return MalformedItem("form", text, "is pooled:P or pooled:P:mean|max (P the tile side)");
      ASSIGN_OR_RETURN(spec->pool, Number(parts[1], "form pooled:P", 1));
      if (parts.size() == 3) {
        const auto* op = RowNamed(kPoolOps, parts[2]);
        if (op == nullptr)
          return MalformedItem("form", text, absl::StrCat("pools by ", NamesOf(kPoolOps)));
        spec->pool_op = op->value;
      }
      break;
    }
    case FormArg::kTopK:
      if (parts.size() != 2) return MalformedItem("form", text, "is top_k:K (K values per row)");
      ASSIGN_OR_RETURN(spec->top_k, Number(parts[1], "form top_k:K", 1));
      break;
  }
  return absl::OkStatus();
}

std::string FormatForm(const CaptureSpec& spec) {
  const FormInfo& form = RowOf(kForms, spec.form);
  switch (form.arg) {
    case FormArg::kPool:
      return absl::StrCat(form.name, ":", spec.pool, spec.pool_op == PoolOp::kMean ? "" : ":",
                          spec.pool_op == PoolOp::kMean ? "" : RowOf(kPoolOps, spec.pool_op).name);
    case FormArg::kTopK:
      return absl::StrCat(form.name, ":", spec.top_k);
    case FormArg::kNone:
      break;
  }
  return form.name;
}

absl::Status ParseStatistics(absl::string_view text, StatisticsSpec* stats) {
  if (text.size() > kMaxDialectText) return MalformedItem("stats", text, "is too long");
  *stats = StatisticsSpec();
  if (text.empty() || text == "none") return absl::OkStatus();
  for (absl::string_view item : absl::StrSplit(text, ',')) {
    const std::vector<absl::string_view> kv = absl::StrSplit(item, absl::MaxSplits(':', 1));
    const StatisticInfo* found = nullptr;
    for (const StatisticInfo& st : kStatistics) {
      // The spelling before 0.2 (entropy, sink, local, variance) is read for one release, so
      // that stored files and scripts keep working; everything writes `name`.
      if (kv[0] == st.name || (*st.old_text != '\0' && kv[0] == st.old_text)) found = &st;
    }
    if (found == nullptr) {
      std::vector<std::string> names;
      for (const StatisticInfo& st : kStatistics)
        names.push_back(absl::StrCat(st.name, st.takes_value ? ":" : "", st.value_letter));
      return MalformedItem("stats", item,
                           absl::StrCat("is not one of ", absl::StrJoin(names, ", ")));
    }
    if (stats->*found->param != 0) return MalformedItem("stats", item, "is given twice");
    if (found->takes_value) {
      if (kv.size() != 2) {
        return MalformedItem(
            "stats", item, absl::StrCat("needs a value: ", found->name, ":", found->value_letter));
      }
      ASSIGN_OR_RETURN(stats->*found->param, Number(kv[1], absl::StrCat("stats ", kv[0]), 1));
    } else {
      if (kv.size() != 1) return MalformedItem("stats", item, "takes no value");
      stats->*found->param = 1;
    }
  }
  return absl::OkStatus();
}

std::string FormatStatistics(const StatisticsSpec& stats) {
  std::vector<std::string> items;
  for (const StatisticInfo& st : kStatistics) {
    const int64_t v = stats.*st.param;
    if (v <= 0) continue;
    items.push_back(st.takes_value ? absl::StrCat(st.name, ":", v) : std::string(st.name));
  }
  return absl::StrJoin(items, ",");
}

absl::StatusOr<CaptureSpec> ParseCaptureSpec(const CaptureSpecText& t) {
  CaptureSpec spec;
  RETURN_IF_ERROR(ParseForm(t.form, &spec));
  RETURN_IF_ERROR(ParseStatistics(t.stats, &spec.stats));
  ASSIGN_OR_RETURN(spec.layers, ParseIndexList(t.layers, "layers"));
  ASSIGN_OR_RETURN(spec.heads, ParseIndexList(t.heads, "heads"));
  spec.prefill = spec.decode = false;
  if (t.phases.size() > kMaxDialectText) return MalformedItem("phases", t.phases, "is too long");
  for (absl::string_view p : absl::StrSplit(t.phases, ',')) {
    const auto* phase = RowNamed(kPhases, p);
    if (phase == nullptr)
      return MalformedItem("phases", p, absl::StrCat("is not ", NamesOf(kPhases)));
    bool& on = phase->value == Phase::kPrefill ? spec.prefill : spec.decode;
    if (on) return MalformedItem("phases", p, "is given twice");
    on = true;
  }
  if (t.rows.size() > kMaxDialectText) return MalformedItem("rows", t.rows, "is too long");
  if (absl::StartsWith(t.rows, "last:")) {
    ASSIGN_OR_RETURN(spec.last_queries, Number(t.rows.substr(5), "rows last:N", 1));
  } else if (!t.rows.empty()) {
    for (absl::string_view r : absl::StrSplit(t.rows, ',')) {
      const std::vector<absl::string_view> ab = absl::StrSplit(r, ':');
      if (ab.size() != 2)
        return MalformedItem("rows", r, "is not A:B (prompt positions [A, B)) or last:N");
      QueryRange q;
      ASSIGN_OR_RETURN(q.begin, Number(ab[0], "rows A:B", 0));
      ASSIGN_OR_RETURN(q.end, Number(ab[1], "rows A:B", 0));
      if (q.end <= q.begin) return MalformedItem("rows", r, "is empty (B must exceed A)");
      spec.query_ranges.push_back(q);
    }
  }
  const auto* type = RowNamed(kElementTypes, t.element_type);
  if (type == nullptr) {
    return MalformedItem("element_type", t.element_type,
                         absl::StrCat("is not ", NamesOf(kElementTypes)));
  }
  spec.element_type = type->value;
  return spec;
}

absl::StatusOr<CaptureSpec> ParseCaptureSpec(absl::string_view text) {
  if (text.size() > kMaxDialectText) return MalformedItem("capture spec", text, "is too long");
  CaptureSpecText t;
  bool first = true;
  for (absl::string_view item : absl::StrSplit(text, ' ', absl::SkipEmpty())) {
    const size_t eq = item.find('=');
    if (eq == absl::string_view::npos) {
      if (!first)
        return MalformedItem("capture spec", item, "is not key=value (only the form comes bare)");
      t.form = std::string(item);
      first = false;
      continue;
    }
    first = false;
    const absl::string_view key = item.substr(0, eq), value = item.substr(eq + 1);
    std::string* field = key == "stats"          ? &t.stats
                         : key == "layers"       ? &t.layers
                         : key == "heads"        ? &t.heads
                         : key == "phases"       ? &t.phases
                         : key == "rows"         ? &t.rows
                         : key == "element_type" ? &t.element_type
                         : key == "dtype" ? &t.element_type  // before 0.2; read for one release
                         : key == "form"  ? &t.form
                                          : nullptr;
    if (field == nullptr) {
      return MalformedItem(
          "capture spec", item,
          "has an unknown key (form, stats, layers, heads, phases, rows, element_type)");
    }
    *field = std::string(value);
  }
  return ParseCaptureSpec(t);
}

std::string FormatCaptureSpec(const CaptureSpec& s) {
  std::string out = FormatForm(s);
  if (s.stats.Any()) absl::StrAppend(&out, " stats=", FormatStatistics(s.stats));
  if (!s.layers.empty()) absl::StrAppend(&out, " layers=", absl::StrJoin(s.layers, ","));
  if (!s.heads.empty()) absl::StrAppend(&out, " heads=", absl::StrJoin(s.heads, ","));
  std::vector<const char*> phases;
  if (s.prefill) phases.push_back(PhaseName(Phase::kPrefill));
  if (s.decode) phases.push_back(PhaseName(Phase::kDecode));
  absl::StrAppend(&out, " phases=", absl::StrJoin(phases, ","));
  if (s.last_queries > 0) {
    absl::StrAppend(&out, " rows=last:", s.last_queries);
  } else if (!s.query_ranges.empty()) {
    std::vector<std::string> ranges;
    for (const auto& r : s.query_ranges) ranges.push_back(absl::StrCat(r.begin, ":", r.end));
    absl::StrAppend(&out, " rows=", absl::StrJoin(ranges, ","));
  }
  absl::StrAppend(&out, " element_type=", ElementTypeName(s.element_type));
  return out;
}

}  // namespace attnscope
