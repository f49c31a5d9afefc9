#include "eval/inference.h"

#include <torch/torch.h>

#include "core/error.h"
#include "io/init_source.h"
#include "model/finetune.h"
#include "model/mixed.h"
#include "parallel/layout.h"
#include "checkpoint/base_model.h"
#include "checkpoint/checkpoint.h"
#include "checkpoint/manifest.h"
#include "checkpoint/model_setup.h"

namespace moeforge::train {

InferenceJob::InferenceJob(const std::string& command, int threads) {
  const parallel::DistEnv env = parallel::read_dist_env();
  parallel::configure_rank_threads(threads, env.world_size);
  device_ = parallel::local_rank_device(torch::cuda::is_available(), env.local_rank);
  parallel::LayoutOptions o;
  o.expert = env.world_size;  // every rank holds a share of the experts: no rank holds them all
  o.source = command;
  layout_ = std::make_unique<parallel::Layout>(env, o, device_);
}

InferenceJob::~InferenceJob() = default;

int InferenceJob::world() const { return layout_->world(); }
int InferenceJob::rank() const { return layout_->rank(); }
bool InferenceJob::is_main() const { return layout_->is_main(); }

MixtralForCausalLM InferenceJob::load(const std::string& ckpt, const std::string& precision) {
  // Before its base, its config or its recipe is read: rank 0 hashes it, the others check sizes (and so for a
  // base that is a moeforge checkpoint).
  const JobRanks ranks = job_ranks(*layout_);
  require_intact_checkpoint_once_per_job(ckpt, ranks);
  const std::optional<BasePointer> base = read_base_pointer(ckpt);
  if (base && !io::parse_init_source(base->init_from).hf)
    require_intact_checkpoint_once_per_job(io::parse_init_source(base->init_from).dir, ranks);
  const ModelConfig cfg = read_checkpoint_config(ckpt);
  if (cfg.moe.num_experts % layout_->world() != 0)
    throw UserError(ckpt + ": its " + std::to_string(cfg.moe.num_experts) + " experts do not split evenly over " +
                    std::to_string(layout_->world()) + " ranks (run with a world size that divides them)");
  const ExpertRange held = layout_->held_experts(cfg.moe.num_experts);
  MixtralForCausalLM model{nullptr};
  if (base) {
    model = load_adapter_checkpoint_model(ckpt, *base, held,
                                          [&](uint64_t v) { return layout_->xor_over_expert_group(v); });
  } else {
    model = MixtralForCausalLM(cfg, OnLayerBuilt{}, held);
    load_model_weights(ckpt, model);  // only the tensors this rank holds
  }
  for (auto& p : model->parameters()) p.requires_grad_(false);
  layout_->hold(model);  // the expert-parallel dispatchers (nothing to hold for gradients)
  move_to(model, device_);
  model->set_compute_dtype(compute_dtype_for(precision.empty() ? checkpoint_precision(ckpt) : precision));
  model->eval();
  return model;
}

int64_t InferenceJob::agree(int64_t v) { return layout_->from_main(v); }

}  // namespace moeforge::train
