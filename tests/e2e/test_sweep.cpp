// `moeforge sweep`: grid expansion and naming, errors before anything runs, skipping finished points,
// resuming interrupted ones, and the report.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "corpus.h"
#include "run_util.h"
#include "core/error.h"
#include "model/param_count.h"
#include "research/sweep.h"

using namespace moeforge;
namespace fs = std::filesystem;

namespace {
// A pretraining recipe of the small test model on `data` with the given train: keys.
std::string small_pretrain(const std::string& name, const std::string& data, const std::string& train) {
  return "stage: pretrain\n" + test::small_model_yaml(name) + "data: {dir: " + data + "}\ntrain: {" + train + "}\n";
}

std::string slurp(const std::string& p) {
  std::ifstream in(p);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}
}  // namespace

TEST(Sweep, GridExpansionNamingAndMatchedActiveParameters) {
  test::TempDir dir("sweepgrid");
  std::ofstream(dir / "base.yaml") << "stage: pretrain\n" << test::small_model_yaml("sweep") << "data: {dir: /nonexistent}\ntrain: {seq_len: 32}\n";
  std::ofstream(dir / "s.yaml") << "recipe: " << (dir / "base.yaml") << "\noutput_dir: " << (dir / "out")
                                << "\nset: {train.max_steps: 7}\ngrid:\n  model.moe.aux_loss_coef: [0, 0.01]\n"
                                   "  train.seed: [1, 2, 3]\n";
  auto spec = train::load_sweep(dir / "s.yaml");
  auto pts = train::expand_sweep(spec);
  ASSERT_EQ(pts.size(), 6u);
  EXPECT_EQ(pts[0].name, "aux_loss_coef=0_seed=1");  // first axis slowest
  EXPECT_EQ(pts[1].name, "aux_loss_coef=0_seed=2");
  EXPECT_EQ(pts[5].name, "aux_loss_coef=0.01_seed=3");
  EXPECT_EQ(pts[5].run_dir, dir / "out/aux_loss_coef=0.01_seed=3");
  EXPECT_DOUBLE_EQ(pts[5].recipe.model.moe.aux_loss_coef, 0.01);
  EXPECT_EQ(pts[5].recipe.train.seed, 3u);
  EXPECT_EQ(pts[5].recipe.train.max_steps, 7);  // the fixed overrides apply to every point
  EXPECT_EQ(pts[5].recipe.output_dir, pts[5].run_dir);
  EXPECT_EQ(train::point_status(pts[0]), train::PointStatus::Fresh);
  // Two axes with the same last segment are named by their full keys.
  // (An SFT base, where both take effect: sft.aux_loss_coef outside stage sft is refused, see NoOpKeys.)
  std::ofstream(dir / "base_sft.yaml") << "stage: sft\n" << test::small_model_yaml("sweep")
                                       << "data: {train: /nonexistent.jsonl, val: /nonexistent.jsonl}\ntrain: {seq_len: 32}\n";
  std::ofstream(dir / "s2.yaml") << "recipe: " << (dir / "base_sft.yaml") << "\noutput_dir: " << (dir / "out2")
                                 << "\ngrid:\n  model.moe.aux_loss_coef: [0.1]\n  sft.aux_loss_coef: [0.2]\n";
  auto p2 = train::expand_sweep(train::load_sweep(dir / "s2.yaml"));
  EXPECT_EQ(p2[0].name, "model.moe.aux_loss_coef=0.1_sft.aux_loss_coef=0.2");
  // An axis whose points resolve to the same run is refused, naming the points and the axis (0.01 and 1.0e-2 are
  // one number); so is a no-op key (sft.aux_loss_coef in a pretraining recipe), naming what disables it.
  std::ofstream(dir / "s4.yaml") << "recipe: " << (dir / "base.yaml") << "\noutput_dir: " << (dir / "out4")
                                 << "\ngrid:\n  model.moe.aux_loss_coef: [0.01, 1.0e-2]\n";
  try {
    train::expand_sweep(train::load_sweep(dir / "s4.yaml"));
    ADD_FAILURE() << "identical points accepted";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("resolve to the same run: model.moe.aux_loss_coef changes nothing"), std::string::npos)
        << e.what();
  }
  std::ofstream(dir / "s5.yaml") << "recipe: " << (dir / "base.yaml") << "\noutput_dir: " << (dir / "out5")
                                 << "\ngrid:\n  sft.aux_loss_coef: [0.1, 0.2]\n";
  try {
    train::expand_sweep(train::load_sweep(dir / "s5.yaml"));
    ADD_FAILURE() << "a no-op axis accepted";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("key 'sft.aux_loss_coef' (0.1): has no effect: stage is pretrain"),
              std::string::npos) << e.what();
  }
  // Experts x top-k at matched active parameters: intermediate_size scales so the active counts agree
  // with the base recipe's to within one intermediate unit.
  std::ofstream(dir / "s3.yaml") << "recipe: " << (dir / "base.yaml") << "\noutput_dir: " << (dir / "out3")
                                 << "\nmatch_active_params: true\ngrid:\n  model.moe.num_experts: [4, 8]\n"
                                    "  model.moe.num_experts_per_tok: [1, 2]\n";
  auto p3 = train::expand_sweep(train::load_sweep(dir / "s3.yaml"));
  ASSERT_EQ(p3.size(), 4u);
  const auto& base_model = p3[1].recipe.model;  // E=4, k=2: the base itself
  EXPECT_EQ(base_model.intermediate_size, 48);
  const int64_t target = count_params(base_model).active;
  for (const auto& p : p3) {
    const auto& m = p.recipe.model;
    const int64_t unit = 3 * m.hidden_size * m.num_layers * m.moe.num_experts_per_tok;
    EXPECT_LE(std::abs(count_params(m).active - target), unit / 2 + 1) << p.name;
  }
  EXPECT_EQ(p3[0].recipe.model.intermediate_size, 96);  // top-1: twice the width
}

