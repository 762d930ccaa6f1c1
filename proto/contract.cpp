#include "proto/contract.h"

#include <array>
#include <cctype>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace attnscope {

namespace pb = google::protobuf;

namespace {

// The proto numbers of a table's rows, found once by name: PREFIX_ + upper(name). -1 for a row the
// proto lacks (a programming error that tests/cpp/spec_test.cpp SpecTables catches).
template <typename Row, size_t N>
const std::array<int, N>& ProtoNumbers(const Row (&table)[N], const pb::EnumDescriptor* enum_type,
                                       const char* prefix) {
  static const std::array<int, N> numbers = [&] {
    std::array<int, N> out{};
    for (size_t i = 0; i < N; ++i) out[i] = ProtoEnumNumber(enum_type, prefix, table[i].name);
    return out;
  }();
  return numbers;
}

template <typename Row, size_t N, typename E>
int ToNumber(const Row (&table)[N], E value, const pb::EnumDescriptor* enum_type,
             const char* prefix) {
  const auto& numbers = ProtoNumbers(table, enum_type, prefix);
  for (size_t i = 0; i < N; ++i) {
    if (table[i].value == value) return numbers[i];
  }
  return -1;
}

template <typename Row, size_t N>
auto FromNumber(const Row (&table)[N], int number, const pb::EnumDescriptor* enum_type,
                const char* prefix, const char* what) -> absl::StatusOr<decltype(table[0].value)> {
  const auto& numbers = ProtoNumbers(table, enum_type, prefix);
  for (size_t i = 0; i < N; ++i) {
    if (numbers[i] == number) return table[i].value;
  }
  return absl::InvalidArgumentError(absl::StrCat(what, ": unknown value ", number));
}

absl::Status Malformed(const absl::Status& s) {
  return absl::DataLossError(absl::StrCat("malformed stream from the server: ", s.message()));
}

template <typename Chunk>
void FillCommon(const BlockHeader& h, Chunk* out) {
  out->set_phase(ToProto(h.phase));
  out->set_step(h.step);
  out->set_layer(static_cast<int32_t>(h.layer));
  for (int64_t head : h.heads) out->add_heads(static_cast<int32_t>(head));
  out->set_query_begin(h.query_begin);
  out->set_query_end(h.query_end);
  out->set_key_length(h.key_length);
  for (int64_t d : h.shape) out->add_shape(d);
  out->set_block_bytes(h.value_bytes());
}

template <typename Chunk>
absl::StatusOr<BlockHeader> ReadCommon(const Chunk& c, BlockKind kind) {
  BlockHeader h;
  h.kind = kind;
  auto phase = FromProto(c.phase(), "phase");
  if (!phase.ok()) return Malformed(phase.status());
  h.phase = *phase;
  h.step = c.step();
  h.layer = c.layer();
  h.heads.assign(c.heads().begin(), c.heads().end());
  h.query_begin = c.query_begin();
  h.query_end = c.query_end();
  h.key_length = c.key_length();
  h.shape.assign(c.shape().begin(), c.shape().end());
  return h;
}

}  // namespace

int ProtoEnumNumber(const pb::EnumDescriptor* enum_type, const char* prefix, const char* name) {
  std::string full = prefix;
  for (const char* c = name; *c != '\0'; ++c)
    full += static_cast<char>(std::toupper(static_cast<unsigned char>(*c)));
  const pb::EnumValueDescriptor* v = enum_type->FindValueByName(full);
  return v == nullptr ? -1 : v->number();
}

v1::Phase ToProto(Phase v) {
  return static_cast<v1::Phase>(ToNumber(kPhases, v, v1::Phase_descriptor(), "PHASE_"));
}
v1::Form ToProto(Form v) {
  return static_cast<v1::Form>(ToNumber(kForms, v, v1::Form_descriptor(), "FORM_"));
}
v1::PoolOp ToProto(PoolOp v) {
  return static_cast<v1::PoolOp>(ToNumber(kPoolOps, v, v1::PoolOp_descriptor(), "POOL_"));
}
v1::ElementType ToProto(ElementType v) {
  return static_cast<v1::ElementType>(
      ToNumber(kElementTypes, v, v1::ElementType_descriptor(), "ELEMENT_"));
}
v1::Statistic ToProto(StatKind v) {
  return static_cast<v1::Statistic>(
      ToNumber(kStatistics, v, v1::Statistic_descriptor(), "STATISTIC_"));
}
absl::StatusOr<Phase> FromProto(v1::Phase v, const char* what) {
  return FromNumber(kPhases, v, v1::Phase_descriptor(), "PHASE_", what);
}
v1::AblationKind ToProto(AblationKind v) {
  return static_cast<v1::AblationKind>(
      ToNumber(kAblationKinds, v, v1::AblationKind_descriptor(), "ABLATION_KIND_"));
}
v1::KvPolicyKind ToProto(KvPolicyKind v) {
  return static_cast<v1::KvPolicyKind>(
      ToNumber(kKvPolicyKinds, v, v1::KvPolicyKind_descriptor(), "KV_POLICY_KIND_"));
}
absl::StatusOr<AblationKind> FromProto(v1::AblationKind v, const char* what) {
  return FromNumber(kAblationKinds, v, v1::AblationKind_descriptor(), "ABLATION_KIND_", what);
}
absl::StatusOr<KvPolicyKind> FromProto(v1::KvPolicyKind v, const char* what) {
  return FromNumber(kKvPolicyKinds, v, v1::KvPolicyKind_descriptor(), "KV_POLICY_KIND_", what);
}

