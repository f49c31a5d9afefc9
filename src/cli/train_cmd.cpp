// moeforge train RECIPE.yaml [--set key=value ...] [--resume]
#include <cstdio>

#include "cli/cli.h"
#include "core/error.h"
#include "recipe/recipe.h"
#include "train/trainer.h"

namespace moeforge::cli {

int cmd_train(const Args& in) {
  Args args = in;
  auto overrides = take_repeated(args, "--set");
  const bool resume = take_flag(args, "--resume");
  reject_unknown_flags(args, "train", {"--set", "--resume"});
  if (args.size() != 1) throw UserError("train: expected one RECIPE file (usage: moeforge train RECIPE.yaml [--set k=v] [--resume])");
  train::Recipe r = train::load_recipe(args[0], overrides);
  train::refuse_no_op_keys(r, overrides);
  train::TrainResult res = train::run_training(r, resume);
  std::printf("run %s: %ld steps, final val loss %.4f, %.0f tokens/s, MFU %.2f%%\n", res.run_dir.c_str(),
              (long)res.steps, res.final_val_loss, res.tokens_per_second, 100 * res.mfu);
  return 0;
}

}  // namespace moeforge::cli
