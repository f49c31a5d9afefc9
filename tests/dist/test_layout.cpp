// parallel::Layout over 2 and 4 ranks (this binary re-run as workers) against one process: gradients averaged
// over the world (dense) and over the replicas (experts), then the global norm with the experts split by
// expert parallelism counting each expert once and clipping exactly as one process holding every averaged
// gradient would; ZeRO-1 gives every parameter exactly one owner among the ranks holding it.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <map>
#include <torch/torch.h>

#include "corpus.h"
#include "model/decoder.h"
#include "model/param_names.h"
#include "parallel/grad_sync.h"
#include "parallel/layout.h"
#include "run_util.h"
#include "test_util.h"

using namespace moeforge;

namespace {
constexpr int kExpertParallel = 2;

ModelConfig layout_config() {
  ModelConfig c = test::tiny_config();
  c.moe.num_experts = 4;
  c.moe.num_experts_per_tok = 2;
  return c;
}

// The gradient one process would hold for parameter `name`: a fixed function of the name.
torch::Tensor full_grad(const std::string& name, torch::IntArrayRef shape) {
  auto g = torch::make_generator<at::CPUGeneratorImpl>(std::hash<std::string>{}(name) % 100000);
  return torch::randn(shape, g, torch::kDouble).to(torch::kFloat);
}

MixtralForCausalLM make_model() {
  MixtralForCausalLM m(layout_config());
  init_weights(*m, 0.02, 3);
  return m;
}

}  // namespace

// Worker side: runs only when the parent test sets MOEFORGE_LAYOUT_WORKER_DIR.
TEST(LayoutWorker, Run) {
  const char* dir = std::getenv("MOEFORGE_LAYOUT_WORKER_DIR");
  if (!dir) GTEST_SKIP() << "run by Layout.* as a worker";
  const double max_norm = std::atof(std::getenv("MOEFORGE_LAYOUT_MAX_NORM"));
  auto env = parallel::read_dist_env();
  parallel::LayoutOptions o;
  o.expert = kExpertParallel;
  o.zero = true;
  o.timeout = std::chrono::milliseconds(60000);
  parallel::Layout layout(env, o, torch::kCPU);
  auto model = make_model();
  layout.hold(model);  // keeps experts 2r, 2r+1 of every layer (names unchanged)
  // This rank's gradients: a rank-dependent multiple of a fixed function of the name; then averaged.
  for (auto& [name, p] : layout.named_parameters()) p.mutable_grad() = full_grad(name, p.sizes()) * (env.rank + 1);
  layout.sync_gradients();
  const double norm = layout.clip_grad_norm(max_norm);
  std::ofstream out(std::string(dir) + "/rank" + std::to_string(env.rank) + ".txt");
  out.precision(17);
  out << norm << "\n";
  for (size_t i = 0; i < layout.named_parameters().size(); ++i) {
    const auto& [name, p] = layout.named_parameters()[i];
    out << name << " " << layout.owned()[i] << " " << p.grad().to(torch::kDouble).sum().item<double>() << "\n";
  }
}

class Layout : public ::testing::TestWithParam<std::pair<int, double>> {};

TEST_P(Layout, AveragingClippingAndOwnershipEqualOneProcess) {
  const int kWorld = GetParam().first;
  const double max_norm = GetParam().second;
  test::TempDir dir("layout");
  ASSERT_TRUE(test::run_worker_ranks(kWorld, "LayoutWorker.Run",
                                     {{"MOEFORGE_LAYOUT_WORKER_DIR", dir.path},
                                      {"MOEFORGE_LAYOUT_MAX_NORM", std::to_string(max_norm)}}))
      << "worker failed";
  // One process holding every averaged gradient, by hand in fp64: a dense gradient is the mean over the W ranks
  // of (r + 1) x g, an expert's the sum over its holders (one per replica) of (r + 1) x g, divided by W.
  auto model = make_model();
  const ModelConfig c = layout_config();
  const int64_t local = c.moe.num_experts / kExpertParallel;
  auto factor = [&](const std::string& name) {
    double f = 0;
    if (!is_expert_param(name)) {
      for (int r = 0; r < kWorld; ++r) f += r + 1;
    } else {
      const auto at = name.find(".experts.") + 9;
      const int64_t e = std::stoll(name.substr(at, name.find('.', at) - at));
      for (int r = 0; r < kWorld; ++r)
        if (r % kExpertParallel == e / local) f += r + 1;
    }
    return f / kWorld;
  };
  double sq = 0;
  std::map<std::string, torch::Tensor> grads;
  for (auto& p : model->named_parameters()) {
    grads[p.key()] = full_grad(p.key(), p.value().sizes()).to(torch::kDouble) * factor(p.key());
    sq += grads[p.key()].pow(2).sum().item<double>();
  }
  const double norm = std::sqrt(sq);
  const double scale = max_norm > 0 && norm > max_norm ? max_norm / (norm + 1e-6) : 1.0;
  std::map<std::string, int> owners, holders;
  for (int r = 0; r < kWorld; ++r) {
    std::ifstream in(dir.path + "/rank" + std::to_string(r) + ".txt");
    double rank_norm = 0;
    in >> rank_norm;
    EXPECT_NEAR(rank_norm, norm, 1e-5 * norm) << "rank " << r;
    std::string name;
    int owned = 0;
    double sum = 0;
    int n = 0;
    while (in >> name >> owned >> sum) {
      ++n;
      ASSERT_TRUE(grads.count(name)) << name;
      const double want = grads[name].sum().item<double>() * scale;
      EXPECT_NEAR(sum, want, 1e-4 * (1 + std::abs(want))) << name << " on rank " << r;
      ++holders[name];
      owners[name] += owned;
    }
    EXPECT_GT(n, 0);
  }
  for (const auto& [name, g] : grads) {
    // Dense parameters live on every rank, experts on one rank per replica; one holder owns each.
    EXPECT_EQ(holders[name], is_expert_param(name) ? kWorld / kExpertParallel : kWorld) << name;
    EXPECT_EQ(owners[name], 1) << name << " owned by exactly one of its holders";
  }
}

// EP=2 x DP=1 and EP=2 x DP=2; max_norm 0: no clipping (the norm is still reported), 1e-3: all scaled down.
INSTANTIATE_TEST_SUITE_P(WorldAndMaxNorm, Layout,
                         ::testing::Values(std::make_pair(2, 0.0), std::make_pair(2, 1e-3), std::make_pair(4, 1e-3)));
