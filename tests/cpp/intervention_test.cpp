// The interventions' bounds and the KV policies' budgets, without a model.
#include "engine/intervention.h"

#include <gtest/gtest.h>

#include "engine/kv_policy.h"

namespace attnscope {
namespace {

TEST(InterventionTest, ReportedScoresAreBoundedPerRequest) {
  Interventions iv;
  iv.kv_policy.kind = KvPolicyKind::kH2o;
  iv.kv_policy.budget = 16;
  iv.kv_policy.report_scores = true;
  // 32 layers x 8 kv heads x 8192 keys = 2^21: the bound itself is allowed, one key more is not.
  EXPECT_TRUE(ValidateInterventions(iv, 32, 32, 8, 8192, 131072).ok());
  absl::Status refused = ValidateInterventions(iv, 32, 32, 8, 8193, 131072);
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.message().find("read the kept bits instead"), std::string::npos) << refused;
  iv.kv_policy.report_scores = false;
  EXPECT_TRUE(ValidateInterventions(iv, 32, 32, 8, 131072, 131072).ok());
}

TEST(InterventionTest, PyramidBudgetsFallWithDepthAndAverageTheUniformOne) {
  KvPolicy p;
  p.kind = KvPolicyKind::kPyramidKv;
  p.compression_ratio = 0.5;
  p.window_size = 8;
  // kvpress' get_layer_budget at q_len 40, 3 layers: 32, 20, 8 (mean 20 = int(40 * 0.5)).
  EXPECT_EQ(KeptKeys(p, 0, 3, 40), 32);
  EXPECT_EQ(KeptKeys(p, 1, 3, 40), 20);
  EXPECT_EQ(KeptKeys(p, 2, 3, 40), 8);
  // Where the pyramid does not fit (min_num below the window), every layer keeps the same.
  p.window_size = 30;
  EXPECT_EQ(KeptKeys(p, 0, 3, 40), 20);
  EXPECT_EQ(KeptKeys(p, 2, 3, 40), 20);
  // One layer: uniform (kvpress would divide by zero).
  p.window_size = 8;
  EXPECT_EQ(KeptKeys(p, 0, 1, 40), 20);
}

TEST(InterventionTest, AdaptiveBudgetsKeepTheLayersTotalAndEachHeadsSafeguard) {
  KvPolicy p;
  p.kind = KvPolicyKind::kH2o;
  p.budget = 10;
  p.adaptive = true;
  p.alpha_safeguard = 0.5;
  KvPolicyScorer scorer(p, 0, 1, 2, 2, 20);
  // Head 0's rows spread evenly over their keys, head 1's all on key 0: head 1's other keys score
  // 0, lowest in the layer, and only its safeguard of int(10 * 0.5) = 5 keys survives.
  torch::Tensor probs = torch::zeros({2, 20, 20});
  for (int64_t i = 0; i < 20; ++i) {
    probs[0][i].narrow(0, 0, i + 1).fill_(1.0 / static_cast<double>(i + 1));
    probs[1][i][0] = 1.0;
  }
  scorer.OnProbs(0, probs);
  const KvPolicyScorer::Choice choice = scorer.Decide(20);
  EXPECT_EQ(choice.kept[1].sum().item<int64_t>(), 5);
  EXPECT_TRUE(choice.kept[1][0].item<bool>());
  EXPECT_EQ(choice.kept[0].sum().item<int64_t>(), 15);  // 2 heads x budget 10 in all
  const KvDecision d = ToKvDecision(0, 0, choice, true, 64);
  EXPECT_EQ(d.kept.size(), 5u);  // 40 bits
  EXPECT_EQ(d.kept_per_head[0] + d.kept_per_head[1], 20);
  EXPECT_EQ(d.bytes_freed, 20 * 64);
  EXPECT_EQ(d.scores.size(), 40u);
}

}  // namespace
}  // namespace attnscope
