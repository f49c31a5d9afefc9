// The model a training rank works on, built so that no rank ever allocates what it does not hold: the dense
// parameters and its share of the experts (parallel.expert), initialised from the seed (per-parameter streams:
// the same weights in every layout), then `init_from` or the checkpoint being resumed read tensor by tensor
// from their memory-mapped files (only the tensors, or fused-tensor rows, of the experts it holds).
// A LoRA / QLoRA base is built the same way, layer by layer, frozen in its storage precision.
#pragma once
#include <optional>
#include <string>

#include "model/decoder.h"
#include "checkpoint/base_model.h"
#include "checkpoint/manifest.h"
#include "recipe/recipe.h"

namespace moeforge::parallel {
class Layout;
}

namespace moeforge::train {

struct TrainingModel {
  MixtralForCausalLM model{nullptr};
  BasePointer base;  // adapter runs: the frozen base (its fingerprint over every rank's experts)
};

// The layout's ranks for the once-per-job checkpoint checks (checkpoint/manifest.h).
JobRanks job_ranks(parallel::Layout& layout);

// The checkpoint of `run_dir` a job resumes: rank 0 finds the newest intact one (latest_checkpoint: verified,
// falling back past damaged ones with a warning) and tells the others, which check its sizes only; the job
// reads a checkpoint for its hash once, not once per rank.
std::optional<std::string> latest_checkpoint_of_job(const std::string& run_dir, parallel::Layout& layout);

// Builds `r`'s model for this rank of `layout`, loads `latest` (a checkpoint of this run being resumed) or
// `r.init_from`, and hands it to the layout (layout.hold: adapters attached after the split). On the CPU.
TrainingModel build_training_model(const Recipe& r, parallel::Layout& layout, const std::optional<std::string>& latest);

}  // namespace moeforge::train
