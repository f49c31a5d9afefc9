// End to end: the moeforge binary and run_training on a small prepared corpus.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "corpus.h"
#include "test_util.h"
#include "checkpoint/checkpoint.h"
#include "recipe/recipe.h"
#include "train/trainer.h"

using namespace moeforge;
namespace fs = std::filesystem;

namespace {

const char* kModel = R"(
model:
  name: e2e
  vocab_size: 320
  hidden_size: 32
  intermediate_size: 48
  num_layers: 2
  num_attention_heads: 4
  num_key_value_heads: 2
  max_position_embeddings: 64
  rope_theta: 10000.0
  moe:
    num_experts: 4
    num_experts_per_tok: 2
    aux_loss_coef: 0.01
    z_loss_coef: 0.001
    router_jitter: 0.1
)";

std::string write_recipe(const test::TempDir& dir, const std::string& data_dir, const std::string& out,
                         int steps, int ckpt_every, const std::string& extra = "") {
  std::string path = dir / ("recipe_" + fs::path(out).filename().string() + ".yaml");
  std::ofstream(path) << kModel << "data:\n  dir: " << data_dir << "\ntrain:\n  micro_batch_size: 4\n  seq_len: 32\n"
                      << "  grad_accum: 2\n  max_steps: " << steps << "\n  log_interval: 1\n  eval_interval: " << steps
                      << "\n  eval_batches: 4\n  checkpoint_interval: " << ckpt_every
                      << "\n  keep_checkpoints: 3\n  seed: 11\noptim:\n  lr: 1.0e-2\n  min_lr: 1.0e-3\n  warmup_steps: 3\n"
                      << "runtime:\n  threads: 1\noutput_dir: " << out << "\n" << extra;
  return path;
}

struct CliRun {
  int status;
  std::string err;
};

CliRun run_cli(const std::string& args, const std::string& env = "") {
  std::string err_file = fs::temp_directory_path() / ("moeforge_e2e_err_" + std::to_string(::getpid()));
  std::string cmd = env + " " + std::string(MOEFORGE_BINARY) + " " + args + " >/dev/null 2>" + err_file;
  int rc = std::system(cmd.c_str());
  std::ifstream in(err_file);
  std::string err((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  fs::remove(err_file);
  int status = WIFEXITED(rc) ? WEXITSTATUS(rc) : (WIFSIGNALED(rc) ? 128 + WTERMSIG(rc) : -1);
  // The shell reports a child killed by a signal as 128 + signal.
  return {status, err};
}

std::vector<std::string> losses(const std::string& run_dir) {
  std::vector<std::string> out;
  std::ifstream in(run_dir + "/metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) out.push_back(std::to_string(j["step"].get<int>()) + ":" + j["loss"].dump());
  }
  return out;
}

void expect_user_error(const CliRun& r, const std::string& needle) {
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find(needle), std::string::npos) << "'" << needle << "' not in: " << r.err;
}

}  // namespace