void FillInterventions(const Interventions& interventions, bool reference_leads,
                       bool capture_reference, v1::Interventions* out) {
  for (const HeadAblation& a : interventions.ablations) {
    v1::HeadAblation* entry = out->add_ablations();
    entry->set_layer(static_cast<int32_t>(a.layer));
    for (int64_t h : a.heads) entry->add_heads(static_cast<int32_t>(h));
    entry->set_kind(ToProto(a.kind));
  }
  const auto ranges = [](const std::vector<PositionRange>& from,
                         pb::RepeatedPtrField<v1::PositionRange>* to) {
    for (const PositionRange& r : from) {
      v1::PositionRange* range = to->Add();
      range->set_begin(r.begin);
      range->set_end(r.end);
    }
  };
  for (const Knockout& k : interventions.knockouts) {
    v1::Knockout* entry = out->add_knockouts();
    for (int64_t l : k.layers) entry->add_layers(static_cast<int32_t>(l));
    for (int64_t h : k.heads) entry->add_heads(static_cast<int32_t>(h));
    ranges(k.keys, entry->mutable_keys());
    ranges(k.queries, entry->mutable_queries());
  }
  out->set_reference_leads(reference_leads);
  out->set_capture_reference(capture_reference);
  const KvPolicy& p = interventions.kv_policy;
  if (p.kind == KvPolicyKind::kNone) return;
  const KvPolicy d;
  v1::KvPolicy* policy = out->mutable_kv_policy();
  policy->set_kind(ToProto(p.kind));
  policy->set_compression_ratio(p.compression_ratio);
  policy->set_budget(p.budget);
  if (p.n_sink != d.n_sink) policy->set_n_sink(p.n_sink);
  if (p.window_size != d.window_size) policy->set_window_size(p.window_size);
  if (p.kernel_size != d.kernel_size) policy->set_kernel_size(p.kernel_size);
  if (p.beta != d.beta) policy->set_beta(p.beta);
  policy->set_recent_size(p.recent_size);
  policy->set_adaptive(p.adaptive);
  if (p.alpha_safeguard != d.alpha_safeguard) policy->set_alpha_safeguard(p.alpha_safeguard);
  policy->set_report_scores(p.report_scores);
  policy->set_decode_interval(p.decode_interval);
}

absl::StatusOr<Form> FromProto(v1::Form v, const char* what) {
  return FromNumber(kForms, v, v1::Form_descriptor(), "FORM_", what);
}
absl::StatusOr<PoolOp> FromProto(v1::PoolOp v, const char* what) {
  return FromNumber(kPoolOps, v, v1::PoolOp_descriptor(), "POOL_", what);
}
absl::StatusOr<ElementType> FromProto(v1::ElementType v, const char* what) {
  return FromNumber(kElementTypes, v, v1::ElementType_descriptor(), "ELEMENT_", what);
}
absl::StatusOr<StatKind> FromProto(v1::Statistic v, const char* what) {
  return FromNumber(kStatistics, v, v1::Statistic_descriptor(), "STATISTIC_", what);
}
absl::StatusOr<StatKind> StatKindNamed(const std::string& name, const char* what) {
  const StatisticInfo* row = RowNamed(kStatistics, name);
  if (row == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": unknown statistic '", name.substr(0, 64), "' (", NamesOf(kStatistics), ")"));
  }
  return row->value;
}

