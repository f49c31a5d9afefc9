// The expert-parallel dispatcher against one process: 2 ranks (this test binary re-run as workers with
// RANK/WORLD_SIZE set) each hold half the experts of an MoE block and their own tokens; outputs, input
// gradients and every parameter gradient equal the single-process block's on all the tokens, for random
// routing, routing that sends every token to rank 0's experts (rank 1 receives nothing), and routing
// that sends nothing from one rank.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <torch/torch.h>

#include "corpus.h"
#include "run_util.h"
#include "model/moe_block.h"
#include "parallel/dist.h"
#include "parallel/expert_parallel.h"
#include "test_util.h"

using namespace moeforge;

namespace {
constexpr int kWorld = 2;
constexpr int64_t kTokens = 12;  // per rank

ModelConfig ep_config() {
  ModelConfig c = test::tiny_config();
  c.moe.num_experts = 4;
  c.moe.num_experts_per_tok = 2;
  c.moe.router_jitter = 0.0;
  return c;
}

// The same block on every process: seeded weights; `mode` 1 makes experts 0 and 1 (rank 0's) win every
// token: their router rows point along +1, the others along -1, and the inputs are positive.
MoEBlock make_block(const ModelConfig& c, int mode) {
  torch::manual_seed(11);
  MoEBlock b(c);
  torch::NoGradGuard ng;
  for (auto& p : b->parameters()) p.normal_(0.0, 0.3);
  if (mode == 1) {
    auto w = b->gate->parameters()[0];  // [E, H]
    w.fill_(0.0);
    w[0].fill_(1.0);
    w[1].fill_(0.5);
    w[2].fill_(-1.0);
    w[3].fill_(-0.5);
  }
  return b;
}

// Rank r's tokens (mode 2: rank 1 has none), and the weights of the scalar the test differentiates.
torch::Tensor tokens(const ModelConfig& c, int rank, int mode) {
  const int64_t n = mode == 2 && rank == 1 ? 0 : kTokens;
  auto g = torch::make_generator<at::CPUGeneratorImpl>(100 + rank);
  auto x = torch::randn({n, c.hidden_size}, g);
  return mode == 1 ? x.abs() + 0.1 : x;
}
torch::Tensor out_weights(const ModelConfig& c, int rank, int mode) {
  const int64_t n = mode == 2 && rank == 1 ? 0 : kTokens;
  auto g = torch::make_generator<at::CPUGeneratorImpl>(200 + rank);
  return torch::randn({n, c.hidden_size}, g);
}

}  // namespace

// Worker side: runs only when the parent test sets MOEFORGE_EP_WORKER_DIR.
TEST(ExpertParallelWorker, Run) {
  const char* dir = std::getenv("MOEFORGE_EP_WORKER_DIR");
  if (!dir) GTEST_SKIP() << "run by ExpertParallel.* as a worker";
  const int mode = std::atoi(std::getenv("MOEFORGE_EP_MODE"));
  auto env = parallel::read_dist_env();
  parallel::Dist dist(env, std::chrono::milliseconds(60000));
  auto group = dist.new_group("ep", {0, 1});
  const ModelConfig c = ep_config();
  MoEBlock b = make_block(c, mode);
  parallel::apply_expert_parallel(b, c, group);
  auto x = tokens(c, env.rank, mode).requires_grad_(true);
  auto out = b->forward(x);
  (out.y * out_weights(c, env.rank, mode)).sum().backward();
  std::vector<torch::Tensor> save{out.y.detach(), x.grad().defined() ? x.grad() : torch::zeros_like(x)};
  std::ofstream names(std::string(dir) + "/names" + std::to_string(env.rank) + ".txt");
  for (auto& p : b->named_parameters()) {
    names << p.key() << "\n";
    save.push_back(p.value().grad().defined() ? p.value().grad() : torch::zeros_like(p.value()));
  }
  torch::save(save, std::string(dir) + "/rank" + std::to_string(env.rank) + ".pt");
}

class ExpertParallel : public ::testing::TestWithParam<int> {};

TEST_P(ExpertParallel, BlockEqualsOneProcess) {
  const int mode = GetParam();
  test::TempDir dir("ep");
  ASSERT_TRUE(test::run_worker_ranks(kWorld, "ExpertParallelWorker.Run",
                                     {{"MOEFORGE_EP_WORKER_DIR", dir.path}, {"MOEFORGE_EP_MODE", std::to_string(mode)}}))
      << "worker failed";
  // One process, every token: rank 0's rows, then rank 1's.
  const ModelConfig c = ep_config();
  MoEBlock b = make_block(c, mode);
  auto x = torch::cat({tokens(c, 0, mode), tokens(c, 1, mode)}).requires_grad_(true);
  auto out = b->forward(x);
  (out.y * torch::cat({out_weights(c, 0, mode), out_weights(c, 1, mode)})).sum().backward();
  if (mode == 1) {  // every token chose experts 0 and 1
    EXPECT_EQ(out.router.tokens_per_expert[2].item<int64_t>(), 0);
    EXPECT_EQ(out.router.tokens_per_expert[3].item<int64_t>(), 0);
  }
  auto full = b->named_parameters();
  auto grad_of = [&](const std::string& name) {  // an expert no token reached has no gradient: zeros
    auto g = full[name].grad();
    return g.defined() ? g : torch::zeros_like(full[name]);
  };
  std::map<std::string, torch::Tensor> dense_sum;
  int64_t row = 0;
  for (int r = 0; r < kWorld; ++r) {
    std::vector<torch::Tensor> got;
    torch::load(got, dir / ("rank" + std::to_string(r) + ".pt"));
    const int64_t n = got[0].size(0);
    EXPECT_EQ(n, mode == 2 && r == 1 ? 0 : kTokens);
    if (n > 0) {
      EXPECT_LT(test::max_abs_diff(got[0], out.y.detach().narrow(0, row, n)), 1e-5) << "rank " << r << " outputs";
      EXPECT_LT(test::max_abs_diff(got[1], x.grad().narrow(0, row, n)), 1e-5) << "rank " << r << " input gradient";
    }
    row += n;
    std::ifstream names(dir / ("names" + std::to_string(r) + ".txt"));
    size_t k = 2;
    for (std::string name; std::getline(names, name); ++k) {
      ASSERT_TRUE(full.contains(name)) << name;
      if (name.rfind("experts.", 0) == 0) {  // an expert lives on one rank: its gradient is complete there
        EXPECT_LT(test::max_abs_diff(got[k], grad_of(name)), 1e-5) << name;
      } else {  // the router: each rank holds the gradient of its own tokens; they sum to the whole
        dense_sum[name] = dense_sum.count(name) ? dense_sum[name] + got[k] : got[k];
      }
    }
  }
  for (auto& [name, g] : dense_sum) EXPECT_LT(test::max_abs_diff(g, grad_of(name)), 1e-5) << name;
  EXPECT_FALSE(dense_sum.empty());
}

INSTANTIATE_TEST_SUITE_P(Routing, ExpertParallel, ::testing::Values(0, 1, 2),
                         [](const ::testing::TestParamInfo<int>& i) {
                           return std::string(i.param == 0 ? "Random" : i.param == 1 ? "AllToRankZero" : "EmptyRank");
                         });
