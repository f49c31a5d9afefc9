// moeforge import HF_DIR --out CHECKPOINT [--dtype fp32|bf16]: a Hugging Face MixtralForCausalLM directory (or a
// dense MistralForCausalLM / LlamaForCausalLM one, as a config of one expert) as a
// moeforge checkpoint, written one expert share at a time (checkpoint/share_writer.h). --dtype bf16 stores the weights
// in bf16 (half the disk; exact for a bf16 source, as Mixtral is published): every reader converts them on load.
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>

#include "cli/cli.h"
#include "core/error.h"
#include "io/hf_checkpoint.h"
#include "io/hf_import.h"
#include "checkpoint/share_writer.h"

namespace moeforge::cli {

namespace fs = std::filesystem;

int cmd_import(const Args& in) {
  Args args = in;
  std::string out, dtype = "fp32";
  if (!take_option(args, "--out", &out)) throw UserError("import: --out CHECKPOINT is required");
  take_option(args, "--dtype", &dtype);
  reject_unknown_flags(args, "import", {"--out", "--dtype"});
  if (dtype != "fp32" && dtype != "bf16") throw UserError("import: --dtype must be fp32 or bf16, got '" + dtype + "'");
  if (args.size() != 1) throw UserError("import: expected one Hugging Face model directory");
  if (fs::exists(out) && !(fs::is_directory(out) && fs::is_empty(out)))
    throw UserError(out + ": already exists; choose a new --out directory");
  const std::string dir = args[0];
  io::HfCheckpoint hf(dir);
  ModelConfig cfg = hf.config();
  // One expert share at a time: a share's tensors (or rows of fused v5 tensors) are all that is read and held.
  if (fs::exists(out)) fs::remove(out);
  train::write_checkpoint_by_shares(
      cfg, out, train::default_expert_shares(cfg),
      [&](MixtralForCausalLM& m, int) {
        io::load_hf_weights(dir, m);
        if (dtype == "bf16")
          for (auto& p : m->parameters()) p.set_data(p.detach().to(torch::kBFloat16));
      },
      hf.tokenizer_path(), "import");
  std::printf("imported %s (%s layout) -> %s (%s)\n", dir.c_str(), hf.layout().c_str(), out.c_str(), dtype.c_str());
  return 0;
}

}  // namespace moeforge::cli
