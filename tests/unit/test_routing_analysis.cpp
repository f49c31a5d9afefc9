// The routing analysis against a hand-built trace and hand-computed values.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "research/routing_analysis.h"

using namespace moeforge;
using train::analyze_routing;
using train::RoutingTrace;

namespace {
at::Tensor rows(const std::vector<std::vector<int64_t>>& r) {
  std::vector<int64_t> flat;
  for (const auto& x : r) flat.insert(flat.end(), x.begin(), x.end());
  return torch::tensor(flat, torch::kLong).view({static_cast<int64_t>(r.size()), -1});
}
}  // namespace

TEST(RoutingAnalysis, HandBuiltTraceGivesHandComputedValues) {
  RoutingTrace tr;
  tr.num_experts = 4;
  tr.top_k = 2;
  tr.domains = {"x", "y"};
  // Two sequences of three tokens: x x x | y y y. The pair (token 2, token 3) crosses sequences.
  tr.sequence = {0, 0, 0, 1, 1, 1};
  tr.domain = {0, 0, 0, 1, 1, 1};
  tr.topk_NK.push_back(rows({{1, 2}, {1, 3}, {3, 1}, {0, 2}, {0, 2}, {2, 0}}));
  tr.topk_NK.push_back(rows({{0, 1}, {0, 1}, {1, 0}, {0, 1}, {1, 0}, {0, 1}}));
  auto L = analyze_routing(tr);
  ASSERT_EQ(L.size(), 2u);
  // Layer 0. Pairs (0,1) (1,2) (3,4) (4,5): first choice 1=1, 1!=3, 0=0, 0!=2 -> 2/4;
  // sets {1,2}/{1,3} no, {1,3}/{1,3} yes, {0,2}/{0,2} yes, {0,2}/{0,2} yes -> 3/4.
  EXPECT_EQ(L[0].consecutive_pairs, 4);
  EXPECT_DOUBLE_EQ(L[0].first_choice_repeat_rate, 0.5);
  EXPECT_DOUBLE_EQ(L[0].top2_set_repeat_rate, 0.75);
  EXPECT_DOUBLE_EQ(L[0].random_first_choice_rate, 0.25);
  EXPECT_DOUBLE_EQ(L[0].random_top2_set_rate, 1.0 / 6.0);  // 1 / C(4, 2)
  EXPECT_NEAR(L[0].independent_first_choice_rate, 10.0 / 36.0, 1e-15);  // first choices 1 1 3 0 0 2
  EXPECT_EQ(L[0].load, (std::vector<int64_t>{3, 3, 4, 2}));
  EXPECT_NEAR(L[0].load_cv, std::sqrt(0.5) / 3.0, 1e-12);  // population std of {3,3,4,2} over mean 3
  EXPECT_DOUBLE_EQ(L[0].load_max_over_mean, 4.0 / 3.0);
  EXPECT_EQ(L[0].dead_experts, 0);
  const auto& sx = L[0].expert_share_by_domain.at("x");  // x: e1 x3, e2 x1, e3 x2 of 6
  const auto& sy = L[0].expert_share_by_domain.at("y");  // y: e0 x3, e2 x3 of 6
  ASSERT_EQ(sx.size(), 4u);
  EXPECT_DOUBLE_EQ(sx[0], 0.0);
  EXPECT_DOUBLE_EQ(sx[1], 0.5);
  EXPECT_DOUBLE_EQ(sx[2], 1.0 / 6.0);
  EXPECT_DOUBLE_EQ(sx[3], 2.0 / 6.0);
  EXPECT_DOUBLE_EQ(sy[0], 0.5);
  EXPECT_DOUBLE_EQ(sy[1], 0.0);
  EXPECT_DOUBLE_EQ(sy[2], 0.5);
  EXPECT_DOUBLE_EQ(sy[3], 0.0);
  // Layer 1: always {0, 1}, first choice alternating 0 0 1 | 0 1 0 -> pairs 0=0, 0!=1, 0!=1, 1!=0: 1/4;
  // sets always equal; experts 2 and 3 dead; load {6, 6, 0, 0}: CV 1, max/mean 2.
  EXPECT_DOUBLE_EQ(L[1].first_choice_repeat_rate, 0.25);
  EXPECT_DOUBLE_EQ(L[1].top2_set_repeat_rate, 1.0);
  EXPECT_NEAR(L[1].independent_first_choice_rate, 20.0 / 36.0, 1e-15);  // first choices 0 x4, 1 x2
  EXPECT_EQ(L[1].dead_experts, 2);
  EXPECT_NEAR(L[1].load_cv, 1.0, 1e-12);
  EXPECT_DOUBLE_EQ(L[1].load_max_over_mean, 2.0);
  // The JSON interface scripts rely on.
  auto j = train::routing_json(tr, L);
  ASSERT_EQ(j["layers"].size(), 2u);
  for (const char* k : {"first_choice_repeat_rate", "top2_set_repeat_rate", "random_first_choice_rate", "load_cv",
                        "expert_share_by_domain"})
    EXPECT_TRUE(j["layers"][0].contains(k)) << k;
  EXPECT_EQ(j["layers"][0]["expert_share_by_domain"]["y"][2].get<double>(), 0.5);
  EXPECT_EQ(j["tokens"], 6);
}

TEST(RoutingAnalysis, TopOneAndEmptyDomains) {
  RoutingTrace tr;
  tr.num_experts = 8;
  tr.top_k = 1;
  tr.domains = {"a", "b", "c"};
  tr.sequence = {0, 0, 0, 0};
  tr.domain = {2, 2, 2, 2};
  tr.topk_NK.push_back(rows({{5}, {5}, {5}, {7}}));
  auto L = analyze_routing(tr);
  EXPECT_DOUBLE_EQ(L[0].first_choice_repeat_rate, 2.0 / 3.0);
  EXPECT_DOUBLE_EQ(L[0].top2_set_repeat_rate, 2.0 / 3.0);  // k = 1: the set is the first choice
  EXPECT_DOUBLE_EQ(L[0].random_top2_set_rate, 1.0 / 8.0);
  EXPECT_EQ(L[0].expert_share_by_domain.size(), 1u);  // a and b have no tokens
  EXPECT_DOUBLE_EQ(L[0].expert_share_by_domain.at("c")[5], 0.75);
  EXPECT_EQ(L[0].dead_experts, 6);  // fair share 0.5: experts with 0 tokens
}

TEST(RoutingAnalysis, OverlapOfTheTopKSets) {  // the paper's "first or second choice" column
  RoutingTrace tr;
  tr.num_experts = 4;
  tr.top_k = 2;
  tr.domains = {"x"};
  tr.sequence = {0, 0, 0, 0};
  tr.domain = {0, 0, 0, 0};
  tr.topk_NK.push_back(rows({{0, 1}, {2, 3}, {1, 2}, {2, 1}}));
  auto L = analyze_routing(tr);
  EXPECT_DOUBLE_EQ(L[0].top2_overlap_rate, 2.0 / 3.0);           // {0,1}/{2,3} share none; the others do
  EXPECT_DOUBLE_EQ(L[0].top2_set_repeat_rate, 1.0 / 3.0);        // only {1,2}/{2,1}
  EXPECT_DOUBLE_EQ(L[0].random_top2_overlap_rate, 1.0 - 1.0 / 6.0);  // 1 - C(2,2)/C(4,2)
  tr.num_experts = 8;  // Mixtral's 8 experts, top-2: 1 - C(6,2)/C(8,2) = 13/28
  EXPECT_NEAR(analyze_routing(tr)[0].random_top2_overlap_rate, 13.0 / 28.0, 1e-15);
}
