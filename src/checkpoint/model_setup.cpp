#include "checkpoint/model_setup.h"

#include <torch/torch.h>

#include <filesystem>

#include "core/error.h"
#include "io/init_source.h"
#include "model/finetune.h"
#include "parallel/layout.h"
#include "checkpoint/checkpoint.h"
#include "checkpoint/manifest.h"

namespace moeforge::train {

namespace fs = std::filesystem;

JobRanks job_ranks(parallel::Layout& layout) {
  JobRanks j;
  j.main = layout.is_main();
  if (layout.world() > 1) {
    j.from_main = [&layout](int64_t v) { return layout.from_main(v); };
    j.sum = [&layout](int64_t v) { return layout.sum(v); };
  }
  return j;
}

std::optional<std::string> latest_checkpoint_of_job(const std::string& run_dir, parallel::Layout& layout) {
  if (layout.world() == 1) return latest_checkpoint(run_dir);
  const JobRanks job = job_ranks(layout);
  std::optional<std::string> latest;
  std::string problem;
  int64_t step = -1;  // none
  if (job.main) {
    try {
      latest = latest_checkpoint(run_dir);
      if (latest) {
        auto st = checkpoint_trainer_state(*latest);
        if (!st) throw UserError(*latest + ": has no trainer_state.json; not a checkpoint to resume");
        if (checkpoint_dir(run_dir, st->step) != *latest)
          throw UserError(*latest + ": its trainer_state.json says step " + std::to_string(st->step) +
                          "; a resumed checkpoint keeps its step_N name");
        step = st->step;
      }
    } catch (const UserError& e) {
      problem = e.what();
    }
  }
  rank0_decides(job, problem, run_dir + ": rank 0 could not choose a checkpoint to resume");
  step = job.from_main(step);
  if (step < 0) return latest;
  const std::string dir = checkpoint_dir(run_dir, step);
  if (!job.main) {
    const CheckpointCheck c = accept_checkpoint_verified_by_main(dir);
    if (!c.ok) problem = c.message(dir) + "; the checkpoint is damaged (rank 0 found it intact: is " + run_dir +
                         " on a file system every rank shares?)";
  }
  any_rank_stops(job, problem, dir + ": another rank found the checkpoint damaged");
  return dir;
}

namespace {
// A resumed adapter run goes on as it was trained: its method, and under aux_free_bias whether the routers'
// biases moved with the adapters or stayed the base's (switching would train on from a state neither describes).
void refuse_changed_adapter_run(const std::string& latest, const Recipe& r) {
  const FinetuneSpec& ft = r.finetune;
  const auto saved = read_base_pointer(latest);
  if (!saved) throw UserError(latest + ": holds no adapters (no base.json); finetune.method " + ft.method + " cannot resume it");
  if (saved->method != ft.method)
    throw UserError(latest + "/base.json: the run was trained with finetune.method " + saved->method +
                    "; the recipe now says " + ft.method);
  if (r.model.moe.balance != Balance::AuxFreeBias) return;
  const bool was = checkpoint_updates_expert_bias(latest);
  const auto say = [](bool b) { return std::string(b ? "true" : "false"); };
  if (was != ft.lora.update_expert_bias)
    throw UserError(latest + "/recipe.yaml: the run was trained with finetune.lora.update_expert_bias " + say(was) +
                    "; the recipe now says " + say(ft.lora.update_expert_bias) + " (set it " + say(was) +
                    " to resume, or start a new output_dir)");
}
}  // namespace

TrainingModel build_training_model(const Recipe& r, parallel::Layout& layout, const std::optional<std::string>& latest) {
  const ModelConfig& cfg = r.model;
  const FinetuneSpec& ft = r.finetune;
  const ExpertRange held = layout.held_experts(cfg.moe.num_experts);
  const GroupXor over_group = [&](uint64_t v) { return layout.xor_over_expert_group(v); };
  // A moeforge checkpoint to start from (or to adapt) is hashed by rank 0 only; the others check its sizes.
  if (!r.init_from.empty() && (!latest || ft.adapters()))
    if (const auto src = io::parse_init_source(r.init_from); !src.hf)
      require_intact_checkpoint_once_per_job(src.dir, job_ranks(layout));
  if (latest && ft.adapters()) refuse_changed_adapter_run(*latest, r);  // before the base is loaded
  TrainingModel out;
  if (ft.adapters()) {
    // A frozen base, loaded (and for QLoRA quantised) layer by layer; adapters come after the expert split.
    BaseModel b = load_base_model(r.init_from, cfg, ft, r.runtime.precision, held, over_group);
    out.model = b.model;
    // The base's fingerprint covers every expert: this rank's share XORed with the other ranks'.
    const uint64_t dense = b.fingerprint ^ b.experts_fingerprint;
    const auto src = io::parse_init_source(r.init_from);
    out.base = {(src.hf ? "hf:" : "") + fs::absolute(src.dir).string(),
                dense ^ layout.xor_over_expert_group(b.experts_fingerprint), ft.method};
  } else {
    out.model = MixtralForCausalLM(cfg, OnLayerBuilt{}, held);
    init_weights(*out.model, cfg.init_std, r.train.seed);
    if (!r.init_from.empty() && !latest) load_init_weights(r.init_from, out.model, over_group);
  }
  out.model->seed_router_jitter(r.train.seed);  // a resumed run restores the generators' states later
  if (latest && ft.adapters()) {
    const auto saved = read_base_pointer(*latest);  // present: refuse_changed_adapter_run read it
    if (!saved || saved->fingerprint != out.base.fingerprint)
      throw UserError(*latest + "/base.json: the adapters were trained on another base than " + r.init_from + " holds now");
  }
  // A checkpoint in any expert-parallel layout: this rank reads the tensors of what it holds.
  if (latest && !ft.adapters()) load_model_weights(*latest, out.model);
  // Adapters are attached to the experts this rank holds; only they train.
  const uint64_t seed = r.train.seed;
  layout.hold(out.model, [&](MixtralForCausalLM& m) {
    if (!ft.adapters()) return;
    attach_lora(m, ft.lora, seed);
    // Each rank its own dropout stream (rank 0's is the one-process stream). With dropout on, the masks
    // depend on the layout, and only rank 0's stream is checkpointed: a multi-rank resume is then not bitwise.
    if (layout.rank() > 0) m->lora_rt->gen.set_current_seed(seed * 1000003ULL + 104729ULL * layout.rank());
  });
  if (latest && ft.adapters()) load_model_weights(*latest, out.model);
  return out;
}

}  // namespace moeforge::train
