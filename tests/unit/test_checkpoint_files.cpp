// The small pieces under checkpoints and run files: atomic writes, the layout.json of a sharded checkpoint
// (untrusted: duplicates, odd names and missing files are errors), the `hf:` init source, the epoch order.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <set>
#include <sstream>

#include "core/atomic_file.h"
#include "core/error.h"
#include "corpus.h"
#include "data/epoch_order.h"
#include "io/init_source.h"
#include "io/safetensors.h"
#include "model/decoder.h"
#include "test_util.h"
#include "checkpoint/base_model.h"
#include "checkpoint/checkpoint.h"
#include "optim/optimizer.h"

using namespace moeforge;
namespace fs = std::filesystem;

namespace {
std::string read_all(const std::string& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}
}  // namespace

TEST(AtomicFile, ReplacesWholeAndLeavesNoTemp) {
  test::TempDir dir("atomic");
  const std::string p = dir.path + "/a.json";
  write_file_atomic(p, "first\n");
  EXPECT_EQ(read_all(p), "first\n");
  write_file_atomic(p, std::string(100000, 'x'));
  EXPECT_EQ(read_all(p).size(), 100000u);
  EXPECT_FALSE(fs::exists(p + ".tmp"));
  // The temp file cannot be made (a directory stands in its way, even for root): a UserError naming the
  // file, and the old contents untouched.
  write_file_atomic(dir.path + "/b.json", "old");
  fs::create_directories(dir.path + "/b.json.tmp");
  const std::string msg = test::user_error_of([&] { write_file_atomic(dir.path + "/b.json", "new"); });
  EXPECT_NE(msg.find(dir.path + "/b.json"), std::string::npos) << msg;
  EXPECT_EQ(read_all(dir.path + "/b.json"), "old");
}

