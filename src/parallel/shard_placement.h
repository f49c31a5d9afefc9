// Which part of a sharded checkpoint a rank writes (parallel::Layout decides; checkpoint/checkpoint writes).
#pragma once

namespace moeforge::parallel {

// Which part of a sharded checkpoint this rank writes.
struct ShardPlacement {
  int expert_shards = 1, expert_shard = 0, data_parallel = 1;
  int optimizer_parts = 0, optimizer_part = 0;  // ZeRO-1: every rank writes its optimizer part
  bool writes_experts = true;                   // the first replica writes the expert shards
  bool sharded() const { return expert_shards > 1 || optimizer_parts > 0; }
};

}  // namespace moeforge::parallel
