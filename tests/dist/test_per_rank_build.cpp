// Per-rank construction and loading (issue 15): under expert parallelism a rank allocates only what it holds.
// Each worker rank (this binary re-run, 2 or 4 ranks, parallel.expert = ranks) installs a CPU allocator that
// counts bytes, builds its training model with build_training_model (fresh from the seed, from a moeforge
// checkpoint, from a Hugging Face directory in the per-expert and in the fused transformers-v5 layout, a
// LoRA base, and an inference command's model of a checkpoint, train::InferenceJob), and reports its peak allocation and its parameters. Against the one-process model: every held
// tensor has the one-process values bit for bit, and the peak stays within the bytes of what the rank holds
// plus one tensor being read; far below the whole model.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <set>
#include <fstream>
#include <map>

#include "corpus.h"
#include "counting_allocator.h"
#include "io/hf_checkpoint.h"
#include "io/safetensors.h"
#include "model/decoder.h"
#include "model/param_names.h"
#include "parallel/layout.h"
#include "run_util.h"
#include "test_util.h"
#include "checkpoint/base_model.h"
#include "checkpoint/checkpoint.h"
#include "eval/inference.h"
#include "checkpoint/model_setup.h"

using namespace moeforge;
namespace fs = std::filesystem;

namespace {

// Experts dominate this model (as in Mixtral), so a rank's share is visibly smaller than the whole.
ModelConfig build_config() {
  ModelConfig c = test::tiny_config();
  c.intermediate_size = 256;
  c.moe.num_experts = 4;
  c.moe.num_experts_per_tok = 2;
  return c;
}
constexpr uint64_t kSeed = 11;

int64_t bytes_of(MixtralForCausalLM& m) {
  int64_t b = 0;
  for (auto& p : m->parameters()) b += p.numel() * p.element_size();
  for (auto& p : m->buffers()) b += p.numel() * p.element_size();
  return b;
}

}  // namespace

// Worker side: runs only when the parent test sets MOEFORGE_BUILD_WORKER_DIR.
TEST(PerRankBuildWorker, Run) {
  const char* dir = std::getenv("MOEFORGE_BUILD_WORKER_DIR");
  if (!dir) GTEST_SKIP() << "run by PerRankBuild.* as a worker";
  auto& counting = test::CountingAllocator::install();
  auto env = parallel::read_dist_env();
  const std::string method = std::getenv("MOEFORGE_BUILD_METHOD");
  auto report = [&](MixtralForCausalLM& model, int64_t peak, uint64_t fingerprint) {
    std::ofstream out(std::string(dir) + "/rank" + std::to_string(env.rank) + ".txt");
    out.precision(17);
    out << "peak " << peak << "\n";
    out << "fingerprint " << fingerprint << "\n";
    for (auto& p : model->named_parameters()) {
      auto t = p.value().detach().to(torch::kDouble).contiguous();
      // Sum and a position-weighted sum: two numbers that change with any value moved or altered.
      auto w = torch::arange(1, t.numel() + 1, torch::kDouble).view(t.sizes());
      out << "param " << p.key() << " " << p.value().numel() * p.value().element_size() << " " << t.sum().item<double>()
          << " " << (t * w).sum().item<double>() << "\n";
    }
  };
  if (method == "infer") {  // an inference command's model (eval, generate, routing under launch)
    train::InferenceJob job("test", 1);
    counting.peak = counting.now.load();
    const int64_t before = counting.now.load();
    auto model = job.load(std::getenv("MOEFORGE_BUILD_INIT_FROM"), "fp32");
    report(model, counting.peak.load() - before, 0);
    return;
  }
  parallel::LayoutOptions o;
  o.expert = env.world_size;
  o.timeout = std::chrono::milliseconds(60000);
  parallel::Layout layout(env, o, torch::kCPU);
  train::Recipe r;
  r.model = build_config();
  r.train.seed = kSeed;
  r.init_from = std::getenv("MOEFORGE_BUILD_INIT_FROM");
  if (method != "full") {
    r.finetune.method = method;
    r.runtime.precision = "fp32";
  }
  counting.peak = counting.now.load();
  const int64_t before = counting.now.load();
  auto built = train::build_training_model(r, layout, std::nullopt);
  report(built.model, counting.peak.load() - before, built.base.fingerprint);
}

class PerRankBuild : public ::testing::TestWithParam<int> {};

