// Checkpoints: a self-contained directory per step, written atomically.
//   run_dir/checkpoints/step_00000100/
//     config.yaml            the model config
//     tokenizer.model        the SentencePiece model the data was prepared with
//     model.safetensors      parameters (HF names) and buffers (expert biases)
//     optimizer.safetensors  AdamW state and the RNG state        (training checkpoints only)
//     trainer_state.json     step, samples and tokens consumed, seq_len, elapsed time
//     recipe.yaml            the resolved recipe
//     base.json              an adapter run's base (LoRA / QLoRA only)
//     manifest.json          every other file's size and hash (checkpoint/manifest.h), written last
// Written under expert parallelism (parallel.expert = N > 1), the experts are in one file per shard:
//     model.safetensors                       dense parameters and buffers (rank 0)
//     experts-KK-of-NN.safetensors            the experts of expert-parallel rank KK (HF names)
//     optimizer.safetensors                   dense optimizer state and the RNG (rank 0)
//     optimizer-experts-KK-of-NN.safetensors  the optimizer state of those experts
//     layout.json                             {"expert_parallel", "data_parallel", "weights", "optimizer"}
// With the optimizer state sharded (parallel.zero: 1), every rank writes the state it owns:
//     optimizer-part-RR-of-WW.safetensors     (optimizer.safetensors then holds only the RNG)
// Loading reads every file the layout names, so a checkpoint loads into any layout (EP = N to 1 for
// export, or to another N); all ranks must see the run directory (one shared filesystem across nodes).
// Written to a temp directory (every write checked, files fsynced, manifest.json last), then renamed into place,
// so a step_N directory is complete when it appears; a crash leaves only a .tmp-* directory behind, a failed write
// (a full disk) is a UserError naming the file, with the temp directory removed and older checkpoints untouched.
// Damage after the fact (a truncated copy, a flipped bit) is caught by the manifest: resuming (latest_checkpoint)
// skips a damaged checkpoint with a warning naming the file and takes the newest intact one; every reader (eval,
// export, generate, routing, init_from, a base, a resume) refuses a damaged one with a UserError naming the file.
// Checkpoints written before manifests have none and are read unchecked.
#pragma once
#include <torch/types.h>

#include <optional>
#include <string>

#include "model/config.h"
#include "io/init_source.h"
#include "io/safetensors.h"
#include "model/decoder.h"
#include "parallel/shard_placement.h"
#include "recipe/recipe.h"

namespace moeforge::parallel {
class Layout;
}

namespace moeforge::train {

class AdamW;

struct TrainerState {
  int64_t step = 0;          // optimizer steps done
  int64_t samples_seen = 0;  // global sample index of the next batch
  int64_t tokens_seen = 0;         // real tokens the forwards ran on
  int64_t target_tokens_seen = 0;  // tokens that carried loss (fine-tuning: the completions)
  int64_t seq_len = 0;
  double elapsed_s = 0;
  uint64_t seed = 0;
};

struct CheckpointContents {
  const ModelConfig* config = nullptr;
  MixtralForCausalLM model{nullptr};
  const AdamW* optimizer = nullptr;     // null: weights only
  const TrainerState* state = nullptr;  // null: weights only
  std::string tokenizer_path;           // copied in when non-empty
  std::string recipe_yaml;
  // An adapter run (LoRA / QLoRA): base.json's text. The weight files then hold the adapters (per-expert
  // names) and buffers, the optimizer files the adapters' state; the base stays where base.json points.
  std::string base_json;
  // Expert parallelism: the model holds only the experts of shard `expert_shard` of `expert_shards`.
  // ZeRO-1: the optimizer holds the state of this rank's parameters only; every rank writes its part.
  parallel::ShardPlacement shard;
  bool sharded() const { return shard.sharded(); }
};

// Writes run_dir/checkpoints/step_N and keeps the newest `keep` of those up to step N (newer ones, which a resume
// fell back past as damaged, are left alone). Returns the directory.
std::string save_checkpoint(const std::string& run_dir, const CheckpointContents& c, int keep);
// The same from every rank of `layout` (each writes its part, set here from the layout); returns the
// directory on every rank once it is complete.
std::string save_checkpoint(parallel::Layout& layout, const std::string& run_dir, CheckpointContents c, int keep);

// One process writing an expert-sharded checkpoint share by share (checkpoint/share_writer.h): the files of share
// c.shard.expert_shard > 0 go into `dir`'s staging directory (the highest share first, which starts it afresh);
// write_checkpoint_dir with share 0 then completes and renames it. A failure removes the staging directory.
void write_expert_shard(const std::string& dir, const CheckpointContents& c);
// Writes a self-contained checkpoint directory at `dir` (temp + rename).
void write_checkpoint_dir(const std::string& dir, const CheckpointContents& c);

// The newest intact checkpoint under run_dir/checkpoints, if any: each is verified against its manifest, newest
// first; a damaged one is skipped with a one-line warning naming the file.
std::optional<std::string> latest_checkpoint(const std::string& run_dir);
// Where the checkpoint of `step` lives: run_dir/checkpoints/step_NNNNNNNN.
std::string checkpoint_dir(const std::string& run_dir, int64_t step);

using io::read_checkpoint_config;  // io/init_source.h: read by recipes too, which sit below checkpoints
// The weight files of a checkpoint: model.safetensors plus the shards its layout.json names.
std::vector<std::string> checkpoint_weight_files(const std::string& ckpt_dir);
// A full checkpoint's tensors (any layout), read one by one from its memory-mapped, verified files: every
// parameter of its config must be there with its shape (UserError naming the file otherwise). The model is
// never built.
class CheckpointTensors {
 public:
  CheckpointTensors(const std::string& ckpt_dir, const ModelConfig& cfg);
  bool has(const std::string& name) const { return file_of_.count(name) > 0; }
  at::Tensor get(const std::string& name) const;  // as stored
  const std::map<std::string, size_t>& names() const { return file_of_; }  // every tensor -> its file's index