TEST(Sweep, BadInputFailsBeforeAnythingRuns) {
  test::TempDir dir("sweepbad");
  std::ofstream(dir / "base.yaml") << "stage: pretrain\n" << test::small_model_yaml("sweep") << "data: {dir: /nonexistent}\ntrain: {seq_len: 32}\n";
  auto err = [&](const std::string& body) -> std::string {
    std::ofstream(dir / "s.yaml") << "recipe: " << (dir / "base.yaml") << "\noutput_dir: " << (dir / "out") << "\n" << body;
    try {
      train::expand_sweep(train::load_sweep(dir / "s.yaml"));
    } catch (const UserError& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_EQ(err("grid:\n  train.seed: [1]\n"), "");
  EXPECT_NE(err("grid:\n  model.moe.aux_coef: [0.1]\n").find("aux_coef"), std::string::npos);  // no such key
  EXPECT_NE(err("grid:\n  model.moe.aux_loss_coeff: [0.1]\n").find("did you mean 'aux_loss_coef'"), std::string::npos);
  EXPECT_NE(err("grid:\n  train.seq_lenn: [16]\n").find("did you mean 'seq_len'"), std::string::npos);
  EXPECT_NE(err("grid: {}\n").find("'grid'"), std::string::npos);                              // empty grid
  EXPECT_NE(err("grid:\n  train.seed: []\n").find("non-empty list"), std::string::npos);       // empty axis
  EXPECT_NE(err("grid:\n  train.max_steps: [ten]\n").find("max_steps"), std::string::npos);    // wrong type
  EXPECT_NE(err("grid:\n  train.seed: [1]\njobs: 2\n").find("unknown key 'jobs'"), std::string::npos);
  // runtime.precision: auto would let every point's probe pick its own arithmetic.
  EXPECT_NE(err("set: {runtime.precision: auto}\ngrid:\n  train.seed: [1]\n").find("'runtime.precision': auto"),
            std::string::npos);
  EXPECT_EQ(err("set: {runtime.precision: bf16}\ngrid:\n  train.seed: [1]\n"), "");
  EXPECT_FALSE(fs::exists(dir / "out"));
  // The command: exit 2 and nothing written.
  std::ofstream(dir / "s.yaml") << "recipe: " << (dir / "base.yaml") << "\noutput_dir: " << (dir / "out")
                                << "\ngrid:\n  model.moe.aux_coef: [0.1]\n";
  EXPECT_EQ(test::run_quiet(std::string(MOEFORGE_BINARY) + " sweep " + (dir / "s.yaml")), 2);
  EXPECT_FALSE(fs::exists(dir / "out"));
}

TEST(Sweep, RunsSkipsFinishedResumesInterruptedAndReports) {
  test::TempDir dir("sweeprun");
  std::string data = test::make_prepared(dir, 60);
  const std::string bin = MOEFORGE_BINARY;
  std::ofstream(dir / "base.yaml") << small_pretrain("sweep", data, "micro_batch_size: 2, seq_len: 32, max_steps: 4, "
                                                      "log_interval: 1, eval_interval: 2, eval_batches: 1, checkpoint_interval: 2");
  std::ofstream(dir / "s.yaml") << "recipe: " << (dir / "base.yaml") << "\noutput_dir: " << (dir / "out")
                                << "\ngrid:\n  model.moe.aux_loss_coef: [0, 0.1]\n  train.seed: [1, 2]\n";
  // Every point is killed right after its step-2 checkpoint: the sweep reports the failures (exit 1).
  EXPECT_EQ(test::run_quiet("MOEFORGE_TEST_KILL_AFTER_CHECKPOINT=2 " + bin + " sweep " + (dir / "s.yaml") + " --jobs 2"), 1);
  auto pts = train::expand_sweep(train::load_sweep(dir / "s.yaml"));
  for (const auto& p : pts) EXPECT_EQ(train::point_status(p), train::PointStatus::Interrupted) << p.name;
  // Run again: each point resumes from step 2 and finishes.
  ASSERT_EQ(test::run_quiet(bin + " sweep " + (dir / "s.yaml") + " --jobs 2"), 0);
  for (const auto& p : pts) {
    EXPECT_EQ(train::point_status(p), train::PointStatus::Finished) << p.name;
    EXPECT_NE(slurp(p.run_dir + "/train.log").find("resuming from"), std::string::npos) << p.name;
    EXPECT_EQ(test::metric_records(p.run_dir, "loss").size(), 4u) << p.name;
  }
  // A third run skips every point (nothing is retrained: the summaries are untouched).
  const auto t = fs::last_write_time(pts[0].run_dir + "/summary.json");
  const std::string log = dir / "third.log";
  ASSERT_EQ(std::system((bin + " sweep " + (dir / "s.yaml") + " > " + log + " 2>&1").c_str()), 0);
  EXPECT_EQ(fs::last_write_time(pts[0].run_dir + "/summary.json"), t);
  EXPECT_NE(slurp(log).find("finished, skipped"), std::string::npos);
  // The report: one row per coefficient (seeds folded), the values read back from the runs.
  const std::string csv = slurp(dir / "out/summary.csv");
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 3);  // header + 2 rows
  EXPECT_EQ(csv.rfind("model.moe.aux_loss_coef,runs,finished,", 0), 0u) << csv;
  std::ifstream rj(dir / "out/report.json");
  auto report = nlohmann::json::parse(rj);
  ASSERT_EQ(report["points"].size(), 4u);
  std::ifstream s0(pts[0].run_dir + "/summary.json");
  auto sum0 = nlohmann::json::parse(s0);
  EXPECT_EQ(report["points"][0]["final_val_loss"], sum0["final_val_loss"]);
  EXPECT_EQ(report["points"][0]["val_curve"].size(), 2u);  // steps 2 and 4
  const double v0 = sum0["final_val_loss"], v1 = nlohmann::json::parse(std::ifstream(pts[1].run_dir + "/summary.json"))["final_val_loss"];
  char mean[32];
  std::snprintf(mean, sizeof mean, "%.4f", (v0 + v1) / 2);
  EXPECT_NE(slurp(dir / "out/summary.md").find(mean), std::string::npos) << slurp(dir / "out/summary.md");
}

// The report's balance columns from hand-written runs: loads [[6, 2, 0, 0], [2, 2, 2, 2]] at the last
// logged step (worst max/mean 6 / 2 = 3; dead: layer 0's experts 2 and 3 under 10% of the fair share 2);
// CV and entropy are the means of the logged per-layer values; losses fold over the seeds.
TEST(Sweep, ReportBalanceColumnsFromHandWrittenRuns) {
  test::TempDir dir("sweeprep");
  std::ofstream(dir / "base.yaml") << "stage: pretrain\n" << test::small_model_yaml("sweep")
                                   << "data: {dir: /nonexistent}\ntrain: {seq_len: 32}\n";
  std::ofstream(dir / "s.yaml") << "recipe: " << (dir / "base.yaml") << "\noutput_dir: " << (dir / "out")
                                << "\ngrid:\n  train.seed: [1, 2]\n";
  auto spec = train::load_sweep(dir / "s.yaml");
  auto pts = train::expand_sweep(spec);
  const double val[] = {2.0, 3.0}, tr[] = {1.5, 2.5};
  for (size_t i = 0; i < 2; ++i) {
    fs::create_directories(pts[i].run_dir);
    std::ofstream(pts[i].run_dir + "/summary.json")
        << nlohmann::json{{"final_val_loss", val[i]}, {"final_train_loss", tr[i]}, {"tokens_per_second", 100.0 * (i + 1)}}.dump();
    std::ofstream m(pts[i].run_dir + "/metrics.jsonl");
    m << nlohmann::json{{"step", 1}, {"loss", 9.0}, {"expert_load", {{1, 1, 1, 1}, {1, 1, 1, 1}}}, {"load_max_over_mean", 1.0},
                        {"layer_load_cv", {0.0, 0.0}}, {"layer_router_entropy", {1.0, 1.0}}, {"z_loss", 0.0}}.dump() << "\n";
    m << nlohmann::json{{"step", 2}, {"val_loss", val[i]}}.dump() << "\n";
    m << nlohmann::json{{"step", 2}, {"loss", 1.0}, {"expert_load", {{6, 2, 0, 0}, {2, 2, 2, 2}}}, {"load_max_over_mean", 3.0},
                        {"layer_load_cv", {1.2, 0.0}}, {"layer_router_entropy", {0.5, 1.5}}, {"z_loss", 0.25}}.dump() << "\n";
  }
  train::write_sweep_report(spec, pts);
  const std::string csv = slurp(dir / "out/summary.csv");
  // No non-seed axis: one row, 2 runs. sd of {2, 3} = sqrt(0.5).
  EXPECT_NE(csv.find("\n2,2,"), std::string::npos) << csv;
  // Last step: max/mean 3, CV 0.6, 2 dead, entropy 1, z 0.25; over training: max/mean (1 + 3) / 2, CV (0 + 0.6) / 2,
  // never under 1.5 at the end (no settling step, 0 runs).
  EXPECT_NE(csv.find(",2.0000,0.7071,2.5000,0.7071,150,3.000,0.600,2.0,1.000,0.250,2.000,0.300,,0\n"), std::string::npos) << csv;
  auto report = nlohmann::json::parse(std::ifstream(dir / "out/report.json"));
  EXPECT_EQ(report["points"][1]["val_curve"], nlohmann::json::parse("[[2, 3.0]]"));
  EXPECT_EQ(report["points"][0]["layer_load"], nlohmann::json::parse("[[6, 2, 0, 0], [2, 2, 2, 2]]"));
}

// Variants: named arms that set several keys at once form the first axis ("variant"), crossed with the grid;
// the report has a row per arm, with the step from which each run's worst max/mean stays under 1.5, by hand.
TEST(Sweep, VariantsAndBalanceOverTraining) {
  test::TempDir dir("sweepvar");
  std::ofstream(dir / "base.yaml") << "stage: pretrain\n" << test::small_model_yaml("sweep")
                                   << "data: {dir: /nonexistent}\ntrain: {seq_len: 32}\n";
  std::ofstream(dir / "s.yaml") << "recipe: " << (dir / "base.yaml") << "\noutput_dir: " << (dir / "out")
                                << "\nvariants:\n  none: {model.moe.balance: none}\n"
                                   "  global: {model.moe.balance_scope: global_batch, model.moe.aux_loss_coef: 0.1}\n"
                                   "grid:\n  train.seed: [1, 2]\n";
  auto spec = train::load_sweep(dir / "s.yaml");
  auto pts = train::expand_sweep(spec);
  ASSERT_EQ(pts.size(), 4u);
  EXPECT_EQ(pts[0].name, "variant=none_seed=1");
  EXPECT_EQ(pts[3].name, "variant=global_seed=2");
  EXPECT_EQ(pts[0].recipe.model.moe.balance, Balance::None);
  EXPECT_EQ(pts[0].recipe.model.moe.balance_scope, BalanceScope::MicroBatch);
  EXPECT_EQ(pts[3].recipe.model.moe.balance, Balance::AuxLoss);
  EXPECT_EQ(pts[3].recipe.model.moe.balance_scope, BalanceScope::GlobalBatch);
  EXPECT_DOUBLE_EQ(pts[3].recipe.model.moe.aux_loss_coef, 0.1);
  EXPECT_EQ(pts[3].recipe.train.seed, 2u);
  // Worst-layer max/mean per logged step (steps 10, 20, ...): none/1 never settles, none/2 from step 10,
  // global/1 from step 40 (1.6 at 30 breaks the first run under 1.5), global/2 from step 20.
  const std::vector<std::vector<double>> curves{{2.0, 1.8, 1.7}, {1.4, 1.3, 1.2}, {2.0, 1.4, 1.6, 1.3, 1.2}, {1.9, 1.1, 1.0}};
  for (size_t i = 0; i < 4; ++i) {
    fs::create_directories(pts[i].run_dir);
    std::ofstream(pts[i].run_dir + "/summary.json")
        << nlohmann::json{{"final_val_loss", 2.0}, {"final_train_loss", 2.0}, {"tokens_per_second", 100.0}}.dump();
    std::ofstream m(pts[i].run_dir + "/metrics.jsonl");
    for (size_t k = 0; k < curves[i].size(); ++k)
      m << nlohmann::json{{"step", 10 * (k + 1)}, {"loss", 1.0}, {"expert_load", {{1, 1, 1, 1}}},
                          {"load_max_over_mean", curves[i][k]}, {"layer_load_cv", {0.1 * static_cast<double>(k)}},
                          {"layer_router_entropy", {1.0}}, {"z_loss", 0.0}}.dump()
        << "\n";
  }
  train::write_sweep_report(spec, pts);
  const std::string csv = slurp(dir / "out/summary.csv");
  // none: max/mean over training (2.0+1.8+1.7)/3 = 1.833 and (1.4+1.3+1.2)/3 = 1.3 -> 1.567; CV (0.1, 0.1) -> 0.1;
  // settled: 10 (1 of 2). global: (7.5/5 = 1.5, 4.0/3 = 1.333) -> 1.417; CV (0.2, 0.1) -> 0.15; settled (40 + 20) / 2.
  EXPECT_NE(csv.find("\nnone,2,2,"), std::string::npos) << csv;
  EXPECT_NE(csv.find(",1.567,0.100,10,1\n"), std::string::npos) << csv;
  EXPECT_NE(csv.find("\nglobal,2,2,"), std::string::npos) << csv;
  EXPECT_NE(csv.find(",1.417,0.150,30,2\n"), std::string::npos) << csv;
  const std::string md = slurp(dir / "out/summary.md");
  EXPECT_NE(md.find("| 10 (1/2) |"), std::string::npos) << md;
  EXPECT_NE(md.find("| 30 (2/2) |"), std::string::npos) << md;
  auto report = nlohmann::json::parse(std::ifstream(dir / "out/report.json"));
  EXPECT_EQ(report["points"][2]["balance_curve"].size(), 5u);
  // A variant that is not a mapping, and a sweep with neither grid nor variants, are refused.
  std::ofstream(dir / "bad.yaml") << "recipe: " << (dir / "base.yaml") << "\noutput_dir: " << (dir / "o")
                                  << "\nvariants:\n  a: 3\n";
  EXPECT_THROW(train::load_sweep(dir / "bad.yaml"), UserError);
  std::ofstream(dir / "bad2.yaml") << "recipe: " << (dir / "base.yaml") << "\noutput_dir: " << (dir / "o") << "\n";
  EXPECT_THROW(train::load_sweep(dir / "bad2.yaml"), UserError);
  // Two arms whose names give one run directory, and a grid axis called "variant" (not a recipe key), too.
  auto message = [&](const std::string& body) -> std::string {
    std::ofstream(dir / "bad3.yaml") << "recipe: " << (dir / "base.yaml") << "\noutput_dir: " << (dir / "o") << "\n" << body;
    try {
      train::load_sweep(dir / "bad3.yaml");
    } catch (const UserError& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(message("variants:\n  a b: {train.seed: 1}\n  a/b: {train.seed: 2}\n").find("share a run directory"),
            std::string::npos);
  EXPECT_NE(message("grid:\n  variant: [x]\n").find("'variant' is not a recipe key"), std::string::npos);
}

// Prepare steps: run once per value of the axes they name (here the seed), before the points, skipped once their
// `creates` path exists; `{KEY}` in an arm's overrides is the point's value. An unknown placeholder is refused
// before anything runs, and a failing step stops the sweep (exit 1) before any point.
TEST(Sweep, PrepareStepsRunBeforeThePointsThatStartFromThem) {
  test::TempDir dir("sweepprep");
  std::string data = test::make_prepared(dir, 60);
  const std::string bin = MOEFORGE_BINARY;
  std::ofstream(dir / "base.yaml") << small_pretrain("sweep", data, "micro_batch_size: 2, seq_len: 32, max_steps: 2, "
                                                      "log_interval: 1, eval_interval: 2, eval_batches: 1, checkpoint_interval: 2");
  std::ofstream(dir / "model.yaml") << "name: sweep\nvocab_size: 320\nhidden_size: 32\nintermediate_size: 48\nnum_layers: 2\n"
                                       "num_attention_heads: 4\nnum_key_value_heads: 2\nmax_position_embeddings: 64\n"
                                       "moe: {num_experts: 4, num_experts_per_tok: 2, aux_loss_coef: 0.01}\n";
  auto write = [&](const std::string& prepare) {
    std::ofstream(dir / "s.yaml") << "recipe: " << (dir / "base.yaml") << "\noutput_dir: " << (dir / "out")
                                  << "\nprepare:\n" << prepare
                                  << "variants:\n  scratch: {train.max_steps: 2}\n"
                                     "  from-init: {init_from: \"{output_dir}/init/seed={train.seed}\"}\n"
                                     "grid:\n  train.seed: [1, 2]\n";
  };
  write("  - {run: \"init " + (dir / "model.yaml") +
        " --seed 77{train.seed} --out {output_dir}/init/seed={train.seed}\", creates: \"{output_dir}/init/seed={train.seed}\"}\n");
  auto spec = train::load_sweep(dir / "s.yaml");
  auto steps = train::expand_prepare(spec);
  ASSERT_EQ(steps.size(), 2u);
  EXPECT_EQ(steps[0].args, (std::vector<std::string>{"init", (dir / "model.yaml"), "--seed", "771", "--out",
                                                     (dir / "out/init/seed=1")}));
  EXPECT_EQ(steps[1].creates, (dir / "out/init/seed=2"));
  EXPECT_EQ(steps[1].label, "prepare 1 (seed=2)");
  auto pts = train::expand_sweep(spec);
  ASSERT_EQ(pts.size(), 4u);
  EXPECT_EQ(pts[0].recipe.init_from, "");
  EXPECT_EQ(pts[3].name, "variant=from-init_seed=2");
  EXPECT_EQ(pts[3].recipe.init_from, (dir / "out/init/seed=2"));

  const std::string log = dir / "sweep.log";
  ASSERT_EQ(std::system((bin + " sweep " + (dir / "s.yaml") + " --jobs 2 > " + log + " 2>&1").c_str()), 0) << slurp(log);
  for (const auto& s : steps) EXPECT_TRUE(fs::exists(s.creates + "/config.yaml")) << s.creates;
  // The arm that starts from seed 2's prepared model (init --seed 772) starts from other weights than the arm
  // trained from seed 2's own draw (same data): their first losses differ.
  ASSERT_EQ(pts[1].name, "variant=scratch_seed=2");
  const double scratch2 = test::metric_records(pts[1].run_dir, "loss")[0]["loss"];
  const double from2 = test::metric_records(pts[3].run_dir, "loss")[0]["loss"];
  EXPECT_NE(scratch2, from2);
  // A second run skips the prepared steps and the finished points.
  const auto t = fs::last_write_time(steps[0].creates + "/config.yaml");
  ASSERT_EQ(std::system((bin + " sweep " + (dir / "s.yaml") + " > " + log + " 2>&1").c_str()), 0);
  EXPECT_EQ(fs::last_write_time(steps[0].creates + "/config.yaml"), t);
  EXPECT_NE(slurp(log).find("done, skipped"), std::string::npos) << slurp(log);
  EXPECT_EQ(slurp(log).find("started prepare"), std::string::npos) << slurp(log);

  // Refusals: an unknown placeholder (before anything runs), a step that is not a {run, creates} mapping, a sweep
  // as a step; a step that fails stops the sweep before its points.
  write("  - {run: \"init x --out {output_dir}/{train.lr}\", creates: \"{output_dir}/y\"}\n");
  try {
    train::expand_prepare(train::load_sweep(dir / "s.yaml"));
    ADD_FAILURE() << "unknown placeholder accepted";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("unknown placeholder {train.lr} (known: output_dir, variant, train.seed)"),
              std::string::npos) << e.what();
  }
  EXPECT_EQ(test::run_quiet(bin + " sweep " + (dir / "s.yaml")), 2);
  write("  - init x\n");
  EXPECT_THROW(train::load_sweep(dir / "s.yaml"), UserError);
  write("  - {run: \"sweep other.yaml\", creates: x}\n");
  EXPECT_THROW(train::load_sweep(dir / "s.yaml"), UserError);
  // (An SFT base, where both take effect: sft.aux_loss_coef outside stage sft is refused, see NoOpKeys.)
  std::ofstream(dir / "base_sft.yaml") << "stage: sft\n" << test::small_model_yaml("sweep")
                                       << "data: {train: /nonexistent.jsonl, val: /nonexistent.jsonl}\ntrain: {seq_len: 32}\n";
  std::ofstream(dir / "s2.yaml") << "recipe: " << (dir / "base_sft.yaml") << "\noutput_dir: " << (dir / "out2")
                                 << "\nprepare:\n  - {run: \"init /nonexistent.yaml --out {output_dir}/m\", creates: "
                                    "\"{output_dir}/m\"}\ngrid:\n  train.seed: [1]\n";
  EXPECT_EQ(std::system((bin + " sweep " + (dir / "s2.yaml") + " > " + log + " 2>&1").c_str()) >> 8, 1);
  EXPECT_NE(slurp(log).find("prepare 1 FAILED"), std::string::npos) << slurp(log);
  EXPECT_FALSE(fs::exists(dir / "out2/seed=1"));
}

// Threads: a point whose recipe names no thread count gets the sweep's share of the cores (cores / --jobs); one
// whose recipe (here through the sweep's variant) sets runtime.threads keeps it, a count the share would not give.
TEST(Sweep, PointsKeepTheirThreadCountOrShareTheCores) {
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (cores < 2) GTEST_SKIP() << "needs 2 cores: with one, the share and the run's own default are both 1";
  test::TempDir dir("sweepthreads");
  std::string data = test::make_prepared(dir, 40);
  const std::string bin = MOEFORGE_BINARY;
  std::ofstream(dir / "base.yaml") << small_pretrain("sweep", data, "micro_batch_size: 2, seq_len: 32, max_steps: 1, "
                                                      "log_interval: 1, eval_interval: 1, eval_batches: 1, checkpoint_interval: 1");
  const int share = cores / 2, own = cores + 1;  // --jobs 2
  std::ofstream(dir / "s.yaml") << "recipe: " << (dir / "base.yaml") << "\noutput_dir: " << (dir / "out")
                                << "\nvariants:\n  shared: {train.seed: 1}\n  own: {runtime.threads: " << own << "}\n";
  ASSERT_EQ(test::run_quiet(bin + " sweep " + (dir / "s.yaml") + " --jobs 2"), 0);
  const auto pts = train::expand_sweep(train::load_sweep(dir / "s.yaml"));
  ASSERT_EQ(pts.size(), 2u);
  EXPECT_NE(slurp(pts[0].run_dir + "/train.log").find(", " + std::to_string(share) + " threads,"), std::string::npos)
      << slurp(pts[0].run_dir + "/train.log");
  EXPECT_NE(slurp(pts[1].run_dir + "/train.log").find(", " + std::to_string(own) + " threads,"), std::string::npos)
      << slurp(pts[1].run_dir + "/train.log");
}

// train.skip_samples: a run started from another's step-2 checkpoint with its data skipped by those steps' samples
// computes, at its first step, the loss the other run computed at its step 3 (same weights, same batch); without
// the skip it reads the first batch again and differs.
TEST(Sweep, SkipSamplesContinuesAnotherRunsDataOrder) {
  test::TempDir dir("skipsamples");
  std::string data = test::make_prepared(dir, 60);
  const std::string bin = MOEFORGE_BINARY;
  std::ofstream(dir / "r.yaml") << small_pretrain("skip", data, "micro_batch_size: 2, seq_len: 32, max_steps: 4, "
                                                   "log_interval: 1, eval_interval: 4, eval_batches: 1, "
                                                   "checkpoint_interval: 2, keep_checkpoints: 2")
                                << "optim: {warmup_steps: 1}\n";
  ASSERT_EQ(test::run_quiet(bin + " train " + (dir / "r.yaml") + " --set output_dir=" + (dir / "a")), 0);
  const std::string from = "init_from=" + (dir / "a/checkpoints/step_00000002");
  ASSERT_EQ(test::run_quiet(bin + " train " + (dir / "r.yaml") + " --set " + from + " --set train.skip_samples=4" +
                            " --set train.max_steps=1 --set output_dir=" + (dir / "b")), 0);
  ASSERT_EQ(test::run_quiet(bin + " train " + (dir / "r.yaml") + " --set " + from + " --set train.max_steps=1" +
                            " --set output_dir=" + (dir / "c")), 0);
  const auto a = test::metric_records(dir / "a", "loss"), b = test::metric_records(dir / "b", "loss"),
             c = test::metric_records(dir / "c", "loss");
  ASSERT_EQ(a.size(), 4u);
  ASSERT_EQ(b.size(), 1u);
  ASSERT_EQ(c.size(), 1u);
  EXPECT_NEAR(b[0]["loss"].get<double>(), a[2]["loss"].get<double>(), 1e-6);
  EXPECT_GT(std::abs(c[0]["loss"].get<double>() - a[2]["loss"].get<double>()), 1e-3);
  // Starting from a checkpoint with parts the recipe's model has no place for is refused, not silently dropped.
  EXPECT_EQ(test::run_quiet(bin + " train " + (dir / "r.yaml") + " --set " + from + " --set model.moe.num_shared_experts=1" +
                            " --set output_dir=" + (dir / "d")),
            2);
  EXPECT_FALSE(fs::exists(dir / "d/checkpoints"));
}
