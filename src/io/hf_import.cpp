#include "io/hf_import.h"

#include <torch/torch.h>

#include "core/error.h"
#include "io/hf_checkpoint.h"
#include "model/param_names.h"

namespace moeforge::io {

void load_hf_weights(const std::string& hf_dir, MixtralForCausalLM& model) {
  HfCheckpoint hf(hf_dir);
  std::vector<std::string> names;
  torch::NoGradGuard ng;
  for (auto& p : model->named_parameters()) {
    names.push_back(p.key());
    if (p.key() == "lm_head.weight" && !hf.has(p.key()))
      throw UserError(hf_dir + ": 'lm_head.weight' is missing and tie_word_embeddings is false");
    auto t = hf.get(p.key());
    if (t.sizes() != p.value().sizes())
      throw UserError(hf_dir + ": tensor '" + p.key() + "' has shape " + c10::str(t.sizes()) + ", config.json implies " +
                      c10::str(p.value().sizes()));
    p.value().copy_(t.to(p.value().scalar_type()));
  }
  // A model holding a share of the experts (expert parallelism) reads only those; the rest are the other ranks'.
  const auto& cfg = model->config();
  for (auto& block : model->moe_blocks()) {
    for (auto& n : expert_names_outside(cfg.num_layers, cfg.moe.num_experts, block->experts->first(), block->experts->count()))
      names.push_back(n);
    break;  // every layer holds the same share
  }
  auto extra = hf.unexplained(names);
  if (!extra.empty())
    throw UserError(hf_dir + ": " + std::to_string(extra.size()) + " tensors do not belong to a model of this config, e.g. '" +
                    extra.front() + "'");
  for (auto& b : model->named_buffers())
    if (b.key().find("expert_bias") != std::string::npos) b.value().zero_();
}

}  // namespace moeforge::io