TEST(Pretrain, LossFallsBelowUnigramEntropy) {
  test::TempDir dir("lossfalls");
  std::string data = test::make_prepared(dir, 150);
  auto recipe = write_recipe(dir, data, dir / "run", 60, 60);
  auto r = train::load_recipe(recipe, {});
  auto res = train::run_training(r, false);
  auto l = losses(dir / "run");
  ASSERT_EQ(l.size(), 60u);
  auto first = std::stod(l.front().substr(l.front().find(':') + 1));
  auto last = std::stod(l.back().substr(l.back().find(':') + 1));
  EXPECT_LT(last, first - 2.0) << "first " << first << " last " << last;
  std::ifstream in(dir / "run/summary.json");
  auto s = nlohmann::json::parse(in);
  for (auto k : {"final_val_loss", "unigram_entropy", "tokens_per_second", "mfu"}) EXPECT_TRUE(s.contains(k)) << k;
  EXPECT_LT(s["final_val_loss"].get<double>(), s["unigram_entropy"].get<double>() - 0.5);
  EXPECT_NEAR(s["final_val_loss"].get<double>(), res.final_val_loss, 1e-12);
  EXPECT_GT(s["mfu"].get<double>(), 0.0);
  EXPECT_TRUE(fs::exists(dir / "run/config.yaml"));
  bool has_events = false;
  for (auto& e : fs::directory_iterator(dir / "run/tensorboard"))
    has_events |= e.path().filename().string().find("tfevents") != std::string::npos;
  EXPECT_TRUE(has_events);
  // The checkpoint is self-contained and `eval --json` reproduces the trainer's validation loss.
  auto ck = train::latest_checkpoint(dir / "run");
  ASSERT_TRUE(ck.has_value());
  for (auto f : {"config.yaml", "tokenizer.model", "model.safetensors", "optimizer.safetensors", "trainer_state.json"})
    EXPECT_TRUE(fs::exists(*ck + "/" + f)) << f;
  std::string out = dir / "eval.json";
  int rc = std::system((std::string(MOEFORGE_BINARY) + " eval " + *ck + " --data " + data +
                        " --batch-size 4 --batches 4 --json > " + out).c_str());
  ASSERT_EQ(rc, 0);
  std::ifstream ein(out);
  auto ej = nlohmann::json::parse(ein);
  EXPECT_NEAR(ej["loss"].get<double>(), s["final_val_loss"].get<double>(), 1e-5);
  EXPECT_NEAR(ej["perplexity"].get<double>(), std::exp(ej["loss"].get<double>()), 1e-6 * ej["perplexity"].get<double>());
  // --text: tokens counted with <s> first, windows of the training length.
  std::ofstream(dir / "t.txt") << "The cat sees the moon. A dog likes the winter sky.";
  rc = std::system((std::string(MOEFORGE_BINARY) + " eval " + *ck + " --text " + (dir / "t.txt") + " --json > " + out).c_str());
  ASSERT_EQ(rc, 0);
  std::ifstream tin(out);
  auto tj = nlohmann::json::parse(tin);
  EXPECT_GT(tj["tokens"].get<int64_t>(), 5);
  EXPECT_LT(tj["loss"].get<double>(), std::log(320.0));
}

TEST(Pretrain, InterruptedAndResumedRunReproducesLossesBitwise) {
  test::TempDir dir("resume");
  std::string data = test::make_prepared(dir, 100);
  auto straight = write_recipe(dir, data, dir / "straight", 12, 6);
  auto broken = write_recipe(dir, data, dir / "broken", 12, 6);
  ASSERT_EQ(run_cli("train " + straight).status, 0);
  // Killed right after its step-6 checkpoint, then resumed.
  CliRun killed = run_cli("train " + broken, "MOEFORGE_TEST_KILL_AFTER_CHECKPOINT=6");
  EXPECT_EQ(killed.status, 128 + SIGKILL) << killed.err;
  EXPECT_EQ(losses(dir / "broken").size(), 6u);
  ASSERT_EQ(run_cli("train " + broken + " --resume").status, 0);
  auto a = losses(dir / "straight"), b = losses(dir / "broken");
  ASSERT_EQ(a.size(), 12u);
  EXPECT_EQ(a, b);  // the same doubles, printed at round-trip precision
}

TEST(Pretrain, KillWhileWritingCheckpointKeepsThePreviousOne) {
  test::TempDir dir("kill");
  std::string data = test::make_prepared(dir, 100);
  auto recipe = write_recipe(dir, data, dir / "run", 12, 4, "resume: auto\n");
  CliRun killed = run_cli("train " + recipe, "MOEFORGE_TEST_KILL_IN_CHECKPOINT=8");
  EXPECT_EQ(killed.status, 128 + SIGKILL);
  auto latest = train::latest_checkpoint(dir / "run");
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(fs::path(*latest).filename().string(), "step_00000004");
  // The half-written one is only a temp directory.
  bool tmp_left = false;
  for (auto& e : fs::directory_iterator(dir / "run/checkpoints"))
    tmp_left |= e.path().filename().string().rfind(".tmp-", 0) == 0;
  EXPECT_TRUE(tmp_left);
  // The previous checkpoint loads, and resume: auto picks it up and finishes the run.
  ModelConfig cfg = train::read_checkpoint_config(*latest);
  MixtralForCausalLM m(cfg);
  EXPECT_NO_THROW(train::load_model_weights(*latest, m));
  ASSERT_EQ(run_cli("train " + recipe).status, 0);
  EXPECT_EQ(fs::path(*train::latest_checkpoint(dir / "run")).filename().string(), "step_00000012");
  EXPECT_EQ(losses(dir / "run").size(), 12u);
}

