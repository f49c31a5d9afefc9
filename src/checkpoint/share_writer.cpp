#include "checkpoint/share_writer.h"

#include <malloc.h>

#include <filesystem>

#include "core/error.h"
#include "model/param_count.h"
#include "parallel/expert_parallel.h"
#include "checkpoint/checkpoint.h"

namespace moeforge::train {

namespace fs = std::filesystem;

int default_expert_shares(const ModelConfig& cfg) {
  const int64_t E = cfg.moe.num_experts;
  const double expert_bytes = 4.0 * static_cast<double>(count_params(cfg).experts);
  int64_t shares = 1;
  while (shares < E && expert_bytes / static_cast<double>(shares) > 1e9) {
    ++shares;
    while (E % shares != 0) ++shares;
  }
  return static_cast<int>(shares);
}

void write_checkpoint_by_shares(const ModelConfig& cfg, const std::string& out_dir, int shares,
                                const std::function<void(MixtralForCausalLM&, int)>& fill,
                                const std::string& tokenizer_path, const std::string& what) {
  const int64_t E = cfg.moe.num_experts;
  if (shares < 1 || E % shares != 0)
    throw UserError(what + " must divide model.moe.num_experts (" + std::to_string(E) + "), got " + std::to_string(shares));
  if (fs::path(out_dir).has_parent_path()) fs::create_directories(fs::path(out_dir).parent_path());
  for (int k = shares - 1; k >= 0; --k) {
    MixtralForCausalLM m(cfg, OnLayerBuilt{}, shares > 1 ? parallel::expert_range_of(E, k, shares) : ExpertRange{});
    fill(m, k);
    CheckpointContents c;
    c.config = &cfg;
    c.model = m;
    c.tokenizer_path = tokenizer_path;
    c.shard.expert_shards = shares;
    c.shard.expert_shard = k;
    if (k > 0) write_expert_shard(out_dir, c);
    else write_checkpoint_dir(out_dir, c);
    m = nullptr;
    ::malloc_trim(0);  // this share's memory goes back before the next is built
  }
}

}  // namespace moeforge::train
