#include <iostream>

#include "cli/cli.h"
#include "core/compat.h"
#include "core/error.h"

namespace moeforge::cli {

namespace {
const char* kUsage =
    "usage: moeforge <command> [options]\n"
    "\n"
    "commands:\n"
    "  tokenizer train --input FILES... --vocab-size N --out DIR\n"
    "                                               train a SentencePiece BPE tokenizer (byte fallback)\n"
    "  prepare --tokenizer MODEL --input FILES... --out DIR [--val-fraction F] [--seed S]\n"
    "          [--domain-field NAME] [--split-blank-lines] [--overwrite]\n"
    "                                               tokenize text / JSONL into train and validation shards\n"
    "  train RECIPE.yaml [--set key=value ...] [--resume]\n"
    "                                               pretrain, SFT or DPO (stage: ...) as the recipe says\n"
    "  eval CHECKPOINT (--data DIR | --text FILE) [--json] [--batches N] [--seq-len T] [--precision fp32|bf16]\n"
    "                                               validation loss and perplexity\n"
    "  eval CHECKPOINT --generate --data FILE.jsonl [--json] [--max-new-tokens N]\n"
    "                                               greedy completions, exact match against the reference\n"
    "  eval CHECKPOINT --preferences FILE.jsonl --reference REF [--json] [--beta B]\n"
    "                                               DPO reward accuracy and margin against the reference\n"
    "  launch --nproc-per-node N [--nnodes M --node-rank R --master-addr A --master-port P] -- COMMAND...\n"
    "                                               run COMMAND (e.g. train recipe.yaml) as N ranks (Gloo)\n"
    "  sweep SWEEP.yaml [--jobs N] [--report-only] [--dry-run]\n"
    "                                               a grid of training runs over recipe keys, and its report\n"
    "  routing CHECKPOINT --data DIR [--split val|train] [--seq-len T] [--max-tokens N] [--json] [--precision P]\n"
    "                                               expert share per domain, consecutive-token repeat rates, load\n"
    "  export CHECKPOINT --format hf|gguf|peft --out PATH [--dtype bf16|fp16|fp32] [--max-shard-size 5GB]\n"
    "                                               Hugging Face safetensors directory, llama.cpp GGUF file,\n"
    "                                               or (LoRA/QLoRA checkpoints) a PEFT adapter; hf/gguf merge adapters;\n"
    "          [--drop-expert-bias]                 export a model that routes with aux-free biases without them\n"
    "  import HF_DIR --out CHECKPOINT [--dtype fp32|bf16]\n"
    "                                               a Hugging Face Mixtral (or dense Mistral / Llama) directory\n"
    "  upcycle DENSE --experts E [--top-k K] [--granularity G] [--noise S] [--seed N] [--dtype fp32|bf16]\n"
    "          --out CHECKPOINT                     a dense checkpoint or HF directory as an MoE: every expert a\n"
    "                                               copy of its MLP (or of one of G slices), a fresh router\n"
    "  init CONFIG --out CHECKPOINT [--seed S] [--shards N] [--tokenizer FILE]\n"
    "                                               a freshly initialised model, written one expert share at a time\n"
    "  generate CHECKPOINT --prompt TEXT [--chat] [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S]\n"
    "           [--precision fp32|bf16]\n"
    "                                               continue a prompt (KV cache; streams tokens)\n"
    "  info CONFIG [--json] [--set key=value ...] [--finetune full|lora|qlora [--rank R] [--precision bf16|fp32]]\n"
    "                                                parameter counts and memory of a model config (and of fine-tuning it)\n"
    "  plan RECIPE [--nproc-per-node N] [--nnodes M] [--device-memory 80GB] [--device cpu|cuda] [--json]\n"
    "       [--expert-load F]\n"
    "                                               memory per rank of a recipe in a layout; whether it fits\n"
    "  info --keys [--json]                          every config and recipe key: type, default, meaning\n"
    "  bench moe [--tokens N --hidden H ...]        MoE block forward+backward speed vs a plain matmul\n"
    "  version                                       versions of moeforge and LibTorch\n"
    "\n"
    "Errors in configs, files or flags print one line and exit with status 2.\n";
}

int run(const Args& argv) {
  if (argv.empty() || argv[0] == "-h" || argv[0] == "--help" || argv[0] == "help") {
    std::cout << kUsage;
    return argv.empty() ? kUserErrorExit : 0;
  }
  const std::string cmd = argv[0];
  Args rest(argv.begin() + 1, argv.end());
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
