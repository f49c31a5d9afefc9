// Gradient exchange pieces that need no second process: ZeRO-1 ownership, local clipping, and a layout of
// one process (every collective the identity, nothing owned by anyone else).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <numeric>

#include "core/error.h"
#include "model/decoder.h"
#include "parallel/dist.h"
#include "parallel/grad_sync.h"
#include "parallel/layout.h"
#include "test_util.h"

using namespace moeforge;

TEST(AssignOwners, GreedyLeastLoadedInOrder) {
  // Sizes 10, 4, 4, 3, 1 over 2 ranks, by hand (loads before each pick): 10 -> r0 (0,0); 4 -> r1 (10,0);
  // 4 -> r1 (10,4); 3 -> r1 (10,8); 1 -> r0 (10,11).
  std::vector<torch::Tensor> ps{torch::zeros({10}), torch::zeros({2, 2}), torch::zeros({4}), torch::zeros({3}),
                                torch::zeros({1})};
  EXPECT_EQ(parallel::assign_owners(ps, 2), (std::vector<int>{0, 1, 1, 1, 0}));
  // Ties go to the lowest rank: four equal tensors over 3 ranks.
  std::vector<torch::Tensor> eq(4, torch::zeros({5}));
  EXPECT_EQ(parallel::assign_owners(eq, 3), (std::vector<int>{0, 1, 2, 0}));
  // One rank owns everything.
  EXPECT_EQ(parallel::assign_owners(ps, 1), (std::vector<int>(5, 0)));
  // Balance: no rank ends more than the largest tensor above another.
  std::vector<torch::Tensor> many;
  for (int i = 1; i <= 40; ++i) many.push_back(torch::zeros({(i * 37) % 23 + 1}));
  auto owner = parallel::assign_owners(many, 4);
  std::vector<int64_t> load(4, 0);
  for (size_t i = 0; i < many.size(); ++i) load[static_cast<size_t>(owner[i])] += many[i].numel();
  EXPECT_LE(*std::max_element(load.begin(), load.end()) - *std::min_element(load.begin(), load.end()), 23);
}

TEST(ClipGradNorm, MatchesHandComputedNorm) {
  auto a = torch::zeros({2}, torch::requires_grad()), b = torch::zeros({3}, torch::requires_grad()),
       c = torch::zeros({1}, torch::requires_grad());
  a.mutable_grad() = torch::tensor({3.0f, 0.0f});
  b.mutable_grad() = torch::tensor({0.0f, 4.0f, 12.0f});  // norm of all: sqrt(9 + 16 + 144) = 13; c has no gradient
  EXPECT_DOUBLE_EQ(parallel::clip_grad_norm({a, b, c}, 0.0), 13.0);  // 0: report only
  EXPECT_FLOAT_EQ(b.grad()[2].item<float>(), 12.0f);
  EXPECT_DOUBLE_EQ(parallel::clip_grad_norm({a, b, c}, 26.0), 13.0);  // below the limit: untouched
  EXPECT_FLOAT_EQ(a.grad()[0].item<float>(), 3.0f);
  EXPECT_DOUBLE_EQ(parallel::clip_grad_norm({a, b, c}, 6.5), 13.0);  // halved (to 6.5 / (13 + 1e-6))
  const double s = 6.5 / (13.0 + 1e-6);
  EXPECT_NEAR(a.grad()[0].item<float>(), 3.0 * s, 1e-6);
  EXPECT_NEAR(b.grad()[2].item<float>(), 12.0 * s, 1e-6);
  EXPECT_FALSE(c.grad().defined());
  EXPECT_DOUBLE_EQ(parallel::clip_grad_norm({c}, 1.0), 0.0);  // no gradients at all
}

TEST(ClipGradNorm, ShardedOverOneProcessEqualsLocal) {
  // A group of one: the sharded norm sums dense and expert squares once, as the local norm does.
  parallel::Dist one;
  auto d = torch::zeros({4}, torch::requires_grad()), e = torch::zeros({4}, torch::requires_grad());
  d.mutable_grad() = torch::tensor({1.0f, 2.0f, 2.0f, 0.0f});  // 9
  e.mutable_grad() = torch::tensor({4.0f, 0.0f, 0.0f, 0.0f});  // 16
  EXPECT_NEAR(parallel::clip_grad_norm_sharded({d}, {e}, one.world(), 1.0), 5.0, 1e-12);
  EXPECT_NEAR(d.grad()[1].item<float>(), 2.0 / (5.0 + 1e-6), 1e-6);
  EXPECT_NEAR(e.grad()[0].item<float>(), 4.0 / (5.0 + 1e-6), 1e-6);
}

TEST(Layout, OneProcessIsTheIdentity) {
  parallel::DistEnv env;  // no variables: one process
  parallel::LayoutOptions o;
  o.zero = true;  // ZeRO-1 over one process shards nothing
  parallel::Layout layout(env, o, torch::kCPU);
  EXPECT_EQ(layout.world(), 1);
  EXPECT_EQ(layout.describe(), "");
  EXPECT_FALSE(layout.zero());
  EXPECT_EQ(layout.global_micro_batch(3), 3);
  ModelConfig c = test::tiny_config();
  MixtralForCausalLM m(c);
  init_weights(*m, c.init_std, 1);
  layout.hold(m);
  EXPECT_EQ(layout.named_parameters().size(), m->named_parameters().size());
  EXPECT_TRUE(layout.owned().empty());
  for (auto& [name, p] : layout.named_parameters()) p.mutable_grad() = torch::full_like(p, 0.5);
  layout.sync_gradients();  // one process: gradients left as they are (not zeroed, not rescaled)
  int64_t n = 0;
  for (auto& [name, p] : layout.named_parameters()) {
    EXPECT_FLOAT_EQ(p.grad().view(-1)[0].item<float>(), 0.5f) << name;
    n += p.numel();
  }
  EXPECT_NEAR(layout.clip_grad_norm(0.0), 0.5 * std::sqrt(static_cast<double>(n)), 1e-3);
  const auto s = layout.shard_placement();
  EXPECT_FALSE(s.sharded());
  EXPECT_TRUE(s.writes_experts);
  parallel::LayoutOptions ep2;
  ep2.expert = 2;
  ep2.source = "r.yaml";
  try {
    parallel::Layout bad(env, ep2, torch::kCPU);
    FAIL() << "EP=2 over one process must be refused";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("r.yaml: key 'parallel.expert'"), std::string::npos) << e.what();
  }
}