TEST_P(PerRankBuild, EachRankAllocatesOnlyItsShareWithTheOneProcessValues) {
  const int world = GetParam();
  test::TempDir dir("perrank");
  const ModelConfig cfg = build_config();
  // The one-process model: the seed's weights (what a fresh run starts from), and a trained-looking source whose
  // values differ from the seed's (so that loading is seen to happen).
  MixtralForCausalLM fresh(cfg);
  init_weights(*fresh, cfg.init_std, kSeed);
  MixtralForCausalLM source(cfg);
  init_weights(*source, cfg.init_std, kSeed + 1);
  const int64_t whole = bytes_of(source);
  int64_t largest = 0;
  for (auto& p : source->parameters()) largest = std::max<int64_t>(largest, p.numel() * p.element_size());
  // The sources: a moeforge checkpoint, an HF export (per-expert), and the same in transformers v5's fused layout.
  const std::string ckpt = dir.path + "/ckpt", hf = dir.path + "/hf", fused = dir.path + "/fused";
  train::CheckpointContents cc;
  cc.config = &cfg;
  cc.model = source;
  train::write_checkpoint_dir(ckpt, cc);
  std::vector<std::pair<std::string, at::Tensor>> weights;
  for (auto& p : source->named_parameters()) weights.emplace_back(p.key(), p.value().detach());
  io::HfExportOptions ho;
  ho.out_dir = hf;
  ho.dtype = "fp32";
  io::export_hf(cfg, weights, ho);
  {
    fs::create_directories(fused);
    fs::copy_file(hf + "/config.json", fused + "/config.json");
    std::vector<std::pair<std::string, at::Tensor>> fw;
    std::map<std::string, at::Tensor> by(weights.begin(), weights.end());
    for (const auto& [k, v] : weights) {
      if (is_expert_param(k)) continue;
      std::string n = k;
      auto p = n.find(".block_sparse_moe.");
      if (p != std::string::npos) n.replace(p, 18, ".mlp.");
      fw.emplace_back(n, v);
    }
    for (int64_t l = 0; l < cfg.num_layers; ++l) {
      std::vector<at::Tensor> gate_up, down;
      const std::string pre = "model.layers." + std::to_string(l);
      for (int64_t e = 0; e < cfg.moe.num_experts; ++e) {
        const std::string ex = pre + ".block_sparse_moe.experts." + std::to_string(e) + ".";
        gate_up.push_back(torch::cat({by[ex + "w1.weight"], by[ex + "w3.weight"]}, 0));
        down.push_back(by[ex + "w2.weight"]);
      }
      fw.emplace_back(pre + ".mlp.experts.gate_up_proj", torch::stack(gate_up));
      fw.emplace_back(pre + ".mlp.experts.down_proj", torch::stack(down));
    }
    io::write_safetensors(fused + "/model.safetensors", fw, {{"format", "pt"}});
  }
  struct Case {
    std::string name, init_from, method;
    MixtralForCausalLM* expected;
  } cases[] = {{"seed", "", "full", &fresh},
               {"checkpoint", ckpt, "full", &source},
               {"hf", "hf:" + hf, "full", &source},
               {"hf-fused", "hf:" + fused, "full", &source},
               {"lora-base", "hf:" + fused, "lora", &source},
               {"inference", ckpt, "infer", &source}};
  for (const auto& c : cases) {
    const std::string out = dir.path + "/" + c.name;
    fs::create_directories(out);
    ASSERT_TRUE(test::run_worker_ranks(world, "PerRankBuildWorker.Run",
                                       {{"MOEFORGE_BUILD_WORKER_DIR", out},
                                        {"MOEFORGE_BUILD_INIT_FROM", c.init_from},
                                        {"MOEFORGE_BUILD_METHOD", c.method}}))
        << c.name << ": a worker failed";
    std::map<std::string, std::pair<double, double>> expected;
    for (auto& p : (*c.expected)->named_parameters()) {
      auto t = p.value().detach().to(torch::kDouble).contiguous();
      auto w = torch::arange(1, t.numel() + 1, torch::kDouble).view(t.sizes());
      expected[p.key()] = {t.sum().item<double>(), (t * w).sum().item<double>()};
    }
    std::map<std::string, int> holders;
    std::set<std::string> fingerprints;
    for (int rank = 0; rank < world; ++rank) {
      std::ifstream in(out + "/rank" + std::to_string(rank) + ".txt");
      std::string tag, name, fp;
      int64_t peak = -1, held = 0, adapters = 0, bytes;
      double sum, wsum;
      in >> tag >> peak >> tag >> fp;
      fingerprints.insert(fp);
      int experts = 0;
      while (in >> tag >> name >> bytes >> sum >> wsum) {
        held += bytes;
        if (name.find("lora_") != std::string::npos) {  // LoRA's adapters: fresh (B = 0), checked elsewhere
          adapters += bytes;
          continue;
        }
        holders[name]++;
        if (is_expert_param(name)) ++experts;
        ASSERT_TRUE(expected.count(name)) << c.name << ": rank " << rank << " holds unknown " << name;
        EXPECT_EQ(sum, expected[name].first) << c.name << ": rank " << rank << " " << name;
        EXPECT_EQ(wsum, expected[name].second) << c.name << ": rank " << rank << " " << name;
      }
      EXPECT_EQ(experts, 3 * cfg.num_layers * cfg.moe.num_experts / world) << c.name << ": rank " << rank;
      // What the rank holds, plus one tensor in flight while it is read (and small change: generators, names).
      // The fused layout stores an expert's w1 and w3 as one [2I, H] row, read whole for either: two tensors.
      ASSERT_GT(peak, 0) << c.name;
      const int64_t in_flight = c.init_from.find("fused") != std::string::npos ? 2 * largest : largest;
      EXPECT_LE(peak, held + in_flight + (64 << 10)) << c.name << ": rank " << rank << " allocated more than its share";
      EXPECT_LT(peak - adapters, whole * 3 / 4) << c.name << ": rank " << rank;
    }
    for (const auto& [name, v] : expected)
      EXPECT_EQ(holders[name], is_expert_param(name) ? 1 : world) << c.name << ": " << name;
    // A LoRA base's fingerprint is the whole base's, the same on every rank: what one process loading it computes.
    EXPECT_EQ(fingerprints.size(), 1u) << c.name;
    if (c.method == "lora") {
      FinetuneSpec ft;
      ft.method = c.method;
      const uint64_t whole_fp = train::load_base_model(c.init_from, cfg, ft, "fp32").fingerprint;
      EXPECT_EQ(*fingerprints.begin(), std::to_string(whole_fp)) << c.name;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Ranks, PerRankBuild, ::testing::Values(2, 4),
                         [](const ::testing::TestParamInfo<int>& i) { return "ep" + std::to_string(i.param); });
