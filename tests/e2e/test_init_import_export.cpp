// The commands that make and move whole models without holding them (issue 15): `moeforge init` written one
// expert share at a time equals the one-process initialisation bit for bit and loads into any layout;
// `export --format hf` (streamed, shard by shard) and `import` (streamed, share by share) round-trip it exactly
// in fp32, through the per-expert and the fused layout; a training run started from the seed starts from the
// same weights `init` writes. `upcycle` turns a dense model into an MoE whose first forward is the dense model's.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <map>

#include "corpus.h"
#include "io/model_config_yaml.h"
#include "io/safetensors.h"
#include "model/decoder.h"
#include "run_util.h"
#include "test_util.h"
#include "checkpoint/checkpoint.h"
#include "checkpoint/manifest.h"

using namespace moeforge;
namespace fs = std::filesystem;

namespace {
using test::kBin;

void expect_same_weights(MixtralForCausalLM& a, MixtralForCausalLM& b, const std::string& what) {
  auto pb = b->named_parameters();
  ASSERT_EQ(a->named_parameters().size(), pb.size()) << what;
  for (auto& p : a->named_parameters()) {
    ASSERT_TRUE(pb.contains(p.key())) << what << ": " << p.key();
    EXPECT_TRUE(torch::equal(p.value(), pb[p.key()])) << what << ": " << p.key();
  }
}
}  // namespace

TEST(InitImportExport, InitBySharesEqualsOneProcessAndRoundTrips) {
  test::TempDir dir("initcmd");
  const std::string cfg_path = dir / "model.yaml";
  {
    // small_model_yaml is a recipe's `model:` mapping: the same keys, unindented, as a config file.
    std::string y = test::small_model_yaml("init-test");
    std::string out;
    std::istringstream in(y);
    for (std::string line; std::getline(in, line);) {
      if (line == "model:") continue;
      out += (line.rfind("  ", 0) == 0 ? line.substr(2) : line) + "\n";
    }
    std::ofstream(cfg_path) << out;
  }
  const ModelConfig cfg = io::load_model_config(cfg_path);
  ASSERT_EQ(cfg.moe.num_experts, 4);
  MixtralForCausalLM expected(cfg);
  init_weights(*expected, cfg.init_std, 7);

  for (int shares : {1, 2, 4}) {
    const std::string ck = dir / ("init" + std::to_string(shares));
    ASSERT_EQ(test::run_quiet(kBin + " init " + cfg_path + " --out " + ck + " --seed 7 --shards " + std::to_string(shares)), 0);
    EXPECT_TRUE(train::verify_checkpoint(ck).ok && !train::verify_checkpoint(ck).legacy) << shares;
    EXPECT_EQ(fs::exists(ck + "/layout.json"), shares > 1);
    auto m = train::load_checkpoint_model(ck);
    expect_same_weights(m, expected, "init --shards " + std::to_string(shares));
  }
  // Refusals: shares that do not divide the experts, an existing output.
  EXPECT_EQ(test::run_quiet(kBin + " init " + cfg_path + " --out " + (dir / "bad") + " --shards 3"), 2);
  EXPECT_FALSE(fs::exists(dir / "bad"));
  EXPECT_EQ(test::run_quiet(kBin + " init " + cfg_path + " --out " + (dir / "init2")), 2);

  // Streamed export of the 4-share checkpoint (fp32, tiny shards: one tensor or so each), then import.
  const std::string hf = dir / "hf", back = dir / "back";
  ASSERT_EQ(test::run_quiet(kBin + " export " + (dir / "init4") + " --format hf --dtype fp32 --max-shard-size 20KB --out " + hf), 0);
  ASSERT_TRUE(fs::exists(hf + "/model.safetensors.index.json"));
  ASSERT_EQ(test::run_quiet(kBin + " import " + hf + " --out " + back), 0);
  auto m = train::load_checkpoint_model(back);
  expect_same_weights(m, expected, "init -> export -> import");
  // --dtype bf16 stores bf16 (half the bytes) and loads as the weights rounded to bf16.
  ASSERT_EQ(test::run_quiet(kBin + " import " + hf + " --dtype bf16 --out " + back + "16"), 0);
  EXPECT_EQ(io::SafetensorsFile::open(back + "16/model.safetensors").entry("model.embed_tokens.weight").dtype, "BF16");
  auto m16 = train::load_checkpoint_model(back + "16");
  MixtralForCausalLM rounded(cfg);
  {
    torch::NoGradGuard ng;
    auto pe = expected->named_parameters();
    for (auto& p : rounded->named_parameters()) p.value().copy_(pe[p.key()].to(torch::kBFloat16).to(torch::kFloat));
  }
  expect_same_weights(m16, rounded, "import --dtype bf16");
  EXPECT_EQ(test::run_quiet(kBin + " import " + hf + " --dtype fp16 --out " + back + "-bad"), 2);

  // A fresh pretraining run (no init_from) starts from the same weights: its step-0 loss equals the loss of
  // a run started from the init checkpoint (same seed, same data, same order).
  const std::string data = test::make_prepared(dir, 60);
  const std::string recipe = dir / "r.yaml";
  std::ofstream(recipe) << "stage: pretrain\n" << test::small_model_yaml("init-test") << "data: {dir: " << data << "}\n"
                        << "train: {micro_batch_size: 2, seq_len: 32, max_steps: 1, eval_interval: 100, eval_batches: 1,"
                           " seed: 7}\nruntime: {threads: 1}\n";
  ASSERT_EQ(test::run_quiet(kBin + " train " + recipe + " --set output_dir=" + (dir / "fresh")), 0);
  ASSERT_EQ(test::run_quiet(kBin + " train " + recipe + " --set output_dir=" + (dir / "from_init") +
                            " --set init_from=" + (dir / "init2")), 0);
  auto a = test::metric_records(dir / "fresh", "loss"), b = test::metric_records(dir / "from_init", "loss");
  ASSERT_EQ(a.size(), 1u);
  ASSERT_EQ(b.size(), 1u);
  EXPECT_EQ(a[0]["loss"], b[0]["loss"]);
}