 private:
  std::vector<io::SafetensorsFile> files_;
  std::map<std::string, size_t> file_of_;
};
// The weights a checkpoint of `model` holds: every parameter, or, with adapters attached, the adapters
// under their per-expert names (model/finetune.h).
std::vector<std::pair<std::string, torch::Tensor>> saved_parameters(MixtralForCausalLM& model);
// Copies weights into `model`: every parameter (with adapters: every adapter) must be present with its shape
// (UserError otherwise). Like every reader of a checkpoint's weights or optimizer state, it first verifies the
// checkpoint against its manifest (UserError naming the damaged file; once per process for unchanged files).
void load_model_weights(const std::string& ckpt_dir, MixtralForCausalLM& model);
using io::read_init_config;
// `model` may hold a share of the experts (ExpertRange): only those are read. An adapter checkpoint as the
// source is merged share by share; its base's fingerprint is then combined over the ranks by `over_group`.
void load_init_weights(const std::string& init_from, MixtralForCausalLM& model, const GroupXor& over_group = {});
// The tokenizer.model of an init source ("hf:DIR" or a checkpoint), or "" when it has none.
std::string init_tokenizer(const std::string& init_from);
// Restores the optimizer state, the trainer state and the routers' jitter generators of `model`.
void load_training_state(const std::string& ckpt_dir, AdamW& opt, TrainerState& state, MixtralForCausalLM& model);
// A checkpoint's trainer_state.json (nullopt: a weights-only checkpoint; unreadable: UserError).
std::optional<TrainerState> checkpoint_trainer_state(const std::string& ckpt_dir);
// The recipe a checkpoint was trained with (its recipe.yaml, read as strictly as any recipe), if it has one.
std::optional<Recipe> checkpoint_recipe(const std::string& ckpt_dir);
// A checkpoint's tokenizer path ("" when it has none).
std::string checkpoint_tokenizer(const std::string& ckpt_dir);
// The tokenizer path, or a UserError saying that `purpose` (e.g. "generation") needs one.
std::string require_checkpoint_tokenizer(const std::string& ckpt_dir, const std::string& purpose);
// The precision a checkpoint was trained in (its recipe's runtime.precision; "fp32" without a recipe).
std::string checkpoint_precision(const std::string& ckpt_dir);
// A checkpoint's model (its config) with its weights loaded, on the CPU, computing in `precision`
// ("" = the precision it was trained in). An adapter checkpoint: its base (quantised for QLoRA) + adapters.
MixtralForCausalLM load_checkpoint_model(const std::string& ckpt_dir, const std::string& precision = "");

}  // namespace moeforge::train
