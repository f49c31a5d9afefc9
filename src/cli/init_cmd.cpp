// moeforge init CONFIG --out CHECKPOINT [--seed S] [--shards N] [--tokenizer FILE]: a freshly initialised model
// (the weights a pretraining run with that seed starts from) written as a checkpoint without ever holding the
// whole model: the experts are built, initialised and written one share at a time, in the expert-parallel
// checkpoint layout (model.safetensors with the dense part, experts-KK-of-NN.safetensors), which loads into
// any layout. At Mixtral size this is how a model too large for one process's memory is made.
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "cli/cli.h"
#include "core/error.h"
#include "io/model_config_yaml.h"
#include "model/decoder.h"
#include "model/param_names.h"
#include "model/param_count.h"
#include "checkpoint/share_writer.h"

namespace moeforge::cli {

namespace fs = std::filesystem;

int cmd_init(const Args& in) {
  Args args = in;
  std::string out, seed_s = "0", shards_s, tok;
  if (!take_option(args, "--out", &out)) throw UserError("init: --out CHECKPOINT is required");
  take_option(args, "--seed", &seed_s);
  take_option(args, "--shards", &shards_s);
  take_option(args, "--tokenizer", &tok);
  reject_unknown_flags(args, "init", {"--out", "--seed", "--shards", "--tokenizer"});
  if (args.size() != 1) throw UserError("init: expected one model CONFIG");
  if (fs::exists(out) && !(fs::is_directory(out) && fs::is_empty(out)))
    throw UserError(out + ": already exists; choose a new --out directory");
  if (!tok.empty() && !fs::is_regular_file(tok)) throw UserError(tok + ": no such tokenizer file");
  const ModelConfig cfg = io::load_model_config(args[0]);
  char* end = nullptr;
  const unsigned long long seed = std::strtoull(seed_s.c_str(), &end, 10);
  if (seed_s.empty() || *end) throw UserError("init: --seed must be a non-negative integer, got '" + seed_s + "'");
  int shards = train::default_expert_shares(cfg);
  if (!shards_s.empty()) {
    shards = std::atoi(shards_s.c_str());
    if (std::to_string(shards) != shards_s) throw UserError("init: --shards must be a positive integer, got '" + shards_s + "'");
  }
  if (fs::exists(out)) fs::remove(out);
  train::write_checkpoint_by_shares(
      cfg, out, shards, [&](MixtralForCausalLM& m, int k) {
        // Shares other than 0 write only their experts: their dense part is not drawn.
        if (k == 0) init_weights(*m, cfg.init_std, seed);
        else init_weights(*m, cfg.init_std, seed, [](const std::string& n) { return is_expert_param(n); });
      }, tok, "init: --shards");
  std::printf("initialised %s (seed %llu, %lld parameters, %d expert share%s) -> %s\n", args[0].c_str(), seed,
              static_cast<long long>(count_params(cfg).total), shards, shards > 1 ? "s" : "", out.c_str());
  return 0;
}

}  // namespace moeforge::cli