namespace {
// small_model_yaml's keys as a config file (unindented), with `moe` replaced.
std::string config_file(const std::string& name, const std::string& moe) {
  std::string y = test::small_model_yaml(name), out;
  std::istringstream in(y);
  for (std::string line; std::getline(in, line);) {
    if (line == "model:") continue;
    if (line.find("moe:") != std::string::npos) line = "  moe: " + moe;
    out += (line.rfind("  ", 0) == 0 ? line.substr(2) : line) + "\n";
  }
  return out;
}

torch::Tensor ckpt_logits(MixtralForCausalLM& m, const torch::Tensor& ids) {
  torch::NoGradGuard ng;
  m->eval();
  return m->forward(ids).logits;
}
}  // namespace

// Sparse upcycling (issue 16): a dense model (one expert) becomes 4 experts, top-2, each a copy of its MLP, and
// a fresh router (the one `init` draws from the seed). Identical experts with weights renormalised to 1 give the
// dense output whatever the router: the first forward's logits are the dense model's. From the dense model's
// Mistral export the same checkpoint results; --noise perturbs each expert by its own draw of the asked size;
// --granularity makes each expert a slice of the MLP with the same first forward; a source with experts, a top-k
// above the experts and an existing output are refused; training starts from it.
TEST(Upcycle, FirstForwardIsTheDenseModelsAndItTrains) {
  test::TempDir dir("upcycle");
  std::ofstream(dir / "dense.yaml") << config_file("dense", "{num_experts: 1, num_experts_per_tok: 1, balance: none}");
  const std::string dense_ck = dir / "dense";
  ASSERT_EQ(test::run_quiet(kBin + " init " + (dir / "dense.yaml") + " --out " + dense_ck + " --seed 5"), 0);
  auto dense = train::load_checkpoint_model(dense_ck);
  ASSERT_TRUE(dense->config().dense());

  const std::string up = dir / "up";
  ASSERT_EQ(test::run_quiet(kBin + " upcycle " + dense_ck + " --experts 4 --top-k 2 --seed 9 --out " + up), 0);
  EXPECT_TRUE(train::verify_checkpoint(up).ok);
  auto m = train::load_checkpoint_model(up);
  const ModelConfig& c = m->config();
  EXPECT_EQ(c.moe.num_experts, 4);
  EXPECT_EQ(c.moe.num_experts_per_tok, 2);
  EXPECT_EQ(c.moe.balance, Balance::AuxLoss);
  // Weights: every expert the dense MLP, the rest copied, the router the seed's fresh one.
  ModelConfig fresh_cfg = c;
  MixtralForCausalLM fresh(fresh_cfg);
  init_weights(*fresh, c.init_std, 9);
  auto pd = dense->named_parameters(), pf = fresh->named_parameters();
  for (auto& p : m->named_parameters()) {
    const std::string& n = p.key();
    const auto at = n.find(".block_sparse_moe.experts.");
    if (n.find(".block_sparse_moe.gate.") != std::string::npos) {
      EXPECT_TRUE(torch::equal(p.value(), pf[n])) << n;
    } else if (at != std::string::npos) {
      const std::string src = n.substr(0, at) + ".block_sparse_moe.experts.0" + n.substr(n.find('.', at + 26));
      EXPECT_TRUE(torch::equal(p.value(), pd[src])) << n << " vs " << src;
    } else {
      EXPECT_TRUE(torch::equal(p.value(), pd[n])) << n;
    }
  }
  torch::manual_seed(3);
  auto ids = torch::randint(0, c.vocab_size, {2, 16}, torch::kLong);
  auto ld = ckpt_logits(dense, ids), lu = ckpt_logits(m, ids);
  EXPECT_LE((ld - lu).abs().max().item<double>(), 1e-5 * ld.abs().max().item<double>());
  // The router does route: the tokens do not all go to the same pair.
  {
    torch::NoGradGuard ng;
    auto out = m->forward(ids);
    auto load = out.router[0].tokens_per_expert;
    EXPECT_GT((load > 0).sum().item<int64_t>(), 2) << load;
  }

  // From the Mistral export: the same checkpoint.
  ASSERT_EQ(test::run_quiet(kBin + " export " + dense_ck + " --format hf --dtype fp32 --out " + (dir / "hf")), 0);
  ASSERT_EQ(test::run_quiet(kBin + " upcycle " + (dir / "hf") + " --experts 4 --top-k 2 --seed 9 --out " + (dir / "up_hf")), 0);
  auto mh = train::load_checkpoint_model(dir / "up_hf");
  expect_same_weights(mh, m, "upcycled from the HF export");

  // --noise 0.05: each expert its own perturbation of about 5% of the weights' spread; close, not equal.
  ASSERT_EQ(test::run_quiet(kBin + " upcycle " + dense_ck + " --experts 4 --seed 9 --noise 0.05 --out " + (dir / "noisy")), 0);
  auto mn = train::load_checkpoint_model(dir / "noisy");
  auto pn = mn->named_parameters();
  const std::string x = "model.layers.1.block_sparse_moe.experts.";
  auto w = pd["model.layers.1.block_sparse_moe.experts.0.w1.weight"];
  for (int e = 0; e < 4; ++e) {
    auto d = pn[x + std::to_string(e) + ".w1.weight"] - w;
    const double rel_std = (d.std() / w.std()).item<double>();
    EXPECT_GT(rel_std, 0.045) << e;
    EXPECT_LT(rel_std, 0.055) << e;
  }
  EXPECT_FALSE(torch::equal(pn[x + "1.w1.weight"], pn[x + "2.w1.weight"]));
  auto ln = ckpt_logits(mn, ids);
  const double dn = (ld - ln).abs().max().item<double>();
  EXPECT_GT(dn, 0.0);
  EXPECT_LT(dn, 0.1 * ld.abs().max().item<double>());

  // --granularity G: expert e is slice e / (E / G) of the dense MLP (rows of w1 and w3, columns of w2 times G), the
  // router's rows repeat with period E / G (a fresh draw, not all equal), top-K by default G: every token takes
  // K / G copies of each slice with weights summing to 1 / G per slice, so the first forward is the dense model's.
  // One copy per slice (E 4, G 2), two (E 8, G 2, K 4), three slices (E 6, G 3, top-3 by default).
  struct Granular {
    int64_t E, G;
    std::string topk;
    int64_t K;
  };
  for (const Granular& t : {Granular{4, 2, "", 2}, Granular{8, 2, "4", 4}, Granular{6, 3, "", 3}}) {
    const std::string name = "granular" + std::to_string(t.E) + "-" + std::to_string(t.G);
    ASSERT_EQ(test::run_quiet(kBin + " upcycle " + dense_ck + " --experts " + std::to_string(t.E) + " --granularity " +
                              std::to_string(t.G) + (t.topk.empty() ? "" : " --top-k " + t.topk) + " --seed 9 --out " +
                              (dir / name)), 0) << name;
    auto mg = train::load_checkpoint_model(dir / name);
    const int64_t width = c.intermediate_size / t.G, copies = t.E / t.G;
    ASSERT_EQ(mg->config().intermediate_size, width) << name;
    EXPECT_EQ(mg->config().moe.num_experts, t.E) << name;
    EXPECT_EQ(mg->config().moe.num_experts_per_tok, t.K) << name;
    auto pg = mg->named_parameters();
    for (int64_t layer = 0; layer < c.num_layers; ++layer) {
      const std::string l = "model.layers." + std::to_string(layer) + ".block_sparse_moe.", d = l + "experts.0.";
      auto r = pg[l + "gate.weight"];
      for (int64_t e = 0; e < t.E; ++e) {
        const std::string x = l + "experts." + std::to_string(e) + ".";
        const int64_t g = e / copies;
        EXPECT_TRUE(torch::equal(pg[x + "w1.weight"], pd[d + "w1.weight"].narrow(0, g * width, width))) << name << x;
        EXPECT_TRUE(torch::equal(pg[x + "w3.weight"], pd[d + "w3.weight"].narrow(0, g * width, width))) << name << x;
        EXPECT_TRUE(torch::allclose(pg[x + "w2.weight"], pd[d + "w2.weight"].narrow(1, g * width, width) * double(t.G),
                                    1e-7, 0))
            << name << x;
        EXPECT_TRUE(torch::equal(r[e], r[e % copies])) << name << l << e;
      }
      EXPECT_FALSE(torch::equal(r[0], r[1])) << name << l;
    }
    auto lg = ckpt_logits(mg, ids);
    EXPECT_LE((ld - lg).abs().max().item<double>(), 1e-5 * ld.abs().max().item<double>()) << name;
  }
  // Refusals: E not a multiple of G, K not a multiple of G, E = G (every token to every expert), 48 / 5.
  EXPECT_EQ(test::run_quiet(kBin + " upcycle " + dense_ck + " --experts 4 --granularity 3 --out " + (dir / "bad3")), 2);
  EXPECT_EQ(test::run_quiet(kBin + " upcycle " + dense_ck + " --experts 4 --granularity 2 --top-k 3 --out " + (dir / "bad4")), 2);
  EXPECT_EQ(test::run_quiet(kBin + " upcycle " + dense_ck + " --experts 2 --granularity 2 --out " + (dir / "bad5")), 2);
  EXPECT_EQ(test::run_quiet(kBin + " upcycle " + dense_ck + " --experts 10 --granularity 5 --out " + (dir / "bad6")), 2);
  for (const char* b : {"bad3", "bad4", "bad5", "bad6"}) EXPECT_FALSE(fs::exists(dir / b)) << b;

  // Refusals, nothing written.
  EXPECT_EQ(test::run_quiet(kBin + " upcycle " + up + " --experts 8 --out " + (dir / "bad1")), 2);  // has experts
  EXPECT_EQ(test::run_quiet(kBin + " upcycle " + dense_ck + " --experts 4 --top-k 5 --out " + (dir / "bad2")), 2);
  EXPECT_EQ(test::run_quiet(kBin + " upcycle " + dense_ck + " --experts 4 --out " + up), 2);  // exists
  EXPECT_FALSE(fs::exists(dir / "bad1"));
  EXPECT_FALSE(fs::exists(dir / "bad2"));

  // Training starts from it: a recipe without a model (the checkpoint's config), init_from the checkpoint.
  const std::string data = test::make_prepared(dir, 40);
  std::ofstream(dir / "r.yaml") << "stage: pretrain\ninit_from: " << up << "\ndata: {dir: " << data << "}\n"
                                << "train: {micro_batch_size: 2, seq_len: 32, max_steps: 2, log_interval: 1, eval_interval: 100, "
                                   "eval_batches: 1}\nruntime: {threads: 1}\n";
  EXPECT_EQ(test::run_quiet(kBin + " train " + (dir / "r.yaml") + " --set output_dir=" + (dir / "run")), 0);
  EXPECT_EQ(test::metric_records(dir / "run", "loss").size(), 2u);
  // And from a granular one (8 experts of 24, top-4, from its config).
  EXPECT_EQ(test::run_quiet(kBin + " train " + (dir / "r.yaml") + " --set output_dir=" + (dir / "run-granular") +
                            " --set init_from=" + (dir / "granular8-2")), 0);
  EXPECT_EQ(test::metric_records(dir / "run-granular", "loss").size(), 2u);
}
