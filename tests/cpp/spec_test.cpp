// The capture spec's tables, text dialect and contract conversions: every enum value has its row
// and its proto value, text round-trips, and each malformed spelling gets a message naming it.
#include <gtest/gtest.h>

#include "core/block.h"
#include "core/capture_spec.h"
#include "core/capture_text.h"
#include "core/intervention_text.h"
#include "proto/contract.h"

namespace attnscope {
namespace {

TEST(SpecTables, EveryRowHasItsProtoValueAndBack) {
  for (const auto& row : kForms) {
    const v1::Form p = ToProto(row.value);
    EXPECT_TRUE(v1::Form_IsValid(p)) << row.name;
    EXPECT_EQ(*FromProto(p, "form"), row.value) << row.name;
  }
  for (const auto& row : kPhases) {
    const v1::Phase p = ToProto(row.value);
    EXPECT_TRUE(v1::Phase_IsValid(p) && p != v1::PHASE_UNSPECIFIED) << row.name;
    EXPECT_EQ(*FromProto(p, "phase"), row.value);
  }
  for (const auto& row : kPoolOps) EXPECT_EQ(*FromProto(ToProto(row.value), "op"), row.value);
  for (const auto& row : kElementTypes) {
    EXPECT_EQ(*FromProto(ToProto(row.value), "type"), row.value) << row.name;
  }
  // The proto has no value the tables lack (UNSPECIFIED aside).
  EXPECT_EQ(v1::Form_descriptor()->value_count(), static_cast<int>(std::size(kForms)));
  EXPECT_EQ(v1::ElementType_descriptor()->value_count(),
            static_cast<int>(std::size(kElementTypes)));
  EXPECT_EQ(v1::Phase_descriptor()->value_count(), static_cast<int>(std::size(kPhases)) + 1);
  EXPECT_EQ(v1::PoolOp_descriptor()->value_count(), static_cast<int>(std::size(kPoolOps)));
  EXPECT_FALSE(FromProto(static_cast<v1::Form>(99), "capture.form").ok());
  EXPECT_FALSE(FromProto(v1::PHASE_UNSPECIFIED, "phase").ok());
  for (const auto& row : kAblationKinds) {
    EXPECT_EQ(*FromProto(ToProto(row.value), "kind"), row.value) << row.name;
  }
  for (const auto& row : kKvPolicyKinds) {
    EXPECT_EQ(*FromProto(ToProto(row.value), "kind"), row.value) << row.name;
  }
  EXPECT_EQ(v1::AblationKind_descriptor()->value_count(),
            static_cast<int>(std::size(kAblationKinds)));
  EXPECT_EQ(v1::KvPolicyKind_descriptor()->value_count(),
            static_cast<int>(std::size(kKvPolicyKinds)));
  EXPECT_FALSE(FromProto(static_cast<v1::KvPolicyKind>(9), "kind").ok());
}

TEST(InterventionText, ParsesTheDialectAndFormatsItBack) {
  InterventionsText t;
  t.ablate = "layer=1 heads=3; layer=0 heads=0,2 kind=mean";
  t.knockout = "layers=1 keys=1:9,12:14 queries=41:81 ;heads=2 keys=0:1";
  t.kv_policy = "snapkv compression_ratio=0.3 window_size=8 kernel_size=3 adaptive=true";
  const auto x = ParseInterventions(t);
  ASSERT_TRUE(x.ok()) << x.status();
  ASSERT_EQ(x->ablations.size(), 2u);
  EXPECT_EQ(x->ablations[0].layer, 1);
  EXPECT_EQ(x->ablations[0].heads, std::vector<int64_t>{3});
  EXPECT_EQ(x->ablations[0].kind, AblationKind::kZero);
  EXPECT_EQ(x->ablations[1].heads, (std::vector<int64_t>{0, 2}));
  EXPECT_EQ(x->ablations[1].kind, AblationKind::kMean);
  ASSERT_EQ(x->knockouts.size(), 2u);
  EXPECT_EQ(x->knockouts[0].layers, std::vector<int64_t>{1});
  ASSERT_EQ(x->knockouts[0].keys.size(), 2u);
  EXPECT_EQ(x->knockouts[0].keys[1].begin, 12);
  EXPECT_EQ(x->knockouts[0].keys[1].end, 14);
  EXPECT_EQ(x->knockouts[0].queries[0].end, 81);
  EXPECT_TRUE(x->knockouts[1].layers.empty());
  EXPECT_EQ(x->knockouts[1].heads, std::vector<int64_t>{2});
  const KvPolicy& p = x->kv_policy;
  EXPECT_EQ(p.kind, KvPolicyKind::kSnapKv);
  EXPECT_EQ(p.compression_ratio, 0.3);
  EXPECT_EQ(p.window_size, 8);
  EXPECT_EQ(p.kernel_size, 3);
  EXPECT_TRUE(p.adaptive);
  EXPECT_EQ(p.n_sink, KvPolicy{}.n_sink);  // unset: the default

  const InterventionsText back = FormatInterventions(*x);
  const auto again = ParseInterventions(back);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(FormatInterventions(*again).ablate, back.ablate);
  EXPECT_EQ(FormatInterventions(*again).knockout, back.knockout);
  EXPECT_EQ(back.kv_policy,
            "snapkv compression_ratio=0.3 window_size=8 kernel_size=3 adaptive=true");

  // The same request on the wire as the Python client builds it.
  v1::Interventions proto;
  FillInterventions(*x, true, false, &proto);
  EXPECT_TRUE(proto.reference_leads());
  EXPECT_FALSE(proto.capture_reference());
  EXPECT_EQ(proto.ablations(1).kind(), v1::ABLATION_KIND_MEAN);
  EXPECT_EQ(proto.knockouts(0).keys(1).begin(), 12);
  EXPECT_EQ(proto.kv_policy().kind(), v1::KV_POLICY_KIND_SNAPKV);
  EXPECT_EQ(proto.kv_policy().window_size(), 8);
  EXPECT_FALSE(proto.kv_policy().has_n_sink());
  EXPECT_FALSE(proto.kv_policy().has_beta());
  EXPECT_TRUE(ParseInterventions(InterventionsText{})->empty());
}

TEST(InterventionText, MalformedSpellingsNameTheFlagAndTheItem) {
  const struct {
    InterventionsText text;
    const char* message;
  } cases[] = {
      {{"layer=1", "", ""}, "ablate: 'layer=1' needs layer=L and heads=H"},
      {{"heads=1", "", ""}, "needs layer=L"},
      {{"layer=x heads=1", "", ""}, "ablate layer: 'x' is not a layer index"},
      {{"layer=1 heads=1 kind=half", "", ""}, "ablate kind: 'half' is not zero or mean"},
      {{"layer=1 heads=1 layer=2", "", ""}, "gives its key twice"},
      {{"layer=1 head=1", "", ""}, "ablate: 'head' is not a key (layer, heads, kind)"},
      {{"layer 1", "", ""}, "ablate: 'layer' is not key=value"},
      {{"", "layers=1", ""}, "knockout: 'layers=1' needs keys=A:B"},
      {{"", "keys=5:3", ""}, "knockout keys: '5:3' is empty or negative"},
      {{"", "keys=5", ""}, "knockout keys: '5' is not A:B"},
      {{"", "keys=-1:3", ""}, "is empty or negative"},
      {{"", "keys=1:3 queries=a:b", ""}, "knockout queries: 'a:b' is not A:B"},
      {{"", "keys=1:3 rows=1:2", ""}, "'rows' is not a key (layers, heads, keys, queries)"},
      {{"", "", "lru"}, "kv_policy: 'lru' is not streaming_llm, h2o, snapkv or pyramidkv"},
      {{"", "", "none"}, "is not streaming_llm"},
      {{"", "", "h2o budget=many"}, "kv_policy budget: 'many' is not a number"},
      {{"", "", "snapkv adaptive=yes"}, "kv_policy adaptive: 'yes' is not true or false"},
      {{"", "", "snapkv window=8"}, "kv_policy: 'window' is not a key"},
      {{std::string(70000, 'x'), "", ""}, "are too long"},
  };
  for (const auto& c : cases) {
    const auto x = ParseInterventions(c.text);
    ASSERT_FALSE(x.ok()) << c.message;
    EXPECT_EQ(x.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(x.status().message().find(c.message), absl::string_view::npos)
        << x.status().message() << " / " << c.message;
  }
}

TEST(SpecTables, EveryStatisticHasItsProtoFieldAndValue) {
  const auto* fields = v1::Statistics::descriptor();
  EXPECT_EQ(fields->field_count(), static_cast<int>(std::size(kStatistics)));
  // One name: the Statistics field, the STATISTIC_ value, the chunk's kind and the dialect.
  EXPECT_EQ(v1::Statistic_descriptor()->value_count(),
            static_cast<int>(std::size(kStatistics)) + 1);
  for (const auto& row : kStatistics) {
    EXPECT_NE(fields->FindFieldByName(row.name), nullptr) << row.name;
    EXPECT_EQ(*StatKindNamed(row.name, "kind"), row.value);
    const v1::Statistic p = ToProto(row.value);
    EXPECT_TRUE(v1::Statistic_IsValid(p) && p != v1::STATISTIC_UNSPECIFIED) << row.name;
    EXPECT_EQ(*FromProto(p, "statistic"), row.value);
    StatisticsSpec st;
    ASSERT_TRUE(
        ParseStatistics(row.takes_value ? absl::StrCat(row.name, ":3") : row.name, &st).ok());
    EXPECT_EQ(st.*row.param, row.takes_value ? 3 : 1) << row.name;
  }
  EXPECT_FALSE(FromProto(v1::STATISTIC_UNSPECIFIED, "statistic").ok());
  CaptureSpec s;
  s.stats.row_entropy = 1;
  s.stats.key_score = 7;
  s.stats.sink_mass = 2;
  s.stats.local_mass = 5;
  s.stats.key_score_variance = 1;
  v1::CaptureSpec p;
  FillCaptureSpec(s, 0, 0, &p);
  EXPECT_TRUE(p.statistics().row_entropy());
  EXPECT_EQ(p.statistics().key_score(), 7);
  EXPECT_EQ(p.statistics().local_mass(), 5);
  auto back = ToCaptureSpec(p);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(FormatStatistics(back->stats),
            "row_entropy,sink_mass:2,local_mass:5,key_score:7,key_score_variance");
  EXPECT_TRUE(p.layers().empty());  // a request keeps "all" as an empty list
}

// The spellings before 0.2 are read (stored files, scripts) and written in today's names.
TEST(SpecText, ReadsTheSpellingsBefore02) {
  auto spec = ParseCaptureSpec(absl::string_view(
      "pooled:4 stats=entropy,sink:4,local:8,variance phases=prefill dtype=float16"));
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->stats.row_entropy, 1);
  EXPECT_EQ(spec->stats.sink_mass, 4);
  EXPECT_EQ(spec->stats.local_mass, 8);
  EXPECT_EQ(spec->stats.key_score_variance, 1);
  EXPECT_EQ(spec->element_type, ElementType::kFloat16);
  EXPECT_EQ(FormatCaptureSpec(*spec),
            "pooled:4 stats=row_entropy,sink_mass:4,local_mass:8,key_score_variance "
            "phases=prefill element_type=float16");
}

// A chunk carries the statistic twice (the enum, and the name for clients before 0.2): either
// alone is read, and two that disagree are malformed.
TEST(Blocks, AStatisticChunkIsReadByItsEnumOrItsName) {
  BlockHeader h;
  h.kind = BlockKind::kStatistic;
  h.stat = StatKind::kSinkMass;
  h.phase = Phase::kPrefill;
  h.shape = {1, 2};
  v1::StatisticChunk c;
  FillBlockHeader(h, &c);
  EXPECT_EQ(c.kind(), "sink_mass");
  EXPECT_EQ(c.statistic(), v1::STATISTIC_SINK_MASS);
  EXPECT_EQ(BlockHeaderOf(c)->stat, StatKind::kSinkMass);
  c.clear_statistic();
  EXPECT_EQ(BlockHeaderOf(c)->stat, StatKind::kSinkMass);
  c.set_statistic(v1::STATISTIC_LOCAL_MASS);
  c.clear_kind();
  EXPECT_EQ(BlockHeaderOf(c)->stat, StatKind::kLocalMass);
  c.set_kind("sink_mass");
  EXPECT_EQ(BlockHeaderOf(c).status().code(), absl::StatusCode::kDataLoss);
}

TEST(SpecText, RoundTripsEveryForm) {
  for (const char* text :
       {"none stats=row_entropy phases=prefill element_type=float32",
        "dense phases=prefill,decode element_type=float32",
        "head_mean layers=0,3 phases=decode element_type=float16",
        "head_max heads=1,2 phases=prefill,decode rows=last:16 element_type=bfloat16",
        "pooled:64 phases=prefill,decode element_type=float32",
        "pooled:4:max stats=sink_mass:4,key_score:64 phases=prefill rows=0:4,10:12 "
        "element_type=float32",
        "top_k:8 phases=prefill,decode element_type=float16"}) {
    auto spec = ParseCaptureSpec(absl::string_view(text));
    ASSERT_TRUE(spec.ok()) << text << ": " << spec.status();
    EXPECT_EQ(FormatCaptureSpec(*spec), text);
  }
  auto spec = ParseCaptureSpec(absl::string_view("pooled:8:max"));
  ASSERT_TRUE(spec.ok());
  EXPECT_EQ(spec->form, Form::kPooled);
  EXPECT_EQ(spec->pool, 8);
  EXPECT_EQ(spec->pool_op, PoolOp::kMax);
  EXPECT_TRUE(spec->prefill && spec->decode);
}

TEST(SpecText, MalformedSpellingsAreNamed) {
  const std::pair<CaptureSpecText, const char*> cases[] = {
      {{"densse"}, "form: 'densse' is not none, dense"},
      {{"pooled"}, "is pooled:P or pooled:P:mean|max"},
      {{"pooled:0"}, "must be at least 1"},
      {{"pooled:4:median"}, "pools by mean or max"},
      {{"pooled:x"}, "is not an integer"},
      {{"top_k"}, "is top_k:K"},
      {{"dense:3"}, "takes no argument"},
      {{"dense", "row_entropy,row_entropy"}, "is given twice"},
      {{"dense", "row_entropy,entropy"}, "is given twice"},
      {{"dense", "sink_mass"}, "needs a value: sink_mass:K"},
      {{"dense", "local"}, "needs a value: local_mass:W"},
      {{"dense", "row_entropy:3"}, "takes no value"},
      {{"dense", "perplexity"},
       "is not one of row_entropy, sink_mass:K, local_mass:W, key_score:W, key_score_variance"},
      {{"dense", "", "0,a"}, "layers: 'a' is not an integer"},
      {{"dense", "", "-1"}, "must be at least 0"},
      {{"dense", "", "", "", "prefil"}, "phases: 'prefil' is not prefill or decode"},
      {{"dense", "", "", "", "prefill,prefill"}, "is given twice"},
      {{"dense", "", "", "", "prefill", "4:2"}, "is empty"},
      {{"dense", "", "", "", "prefill", "last:0"}, "must be at least 1"},
      {{"dense", "", "", "", "prefill", "1-4"}, "is not A:B"},
      {{"dense", "", "", "", "prefill", "", "float64"}, "element_type: 'float64' is not float32"},
  };
  for (const auto& [text, want] : cases) {
    auto spec = ParseCaptureSpec(text);
    ASSERT_FALSE(spec.ok()) << want;
    EXPECT_TRUE(absl::IsInvalidArgument(spec.status()));
    EXPECT_NE(spec.status().message().find(want), absl::string_view::npos)
        << spec.status().message() << " lacks: " << want;
  }
  EXPECT_FALSE(ParseCaptureSpec(absl::string_view("dense colour=red")).ok());
  EXPECT_FALSE(ParseCaptureSpec(absl::string_view("dense top_k:3")).ok());
  EXPECT_FALSE(ParseCaptureSpec(std::string(1 << 17, 'x')).ok());
}

TEST(Blocks, NamesAndShapesComeFromTheTables) {
  BlockHeader h;
  h.phase = Phase::kDecode;
  h.layer = 3;
  h.step = 2;
  h.query_begin = 9;
  h.form = Form::kTopK;
  EXPECT_EQ(BlockName(h), "attention.decode.3.2.9");
  EXPECT_EQ(IndexName(h), "attention.decode.3.2.9.indices");
  h.kind = BlockKind::kStatistic;
  h.stat = StatKind::kLocalMass;
  EXPECT_EQ(BlockName(h), "statistic.local_mass.decode.3.2.9");
  EXPECT_FALSE(h.has_indices());
  using S = std::array<int64_t, 3>;
  EXPECT_EQ(BlockShape(Form::kDense, 4, 3, 10, 0, 0), (S{4, 3, 10}));
  EXPECT_EQ(BlockShape(Form::kHeadMax, 4, 3, 10, 0, 0), (S{1, 3, 10}));
  EXPECT_EQ(BlockShape(Form::kPooled, 4, 3, 10, 4, 0), (S{4, 1, 3}));
  EXPECT_EQ(BlockShape(Form::kTopK, 4, 3, 10, 0, 16), (S{4, 3, 10}));
  EXPECT_EQ(BlockShape(Form::kNone, 4, 3, 10, 0, 0), (S{0, 0, 0}));
}

TEST(Blocks, EstimateCountsEachFormAndStatisticFromTheTables) {
  CaptureSpec s;
  s.form = Form::kTopK;
  s.top_k = 2;
  s.decode = false;
  // 2 layers x 4 heads x 7 rows x 2 values x (4 value + 4 index bytes).
  EXPECT_EQ(EstimateCaptureBytes(s, 2, 4, 7, 1), 2 * 4 * 7 * 2 * 8);
  s.form = Form::kNone;
  s.stats.key_score = 3;
  EXPECT_EQ(EstimateCaptureBytes(s, 2, 4, 7, 1), 2 * 4 * 7 * 4);
}

}  // namespace
}  // namespace attnscope