TEST(Pretrain, BadInputIsOneLineAndExit2) {
  test::TempDir dir("bad");
  std::string data = test::make_prepared(dir, 60);
  // Missing tokenizer, empty corpus.
  expect_user_error(run_cli("prepare --tokenizer " + (dir / "none.model") + " --input " + (dir / "corpus.jsonl") +
                            " --out " + (dir / "p")),
                    "none.model");
  std::ofstream(dir / "empty.txt") << "";
  expect_user_error(run_cli("prepare --tokenizer " + (dir / "tok/tokenizer.model") + " --input " + (dir / "empty.txt") +
                            " --out " + (dir / "p")),
                    "empty corpus");
  EXPECT_FALSE(fs::exists(dir / "p"));
  // Recipe typo, sequence length above max_position_embeddings.
  auto recipe = write_recipe(dir, data, dir / "run", 2, 2, "trian:\n  seq_len: 8\n");
  expect_user_error(run_cli("train " + recipe), "did you mean 'train'");
  auto good = write_recipe(dir, data, dir / "run", 2, 2);
  expect_user_error(run_cli("train " + good + " --set train.seq_len=65"), "max_position_embeddings");
  // A corrupt (truncated) shard.
  fs::copy(data, dir / "corrupt", fs::copy_options::recursive);
  fs::resize_file(dir / "corrupt/train-00000.bin", fs::file_size(dir / "corrupt/train-00000.bin") - 3);
  expect_user_error(run_cli("train " + good + " --set data.dir=" + (dir / "corrupt")), "train-00000.bin");
  // An existing run directory without resume: refused, nothing touched.
  ASSERT_EQ(run_cli("train " + good).status, 0);
  auto before = losses(dir / "run");
  auto mtime = fs::last_write_time(dir / "run/metrics.jsonl");
  expect_user_error(run_cli("train " + good), "already exists");
  EXPECT_EQ(losses(dir / "run"), before);
  EXPECT_EQ(fs::last_write_time(dir / "run/metrics.jsonl"), mtime);
  // Eval on something that is not a checkpoint.
  expect_user_error(run_cli("eval " + (dir / "nothing") + " --data " + data), "nothing");
}

TEST(ExportImport, CliRoundTripAndFineTuneFromHf) {
  test::TempDir dir("cliexport");
  std::string data = test::make_prepared(dir, 80);
  auto recipe = write_recipe(dir, data, dir / "run", 4, 4);
  ASSERT_EQ(run_cli("train " + recipe).status, 0);
  auto ck = *train::latest_checkpoint(dir / "run");
  ASSERT_EQ(run_cli("export " + ck + " --format hf --dtype fp32 --out " + (dir / "hf")).status, 0);
  ASSERT_EQ(run_cli("export " + ck + " --format gguf --dtype f32 --out " + (dir / "m.gguf")).status, 0);
  ASSERT_EQ(run_cli("import " + (dir / "hf") + " --out " + (dir / "imported")).status, 0);
  // The imported checkpoint evaluates exactly like the original.
  auto eval_json = [&](const std::string& c) {
    std::string out = dir / "e.json";
    EXPECT_EQ(std::system((std::string(MOEFORGE_BINARY) + " eval " + c + " --data " + data + " --seq-len 32 --json > " + out).c_str()), 0);
    std::ifstream in(out);
    return nlohmann::json::parse(in)["loss"].get<double>();
  };
  EXPECT_EQ(eval_json(ck), eval_json(dir / "imported"));
  // Exporting onto an existing path is refused; a recipe can start from the HF directory.
  expect_user_error(run_cli("export " + ck + " --format hf --out " + (dir / "hf")), "already exists");
  expect_user_error(run_cli("export " + ck + " --format onnx --out " + (dir / "x")), "hf, gguf, peft or gguf-lora");
  std::string ft = dir / "ft.yaml";
  std::ofstream(ft) << "init_from: hf:" << (dir / "hf") << "\ndata:\n  dir: " << data
                    << "\ntrain:\n  micro_batch_size: 4\n  seq_len: 32\n  max_steps: 2\n  eval_batches: 2\n"
                    << "runtime:\n  threads: 1\noutput_dir: " << (dir / "ft") << "\n";
  ASSERT_EQ(run_cli("train " + ft).status, 0);
  EXPECT_TRUE(train::latest_checkpoint(dir / "ft").has_value());
}

