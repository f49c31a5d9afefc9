#include "objective/lm_objective.h"

#include <torch/torch.h>

#include "model/chunked_loss.h"
#include "objective/moe_terms.h"

namespace moeforge::train {

BatchLoss lm_loss(MixtralForCausalLM& model, const data::LmBatch& batch, const torch::Device& device,
                  double aux_loss_coef) {
  const auto& moe = model->config().moe;
  auto inputs = batch.inputs.to(device);
  auto targets = batch.targets.to(device);
  // In a reduced compute dtype the head and the loss run chunk by chunk (model/chunked_loss.h): no [N, V] logits
  // in bf16 and fp32 and no casts between them. fp32 keeps the plain head and cross-entropy (unchanged results).
  ForwardInputs in{inputs, {}, {}};
  in.skip_logits = model->plain_lm_head() && model->compute_dtype().has_value();
  ForwardOutput out = model->forward(in);
  torch::Tensor ce;
  if (in.skip_logits) {
    ce = chunked_lm_cross_entropy(out.hidden.reshape({-1, out.hidden.size(-1)}), model->lm_head_weight(),
                                  targets.reshape({-1}));
  } else {
    const auto V = out.logits.size(-1);
    ce = torch::nn::functional::cross_entropy(out.logits.reshape({-1, V}).to(torch::kFloat), targets.reshape({-1}));
  }
  BatchLoss l;
  l.total = ce;
  const MoeTerms t = add_moe_terms(l.total, out.router, moe, aux_loss_coef, inputs.size(1));
  const auto v = fetch_logged(l, {ce, t.aux, t.z}, out.router);
  l.loss = v[0];
  l.aux = v[1];
  l.z = v[2];
  l.tokens = targets.numel();
  l.processed = l.tokens;
  return l;
}

}  // namespace moeforge::train
