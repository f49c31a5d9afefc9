#include "train/stage.h"

#include <cstdio>
#include <cstdlib>

#include "core/error.h"

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

std::string test_dump_path() {
  const char* path = std::getenv("MOEFORGE_DUMP_BATCHES");
  return path ? path : "";
}

void append_to_test_dump(const std::string& path, const void* data, size_t size) {
  std::FILE* f = std::fopen(path.c_str(), "ab");
  if (!f) throw UserError(path + ": cannot open (MOEFORGE_DUMP_BATCHES)");
  const bool ok = std::fwrite(data, 1, size, f) == size;
  if (std::fclose(f) != 0 || !ok) throw UserError(path + ": cannot write (MOEFORGE_DUMP_BATCHES)");
}

}  // namespace moeforge::train