TEST(AtomicFile, FailureNamesTheFile) {
  const std::string msg = test::user_error_of([] { write_file_atomic("/nonexistent_dir_moeforge/x.json", "y"); });
  EXPECT_NE(msg.find("/nonexistent_dir_moeforge/x.json"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos);
}

// A directory written whole or not at all: into an absent path or an empty directory (a trailing slash dropped),
// never over a non-empty one; a fill that throws leaves neither the output nor its temp directory behind.
TEST(AtomicFile, DirectoryWholeOrAbsent) {
  test::TempDir dir("atomicdir");
  auto fill_ab = [](const std::string& tmp) {
    write_file(tmp + "/a", "1");
    write_file(tmp + "/b", "2");
  };
  EXPECT_EQ(without_trailing_slashes("a/b//"), "a/b");
  EXPECT_EQ(without_trailing_slashes("///"), "/");
  EXPECT_EQ(without_trailing_slashes("a"), "a");
  EXPECT_EQ(write_dir_atomic(dir.path + "/out//", fill_ab), dir.path + "/out");
  EXPECT_EQ(read_all(dir.path + "/out/a") + read_all(dir.path + "/out/b"), "12");
  fs::create_directories(dir.path + "/empty");
  write_dir_atomic(dir.path + "/empty", fill_ab);
  EXPECT_EQ(read_all(dir.path + "/empty/b"), "2");
  // Over a non-empty directory: refused before fill runs, the contents untouched.
  bool ran = false;
  const std::string msg = test::user_error_of([&] { write_dir_atomic(dir.path + "/out", [&](const std::string&) { ran = true; }); });
  EXPECT_NE(msg.find(dir.path + "/out: already exists"), std::string::npos) << msg;
  EXPECT_FALSE(ran);
  EXPECT_EQ(read_all(dir.path + "/out/a"), "1");
  // A failing fill: its error passes on, nothing is left.
  const std::string fail = test::user_error_of([&] {
    write_dir_atomic(dir.path + "/failed", [](const std::string& tmp) {
      write_file(tmp + "/a", "1");
      throw UserError("fill failed");
    });
  });
  EXPECT_EQ(fail, "fill failed");
  EXPECT_FALSE(fs::exists(dir.path + "/failed"));
  for (const auto& e : fs::directory_iterator(dir.path))
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
}

// An adapter checkpoint's recipe.yaml says whether its run moved the routers' biases; one from before the key
// existed (no finetune.lora.update_expert_bias) ran with them frozen. Missing, empty or a value that is not a
// boolean: an error naming the file.
TEST(AdapterCheckpoint, RecipeSaysWhetherTheBiasesMoved) {
  test::TempDir dir("biasflag");
  auto with = [&](const std::string& name, const std::string& text) {
    fs::create_directories(dir.path + "/" + name);
    write_file(dir.path + "/" + name + "/recipe.yaml", text);
    return dir.path + "/" + name;
  };
  EXPECT_TRUE(train::checkpoint_updates_expert_bias(with("t", "finetune:\n  method: lora\n  lora:\n    update_expert_bias: true\n")));
  EXPECT_FALSE(train::checkpoint_updates_expert_bias(with("f", "finetune:\n  lora: {rank: 4, update_expert_bias: false}\n")));
  EXPECT_FALSE(train::checkpoint_updates_expert_bias(with("old", "finetune:\n  method: lora\n  lora: {rank: 4, alpha: 8}\n")));
  EXPECT_FALSE(train::checkpoint_updates_expert_bias(with("bare", "stage: sft\n")));
  const std::string bad = test::user_error_of([&] {
    train::checkpoint_updates_expert_bias(with("bad", "finetune:\n  lora: {update_expert_bias: maybe}\n"));
  });
  EXPECT_NE(bad.find(dir.path + "/bad/recipe.yaml: finetune.lora.update_expert_bias"), std::string::npos) << bad;
  const std::string null = test::user_error_of([&] {
    train::checkpoint_updates_expert_bias(with("null", "finetune:\n  lora:\n    update_expert_bias: ~\n"));
  });
  EXPECT_NE(null.find(dir.path + "/null/recipe.yaml: finetune.lora.update_expert_bias"), std::string::npos) << null;
  const std::string empty = test::user_error_of([&] { train::checkpoint_updates_expert_bias(with("empty", "")); });
  EXPECT_NE(empty.find(dir.path + "/empty/recipe.yaml: empty"), std::string::npos) << empty;
  fs::create_directories(dir.path + "/none");
  const std::string none = test::user_error_of([&] { train::checkpoint_updates_expert_bias(dir.path + "/none"); });
  EXPECT_NE(none.find(dir.path + "/none/recipe.yaml: missing"), std::string::npos) << none;
}

TEST(InitSource, HfPrefixParsedOnce) {
  auto a = io::parse_init_source("hf:/models/mixtral");
  EXPECT_TRUE(a.hf);
  EXPECT_EQ(a.dir, "/models/mixtral");
  auto b = io::parse_init_source("runs/x/checkpoints/step_00000010");
  EXPECT_FALSE(b.hf);
  EXPECT_EQ(b.dir, "runs/x/checkpoints/step_00000010");
  EXPECT_FALSE(io::parse_init_source("hfx:/a").hf);
}

TEST(EpochOrder, SeededPermutationPerEpoch) {
  const auto a = data::epoch_order(50, 7, 0), again = data::epoch_order(50, 7, 0), next = data::epoch_order(50, 7, 1);
  EXPECT_EQ(a, again);
  EXPECT_NE(a, next);
  EXPECT_EQ(std::set<size_t>(a.begin(), a.end()).size(), 50u);
  EXPECT_EQ(*std::max_element(a.begin(), a.end()), 49u);
  // The recipe: mt19937_64(seed * 1000003 + epoch), Fisher-Yates from the back (by hand for n = 3).
  std::mt19937_64 rng(7ULL * 1000003ULL + 2);
  std::vector<size_t> want{0, 1, 2};
  std::swap(want[2], want[rng() % 3]);
  std::swap(want[1], want[rng() % 2]);
  EXPECT_EQ(data::epoch_order(3, 7, 2), want);
}

// A layout.json that names a tensor twice, a path outside the checkpoint, or a missing file is refused.
TEST(CheckpointLayout, DuplicatesAndBadNamesAreErrors) {
  test::TempDir dir("ckpt_layout");
  ModelConfig c = test::tiny_config();
  MixtralForCausalLM m(c);
  init_weights(*m, c.init_std, 1);
  train::CheckpointContents cc;
  cc.config = &c;
  cc.model = m;
  const std::string ck = dir.path + "/ck";
  train::write_checkpoint_dir(ck, cc);
  MixtralForCausalLM into(c);
  EXPECT_NO_THROW(train::load_model_weights(ck, into));
  const std::string expert = "model.layers.0.block_sparse_moe.experts.0.w1.weight";
  io::write_safetensors(ck + "/experts-00-of-02.safetensors", {{expert, m->named_parameters()[expert].detach()}});
  auto layout = [&](const std::string& json) { std::ofstream(ck + "/layout.json") << json; };
  layout(R"({"weights": ["model.safetensors", "experts-00-of-02.safetensors"]})");
  std::string msg = test::user_error_of([&] { train::load_model_weights(ck, into); });
  EXPECT_NE(msg.find("tensor '" + expert + "' is also in"), std::string::npos) << msg;
  layout(R"({"weights": ["model.safetensors", "../ck/model.safetensors"]})");
  msg = test::user_error_of([&] { train::load_model_weights(ck, into); });
  EXPECT_NE(msg.find("is not a plain file name"), std::string::npos) << msg;
  layout(R"({"weights": ["model.safetensors", "experts-01-of-02.safetensors"]})");
  msg = test::user_error_of([&] { train::load_model_weights(ck, into); });
  EXPECT_NE(msg.find("names 'experts-01-of-02.safetensors', which is missing"), std::string::npos) << msg;
  layout(R"({"weights": ["model.safetensors"], "experts": )");  // torn
  EXPECT_NE(test::user_error_of([&] { train::load_model_weights(ck, into); }).find("layout.json: invalid layout"), std::string::npos);
  // Optimizer state in two files of the layout.
  layout(R"({"weights": ["model.safetensors"], "optimizer": ["optimizer.safetensors", "optimizer-part-01-of-02.safetensors"]})");
  io::write_safetensors(ck + "/optimizer.safetensors", {{"exp_avg.x", torch::zeros({2})}});
  io::write_safetensors(ck + "/optimizer-part-01-of-02.safetensors", {{"exp_avg.x", torch::zeros({2})}});
  std::ofstream(ck + "/trainer_state.json")
      << R"({"step": 1, "samples_seen": 2, "tokens_seen": 3, "seq_len": 8, "elapsed_s": 0, "seed": 1})";
  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (auto& p : into->named_parameters()) named.emplace_back(p.key(), p.value());
  train::AdamW opt(named, train::AdamWOptions{});
  train::TrainerState st;
  msg = test::user_error_of([&] { train::load_training_state(ck, opt, st, into); });
  EXPECT_NE(msg.find("optimizer state 'exp_avg.x' is in two files of the layout"), std::string::npos) << msg;
  // The trainer state itself, read once for every command.
  auto state = train::checkpoint_trainer_state(ck);
  ASSERT_TRUE(state.has_value());
  EXPECT_EQ(state->seq_len, 8);
  std::ofstream(ck + "/trainer_state.json") << R"({"step": "x"})";
  EXPECT_NE(test::user_error_of([&] { train::checkpoint_trainer_state(ck); }).find("invalid trainer state"), std::string::npos);
  fs::remove(ck + "/trainer_state.json");
  EXPECT_FALSE(train::checkpoint_trainer_state(ck).has_value());
}
