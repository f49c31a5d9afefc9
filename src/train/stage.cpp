#include "train/stage.h"

namespace moeforge::train {

double Stage::total_loss(double loss, double aux, double z, const std::map<std::string, double>& metrics) const {
  const auto& moe = recipe_.model.moe;
  return loss + (moe.balance == Balance::AuxLoss ? aux_loss_coef_ * aux : 0.0) + moe.z_loss_coef * z;
}

std::unique_ptr<Stage> make_stage(const Recipe& r) {
  if (r.stage == "sft") return make_sft_stage(r);
  if (r.stage == "dpo") return make_dpo_stage(r);
  return make_pretrain_stage(r);
}

}  // namespace moeforge::train
