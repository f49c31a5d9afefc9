#include <iostream>
#include <stdexcept>
#include <utility>

#include "cli/cli.h"
#include "core/compat.h"
#include "core/error.h"

namespace moeforge::cli {

namespace {
// Every subcommand's usage: `moeforge --help` prints them all, `moeforge CMD --help` its own, and
// docs/cli.md holds the same text (a test compares them). Every flag a command accepts is in its text:
// MOEFORGE_ARGS_ONLY runs check that (reject_unknown_flags).
const std::vector<std::pair<std::string, std::string>> kCommands = {
    {"tokenizer",
     "  tokenizer train --input FILES... --vocab-size N --out DIR [--threads N]\n"
     "                                               train a SentencePiece BPE tokenizer (byte fallback)\n"},
    {"prepare",
     "  prepare --tokenizer MODEL --input FILES... --out DIR [--val-fraction F] [--seed S]\n"
     "          [--domain-field NAME] [--split-blank-lines] [--overwrite]\n"
     "                                               tokenize text / JSONL into train and validation shards\n"},
    {"train",
     "  train RECIPE.yaml [--set key=value ...] [--resume]\n"
     "                                               pretrain, SFT or DPO (stage: ...) as the recipe says\n"},
    {"eval",
     "  eval CHECKPOINT (--data DIR | --text FILE) [--json] [--batches N] [--batch-size B] [--seq-len T]\n"
     "       [--precision fp32|bf16] [--threads N] [--token-logprobs (with --text and --json)]\n"
     "                                               validation loss and perplexity (and each token's log-probability)\n"
     "  eval CHECKPOINT --generate --data FILE.jsonl [--json] [--max-new-tokens N]\n"
     "                                               greedy completions, exact match against the reference\n"
     "  eval CHECKPOINT --preferences FILE.jsonl --reference REF [--json] [--beta B]\n"
     "       [--loss sigmoid|ipo|hinge|robust]       DPO reward accuracy and margin against the reference\n"},
    {"launch",
     "  launch --nproc-per-node N [--nnodes M --node-rank R --master-addr A --master-port P] -- COMMAND...\n"
     "                                               run COMMAND (e.g. train recipe.yaml) as N ranks (Gloo)\n"},
    {"sweep",
     "  sweep SWEEP.yaml [--jobs N] [--report-only] [--dry-run]\n"
     "                                               a grid of training runs over recipe keys, and its report\n"},
    {"routing",
     "  routing CHECKPOINT --data DIR [--split val|train] [--seq-len T] [--max-tokens N] [--json]\n"
     "          [--precision fp32|bf16] [--threads N]\n"
     "                                               expert share per domain, consecutive-token repeat rates, load\n"},
    {"export",
     "  export CHECKPOINT --format hf|gguf|peft|gguf-lora --out PATH [--dtype bf16|fp16|fp32] [--max-shard-size 5GB]\n"
     "                                               Hugging Face safetensors directory, llama.cpp GGUF file\n"
     "                                               (--dtype also q8_0|q4_0: llama.cpp's quantized blocks),\n"
     "                                               or (LoRA/QLoRA checkpoints) a PEFT adapter or llama.cpp LoRA adapter\n"
     "                                               (gguf-lora, for the base's gguf export); hf/gguf merge adapters;\n"
     "          [--drop-expert-bias]                 export a model that routes with aux-free biases without them\n"
     "          [--expert-shares N]                  merge an adapter checkpoint N expert shares at a time\n"},
    {"import",
     "  import HF_DIR --out CHECKPOINT [--dtype fp32|bf16]\n"
     "                                               a Hugging Face Mixtral (or dense Mistral / Llama) directory\n"},
    {"upcycle",
     "  upcycle DENSE --experts E [--top-k K] [--granularity G] [--noise S] [--seed N] [--dtype fp32|bf16]\n"
     "          --out CHECKPOINT                     a dense checkpoint or HF directory as an MoE: every expert a\n"
     "                                               copy of its MLP (or of one of G slices), a fresh router\n"},
    {"init",
     "  init CONFIG --out CHECKPOINT [--seed S] [--shards N] [--tokenizer FILE]\n"
     "                                               a freshly initialised model, written one expert share at a time\n"},
    {"generate",
     "  generate CHECKPOINT --prompt TEXT [--chat] [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S]\n"
     "           [--precision fp32|bf16] [--threads N] [--json]\n"
     "                                               continue a prompt (KV cache; streams tokens; --json: ids and text)\n"},
    {"info",
     "  info CONFIG [--json] [--set key=value ...] [--finetune full|lora|qlora [--rank R] [--precision bf16|fp32]]\n"
     "                                               parameter counts and memory of a model config (and of fine-tuning it)\n"
     "  info --keys [--json]                         every config and recipe key: type, default, meaning\n"},
    {"plan",
     "  plan RECIPE [--set key=value ...] [--nproc-per-node N] [--nnodes M] [--device-memory 80GB]\n"
     "       [--device cpu|cuda] [--expert-load F] [--json]\n"
     "                                               memory per rank of a recipe in a layout; whether it fits\n"},
    {"bench",
     "  bench moe [--tokens N] [--hidden H] [--intermediate I] [--experts E] [--top-k K] [--iters N]\n"
     "            [--threads N] [--device cpu|cuda] [--dtype fp32|bf16] [--json]\n"
     "                                               MoE block forward+backward speed vs a plain matmul\n"},
    {"version",
     "  version                                      versions of moeforge and LibTorch\n"},
};
const char* kFooter = "Errors in configs, files or flags print one line and exit with status 2.\n";

std::string full_usage() {
  std::string s = "usage: moeforge <command> [options]   (moeforge <command> --help: that command only)\n\ncommands:\n";
  for (const auto& [name, text] : kCommands) s += text;
  return s + "\n" + kFooter;
}

bool asks_for_help(const std::string& cmd, const Args& rest) {
  for (const auto& a : rest) {
    if (cmd == "launch" && a == "--") return false;  // what follows is the launched command's
    if (a == "--help" || a == "-h") return true;
  }
  return false;
}
}  // namespace

const std::string& command_usage(const std::string& command) {
  const std::string name = command.substr(0, command.find(' '));  // "bench moe" -> "bench"
  for (const auto& [n, text] : kCommands)
    if (n == name) return text;
  throw std::logic_error("no usage text for command '" + command + "'");
}

int run(const Args& argv) {
  try {
    return dispatch(argv);
  } catch (const ArgsChecked&) {
    return 0;  // MOEFORGE_ARGS_ONLY: the command line parsed
  }
}

int dispatch(const Args& argv) {
  if (argv.empty() || argv[0] == "-h" || argv[0] == "--help" || argv[0] == "help") {
    std::cout << full_usage();
    return argv.empty() ? kUserErrorExit : 0;
  }
  const std::string cmd = argv[0];
  Args rest(argv.begin() + 1, argv.end());
  bool known = false;
  for (const auto& [n, text] : kCommands) known = known || n == cmd;
  if (known && asks_for_help(cmd, rest)) {
    std::cout << "usage: moeforge\n" << command_usage(cmd) << "\n" << kFooter;
    return 0;
  }
  if (cmd == "info") return cmd_info(rest);
  if (cmd == "bench") return cmd_bench(rest);
  if (cmd == "tokenizer") return cmd_tokenizer(rest);
  if (cmd == "prepare") return cmd_prepare(rest);
  if (cmd == "train") return cmd_train(rest);
  if (cmd == "eval") return cmd_eval(rest);
  if (cmd == "export") return cmd_export(rest);
  if (cmd == "import") return cmd_import(rest);
  if (cmd == "upcycle") return cmd_upcycle(rest);
  if (cmd == "init") return cmd_init(rest);
  if (cmd == "plan") return cmd_plan(rest);
  if (cmd == "generate") return cmd_generate(rest);
  if (cmd == "launch") return cmd_launch(rest);
  if (cmd == "routing") return cmd_routing(rest);
  if (cmd == "sweep") return cmd_sweep(rest);
  if (cmd == "version" || cmd == "--version") {
    std::cout << "moeforge " << MOEFORGE_VERSION << " (LibTorch " << compat::torch_version() << ")\n";
    return 0;
  }
  throw UserError("unknown command '" + cmd + "'" + did_you_mean(cmd, {"info", "bench", "version", "tokenizer", "prepare", "train", "eval", "export", "import", "upcycle", "init", "plan", "generate", "launch", "routing", "sweep"}) +
                  "; run 'moeforge --help'");
}

}  // namespace moeforge::cli