// Aux-loss-free selection biases have no place in any exported format: a checkpoint that routes with them is
// refused by hf and gguf (one line, exit 2, nothing written) unless --drop-expert-bias says to leave them out;
// the model exported so holds exactly the checkpoint's parameters and no biases. Biases the router does not read
// (balance other than aux_free_bias) are no reason to refuse.
TEST(ExportImport, ExpertBiasesAreRefusedUnlessDropped) {
  test::TempDir dir("expertbias");
  std::string data = test::make_prepared(dir, 80);
  auto recipe = write_recipe(dir, data, dir / "run", 4, 4);
  // (aux_loss_coef back to its default: kModel's 0.01 would have no effect under aux_free_bias, refused: issue 31)
  ASSERT_EQ(run_cli("train " + recipe + " --set model.moe.balance=aux_free_bias --set model.moe.bias_update_rate=0.01"
                    " --set model.moe.aux_loss_coef=0.02")
                .status, 0);
  auto ck = *train::latest_checkpoint(dir / "run");
  auto trained = train::load_checkpoint_model(ck);
  double extent = 0;
  for (auto& b : trained->named_buffers())
    if (b.key().find("expert_bias") != std::string::npos) extent = std::max(extent, b.value().abs().max().item<double>());
  ASSERT_GT(extent, 0.0) << "the run did not move its biases: nothing to refuse";

  for (std::string format : {"hf", "gguf"}) {
    const std::string out = dir / ("refused-" + format);
    expect_user_error(run_cli("export " + ck + " --format " + format + " --out " + out), "--drop-expert-bias");
    EXPECT_FALSE(fs::exists(out)) << format;
  }
  auto r = run_cli("export " + ck + " --format hf --dtype fp32 --drop-expert-bias --out " + (dir / "hf"));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("left out"), std::string::npos) << r.err;
  ASSERT_EQ(run_cli("export " + ck + " --format gguf --dtype f32 --drop-expert-bias --out " + (dir / "m.gguf")).status, 0);
  ASSERT_EQ(run_cli("import " + (dir / "hf") + " --out " + (dir / "imported")).status, 0);
  auto imported = train::load_checkpoint_model(dir / "imported");
  auto params = imported->named_parameters();
  for (auto& p : trained->named_parameters()) EXPECT_TRUE(torch::equal(p.value(), params[p.key()])) << p.key();
  for (auto& b : imported->named_buffers())
    if (b.key().find("expert_bias") != std::string::npos) EXPECT_EQ(b.value().abs().max().item<double>(), 0.0) << b.key();

  // A run continued from it with the loss instead keeps biases its router no longer reads: exported without the flag.
  ASSERT_EQ(run_cli("train " + recipe + " --set model.moe.balance=aux_loss --set init_from=" + ck + " --set output_dir=" +
                    (dir / "cont")).status, 0);
  auto cont = *train::latest_checkpoint(dir / "cont");
  double kept = 0;
  for (auto& b : train::load_checkpoint_model(cont)->named_buffers())
    if (b.key().find("expert_bias") != std::string::npos) kept = std::max(kept, b.value().abs().max().item<double>());
  ASSERT_GT(kept, 0.0) << "the continued run dropped the biases: nothing to check";
  EXPECT_EQ(run_cli("export " + cont + " --format hf --out " + (dir / "cont-hf")).status, 0);
}

namespace {
// The train records of a run without the fields that measure time.
std::vector<nlohmann::json> train_records(const std::string& run_dir) {
  std::vector<nlohmann::json> out;
  std::ifstream in(run_dir + "/metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (!j.contains("loss")) continue;
    for (auto k : {"tokens_per_second", "mfu", "eta_s", "wall_time"}) j.erase(k);
    out.push_back(j);
  }
  return out;
}
}  // namespace

