// A training recipe: which model, which data, how to train, where to write. YAML, strict,
// every default here; `--set a.b=c` overrides any key. Paths are relative to the working directory.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/lora.h"

namespace moeforge::train {

struct OptimConfig {
  double lr = 3e-3;
  double min_lr = 3e-4;
  double beta1 = 0.9, beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  double grad_clip = 1.0;        // 0 = off
  std::string schedule = "cosine";  // cosine | wsd | constant
  int64_t warmup_steps = 20;
  double decay_fraction = 0.2;   // wsd: final fraction of steps that decays to min_lr
};

struct TrainLoopConfig {
  int64_t micro_batch_size = 8;
  int64_t seq_len = 128;
  int64_t grad_accum = 1;
  int64_t max_steps = 200;
  std::optional<int64_t> max_tokens;  // token budget; if set, steps = min(max_steps, budget / tokens per step)
  int64_t log_interval = 10;
  int64_t eval_interval = 100;
  int64_t eval_batches = 16;
  int64_t checkpoint_interval = 100;
  int64_t keep_checkpoints = 2;
  uint64_t seed = 1234;
  int64_t skip_samples = 0;  // a fresh run's data starts at this sample (continuing another run's data)
  std::string activation_checkpointing = "none";  // none | full (each decoder layer) | moe (each MoE block)
};

struct RuntimeConfig {
  std::string device = "auto";     // auto | cpu | cuda
  // fp32 | bf16 (mixed: bf16 matmuls, fp32 master weights and AdamW state) | auto (the faster, measured at start-up
  // by train/precision_probe.h; run_training replaces it by its choice before anything else reads it)
  std::string precision = "fp32";
  int threads = 0;                 // 0 = number of cores
};

// The DPO losses (TRL's names): the one list that recipes, `eval --preferences` and dpo_loss accept.
const std::vector<std::string>& dpo_loss_types();

struct DpoConfig {
  double beta = 0.1;
  std::string loss = "sigmoid";       // sigmoid | ipo | hinge | robust
  double label_smoothing = 0.0;       // sigmoid/robust: assumed probability that a label is flipped
  // auto: adapters_off when fine-tuning adapters, else frozen | frozen: a copy of init_from in memory |
  // precompute: log-probs stored first | adapters_off: the policy itself with its adapters switched off
  std::string reference = "auto";
  std::optional<double> aux_loss_coef;  // unset: the model config's
  double rpo_alpha = 0.0;             // > 0: + alpha x NLL of the chosen completions (TRL's rpo_alpha)
};

struct Recipe {
  std::string path;                // the recipe file
  std::string stage = "pretrain";  // pretrain | sft | dpo
  std::string model_source;        // the model config file, or "<inline>"
  ModelConfig model;
  std::string tokenizer;           // SentencePiece model ("" = the prepared data's copy)
  std::string data_dir;            // pretrain: prepared data (moeforge prepare)
  std::string sft_train, sft_val;  // sft, dpo: JSONL examples or preference pairs (data.train, data.val)
  bool sft_train_on_all = false;   // sft.train_on_all: loss on every token, not only the assistant's
  std::string sft_overlong = "truncate";  // sft.overlong: truncate | skip
  std::optional<double> sft_aux_loss_coef;  // sft.aux_loss_coef (unset: the model config's)
  DpoConfig dpo;
  FinetuneSpec finetune;           // finetune.*: full | lora | qlora
  std::string quant_type = "nf4";  // finetune.quant.type (finetune.quant.type holds the parsed value)
  TrainLoopConfig train;
  OptimConfig optim;
  RuntimeConfig runtime;
  std::string output_dir = "runs/default";
  std::string resume = "never";    // never | auto
  std::string init_from;           // a checkpoint to start from ("" = fresh init)
  int64_t parallel_timeout_s = 300;  // parallel.timeout_s: rendezvous and every collective (multi-process runs)
  int64_t parallel_expert = 1;       // parallel.expert: ranks that share one copy of the experts (world = DP x EP)
  int64_t parallel_zero = 0;         // parallel.zero: 1 = optimizer state sharded over the data-parallel ranks
  std::string yaml;                // the fully resolved recipe, as written to the run dir
};

Recipe load_recipe(const std::string& path, const std::vector<std::string>& overrides);

// No silent no-ops: a key whose value (other than its default) cannot affect the run `r` resolves to is a UserError
// naming it and the key that disables it ("<recipe>: key 'sft.aux_loss_coef': has no effect: model.moe.balance is
// aux_free_bias ..."). The rules: LoRA keys with finetune.method full, quant keys without qlora, sft.* keys outside
// stage sft, dpo.* keys outside stage dpo, an aux-loss coefficient without moe.balance aux_loss, the bias update of
// aux-loss-free balancing without moe.balance aux_free_bias. A key that comes from a file other recipes share is one
// warning line instead (once per process): a model config file, or (shared_recipe) a sweep's base recipe whose
// point does not set the key itself. Set by --set or a sweep axis / variant, it is always an error. Run by train,
// plan and sweep on what the user gives; resolved recipes read back from checkpoints are not checked.
void refuse_no_op_keys(const Recipe& r, const std::vector<std::string>& overrides, bool shared_recipe = false);

}  // namespace moeforge::train