absl::StatusOr<CaptureSpec> ToCaptureSpec(const v1::CaptureSpec& p) {
  CaptureSpec s;
  s.layers.assign(p.layers().begin(), p.layers().end());
  s.heads.assign(p.heads().begin(), p.heads().end());
  if (p.phases_size() > 0) {
    s.prefill = s.decode = false;
    for (int ph : p.phases()) {
      ASSIGN_OR_RETURN(const Phase phase, FromProto(static_cast<v1::Phase>(ph), "capture.phases"));
      (phase == Phase::kPrefill ? s.prefill : s.decode) = true;
    }
  }
  s.last_queries = p.last_queries();
  for (const auto& r : p.query_ranges()) s.query_ranges.push_back({r.begin(), r.end()});
  ASSIGN_OR_RETURN(s.form, FromProto(p.form(), "capture.form"));
  s.pool = p.pool();
  ASSIGN_OR_RETURN(s.pool_op, FromProto(p.pool_op(), "capture.pool_op"));
  s.top_k = p.top_k();
  // Statistics by their table's names (the proto's field names): a new statistic needs no line
  // here.
  const pb::Message& st = p.statistics();
  const pb::Reflection* reflection = st.GetReflection();
  for (const StatisticInfo& info : kStatistics) {
    const pb::FieldDescriptor* f = st.GetDescriptor()->FindFieldByName(info.name);
    if (f == nullptr) continue;  // spec_test.cpp checks every row has its field
    s.stats.*info.param = f->cpp_type() == pb::FieldDescriptor::CPPTYPE_BOOL
                              ? (reflection->GetBool(st, f) ? 1 : 0)
                              : reflection->GetInt64(st, f);
  }
  ASSIGN_OR_RETURN(s.element_type, FromProto(p.element_type(), "capture.element_type"));
  if (p.max_bytes() < 0) return absl::InvalidArgumentError("capture.max_bytes must be >= 0");
  return s;
}

void FillCaptureSpec(const CaptureSpec& s, int64_t num_layers, int64_t num_heads,
                     v1::CaptureSpec* out) {
  if (s.layers.empty()) {
    for (int64_t l = 0; l < num_layers; ++l) out->add_layers(static_cast<int32_t>(l));
  } else {
    for (int64_t l : s.layers) out->add_layers(static_cast<int32_t>(l));
  }
  if (s.heads.empty()) {
    for (int64_t h = 0; h < num_heads; ++h) out->add_heads(static_cast<int32_t>(h));
  } else {
    for (int64_t h : s.heads) out->add_heads(static_cast<int32_t>(h));
  }
  if (s.prefill) out->add_phases(ToProto(Phase::kPrefill));
  if (s.decode) out->add_phases(ToProto(Phase::kDecode));
  out->set_last_queries(s.last_queries);
  for (const auto& r : s.query_ranges) {
    auto* q = out->add_query_ranges();
    q->set_begin(r.begin);
    q->set_end(r.end);
  }
  out->set_form(ToProto(s.form));
  out->set_pool(static_cast<int32_t>(s.pool));
  out->set_pool_op(ToProto(s.pool_op));
  out->set_top_k(static_cast<int32_t>(s.top_k));
  pb::Message* st = out->mutable_statistics();
  const pb::Reflection* reflection = st->GetReflection();
  for (const StatisticInfo& info : kStatistics) {
    const pb::FieldDescriptor* f = st->GetDescriptor()->FindFieldByName(info.name);
    if (f == nullptr) continue;
    const int64_t v = s.stats.*info.param;
    if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_BOOL) {
      reflection->SetBool(st, f, v != 0);
    } else {
      reflection->SetInt64(st, f, v);
    }
  }
  out->set_element_type(ToProto(s.element_type));
}

void FillBlockHeader(const BlockHeader& h, v1::AttentionChunk* out) {
  FillCommon(h, out);
  out->set_form(ToProto(h.form));
  out->set_pool(static_cast<int32_t>(h.pool));
  out->set_element_type(ToProto(h.element_type));
}

void FillBlockHeader(const BlockHeader& h, v1::StatisticChunk* out) {
  FillCommon(h, out);
  out->set_kind(StatKindName(h.stat));
  out->set_statistic(ToProto(h.stat));
}

absl::StatusOr<BlockHeader> BlockHeaderOf(const v1::AttentionChunk& c) {
  ASSIGN_OR_RETURN(BlockHeader h, ReadCommon(c, BlockKind::kAttention));
  auto form = FromProto(c.form(), "form");
  if (!form.ok()) return Malformed(form.status());
  auto type = FromProto(c.element_type(), "element_type");
  if (!type.ok()) return Malformed(type.status());
  h.form = *form;
  h.pool = c.pool();
  h.element_type = *type;
  return h;
}

absl::StatusOr<BlockHeader> BlockHeaderOf(const v1::StatisticChunk& c) {
  ASSIGN_OR_RETURN(BlockHeader h, ReadCommon(c, BlockKind::kStatistic));
  // The enum when set (servers from 0.2 on); the name otherwise. A chunk whose two disagree is
  // malformed.
  auto kind = c.statistic() != v1::STATISTIC_UNSPECIFIED ? FromProto(c.statistic(), "statistic")
                                                         : StatKindNamed(c.kind(), "kind");
  if (!kind.ok()) return Malformed(kind.status());
  if (c.statistic() != v1::STATISTIC_UNSPECIFIED && !c.kind().empty() &&
      c.kind() != StatKindName(*kind)) {
    return Malformed(absl::InvalidArgumentError(absl::StrCat(
        "statistic ", StatKindName(*kind), " and kind '", c.kind().substr(0, 64), "' disagree")));
  }
  h.stat = *kind;
  h.element_type = ElementType::kFloat32;
  return h;
}

}  // namespace attnscope