// bf16 mixed precision on the CPU, against the fp32 run of the same recipe. Tolerance: at every step the loss
// is within one bf16 epsilon (2^-7) of the fp32 loss, relative: the losses agree to bf16's own resolution
// (the per-token errors of bf16 logits, up to u = 2^-8 relative each, average over the batch, and 12 steps
// do not let the trajectories drift apart further). A bf16 run interrupted and resumed reproduces its losses
// bit for bit, and its checkpoint exported to HF (fp32 tensors) and imported back evaluates exactly as it does.
TEST(Bf16, TracksFp32ResumesBitwiseAndExportsItsOwnModel) {
  test::TempDir dir("bf16");
  std::string data = test::make_prepared(dir, 100);
  const std::string bf16 = " --set runtime.precision=bf16";
  ASSERT_EQ(run_cli("train " + write_recipe(dir, data, dir / "fp32", 12, 6)).status, 0);
  auto straight = write_recipe(dir, data, dir / "straight", 12, 6);
  auto broken = write_recipe(dir, data, dir / "broken", 12, 6);
  ASSERT_EQ(run_cli("train " + straight + bf16).status, 0);
  CliRun killed = run_cli("train " + broken + bf16, "MOEFORGE_TEST_KILL_AFTER_CHECKPOINT=6");
  EXPECT_EQ(killed.status, 128 + SIGKILL) << killed.err;
  ASSERT_EQ(run_cli("train " + broken + bf16 + " --resume").status, 0);
  auto a = losses(dir / "straight"), b = losses(dir / "broken");
  ASSERT_EQ(a.size(), 12u);
  EXPECT_EQ(a, b);

  auto f = train_records(dir / "fp32"), h = train_records(dir / "straight");
  ASSERT_EQ(f.size(), h.size());
  int differ = 0;
  for (size_t i = 0; i < f.size(); ++i) {
    const double lf = f[i]["loss"].get<double>(), lh = h[i]["loss"].get<double>();
    EXPECT_LE(std::abs(lh - lf), lf / 128) << "step " << i + 1 << ": fp32 " << lf << ", bf16 " << lh;
    differ += lh != lf;
  }
  EXPECT_GT(differ, 0) << "the bf16 run computed exactly as the fp32 one: no bf16 arithmetic";
  std::ifstream sin(dir / "straight/summary.json");
  auto s = nlohmann::json::parse(sin);
  EXPECT_EQ(s["precision"], "bf16");
  EXPECT_GT(s["peak_rss_bytes"].get<int64_t>(), 0);

  auto ck = *train::latest_checkpoint(dir / "straight");
  ASSERT_EQ(run_cli("export " + ck + " --format hf --dtype fp32 --out " + (dir / "hf")).status, 0);
  ASSERT_EQ(run_cli("import " + (dir / "hf") + " --out " + (dir / "imported")).status, 0);
  auto eval_json = [&](const std::string& c, const std::string& extra) {
    std::string out = dir / "e.json";
    EXPECT_EQ(std::system((std::string(MOEFORGE_BINARY) + " eval " + c + " --data " + data + " --seq-len 32 --json" +
                           extra + " > " + out).c_str()),
              0);
    std::ifstream in(out);
    return nlohmann::json::parse(in)["loss"].get<double>();
  };
  const double own = eval_json(ck, "");  // in the precision it was trained in
  EXPECT_EQ(own, eval_json(dir / "imported", " --precision bf16"));
  EXPECT_EQ(own, eval_json(ck, " --precision bf16"));
  EXPECT_NE(own, eval_json(ck, " --precision fp32"));
}

// runtime.precision: auto probes at start-up and runs in the precision whose probe step was faster; the choice
// is in summary.json (with both probe times) and in the recipe the checkpoints carry, and the run trains bit for
// bit as one that named that precision (the probe draws from none of the run's generators and leaves the model
// untouched). A resumed run keeps its checkpoint's precision without probing.
TEST(AutoPrecision, ProbesPicksTheFasterAndTrainsAsTheNamedPrecisionDoes) {
  test::TempDir dir("autoprec");
  std::string data = test::make_prepared(dir, 100);
  const std::string autop = " --set runtime.precision=auto";
  ASSERT_EQ(run_cli("train " + write_recipe(dir, data, dir / "auto", 6, 3) + autop).status, 0);
  std::ifstream sin(dir / "auto/summary.json");
  const auto s = nlohmann::json::parse(sin);
  const auto& c = s["precision_choice"];
  ASSERT_EQ(c["rule"], "probe") << s.dump();
  const double f = c["fp32_step_s"].get<double>(), b = c["bf16_step_s"].get<double>();
  EXPECT_GT(f, 0);
  EXPECT_GT(b, 0);
  const std::string chosen = b < f ? "bf16" : "fp32";
  EXPECT_EQ(c["chosen"], chosen);
  EXPECT_EQ(s["precision"], chosen);
  EXPECT_EQ(c["probe_layers"], 1);  // half of this 2-layer model
  // The allocator the run reports is the one the binary links (CMakeLists.txt): a linked tcmalloc serves.
  {
    std::string libs;
    if (FILE* f = ::popen(("ldd " + std::string(MOEFORGE_BINARY) + " 2>/dev/null").c_str(), "r")) {
      char buf[512];
      while (std::fgets(buf, sizeof buf, f)) libs += buf;
      ::pclose(f);
    }
    ASSERT_NE(libs.find("libc.so"), std::string::npos) << "ldd gave: " << libs;
    EXPECT_EQ(s["allocator"], libs.find("libtcmalloc") != std::string::npos ? "tcmalloc" : "glibc") << libs;
  }
  EXPECT_EQ(train::checkpoint_precision(*train::latest_checkpoint(dir / "auto")), chosen);

  auto named = [&](const std::string& p) {
    const std::string out = dir / ("named_" + p);
    if (!fs::exists(out))
      EXPECT_EQ(run_cli("train " + write_recipe(dir, data, out, 6, 3) + " --set runtime.precision=" + p).status, 0);
    return losses(out);
  };
  EXPECT_EQ(losses(dir / "auto"), named(chosen));

  auto broken = write_recipe(dir, data, dir / "broken", 6, 3);
  CliRun killed = run_cli("train " + broken + autop, "MOEFORGE_TEST_KILL_AFTER_CHECKPOINT=3");
  EXPECT_EQ(killed.status, 128 + SIGKILL) << killed.err;
  const std::string first = train::checkpoint_precision(*train::latest_checkpoint(dir / "broken"));
  CliRun resumed = run_cli("train " + broken + autop + " --resume");
  ASSERT_EQ(resumed.status, 0) << resumed.err;
  EXPECT_NE(resumed.err.find("runtime.precision auto: " + first + ", the precision of the run being resumed"),
            std::string::npos) << resumed.err;
  std::ifstream rin(dir / "broken/summary.json");
  const auto rs = nlohmann::json::parse(rin);
  EXPECT_EQ(rs["precision_choice"]["rule"], "resumed");
  EXPECT_EQ(rs["precision"], first);
  EXPECT_EQ(losses(dir / "broken"), named(first));
}

// Activation recomputation of whole layers or of the MoE blocks trains as keeping the activations does
// (router jitter on, two accumulated micro-batches), with the expert loads counted once. Recomputing whole
// layers repeats every operation in the same order: the records are identical. Recomputing the MoE block only
// splits the gradient of its input into two sums (inside the recomputed block, then with the residual), a
// different order of fp32 additions: the records agree to 1e-6 relative (fp32 has 2^-24 = 6e-8) and the loads,
// which count whole tokens, exactly.
TEST(Recompute, FullAndMoeTrainLikeNone) {
  test::TempDir dir("recompute");
  std::string data = test::make_prepared(dir, 80);
  for (auto mode : {"none", "full", "moe"})
    ASSERT_EQ(run_cli("train " + write_recipe(dir, data, dir / mode, 4, 4) + " --set train.activation_checkpointing=" +
                      mode).status,
              0);
  auto none = train_records(dir / "none");
  ASSERT_EQ(none.size(), 4u);
  EXPECT_EQ(train_records(dir / "full"), none);
  auto moe = train_records(dir / "moe");
  ASSERT_EQ(moe.size(), none.size());
  for (size_t i = 0; i < none.size(); ++i) {
    EXPECT_EQ(moe[i]["expert_load"], none[i]["expert_load"]) << "step " << i + 1;
    for (auto k : {"loss", "aux_loss", "z_loss", "total_loss", "grad_norm"}) {
      const double a = moe[i][k].get<double>(), b = none[i][k].get<double>();
      EXPECT_LE(std::abs(a - b), 1e-6 * std::abs(b)) << k << " at step " << i + 1;
    }
  }
  expect_user_error(run_cli("train " + write_recipe(dir, data, dir / "bad", 4, 4) +
                            " --set train.activation_checkpointing=layers"),
                    "train.activation_checkpointing");
}
