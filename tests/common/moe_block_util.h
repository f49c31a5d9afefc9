#pragma once
#include "model/decoder.h"
#include "model/moe_block.h"
#include "test_util.h"

namespace moeforge::test {

// One MoE block of the tiny config's shape with hidden H, intermediate I, E experts, top-K, weights
// N(0, 0.3) from `seed`.
inline MoEBlock make_moe_block(int64_t H, int64_t I, int64_t E, int64_t K, uint64_t seed = 11) {
  ModelConfig c = tiny_config();
  c.hidden_size = H;
  c.intermediate_size = I;
  c.moe.num_experts = E;
  c.moe.num_experts_per_tok = K;
  MoEBlock b(c);
  init_weights(*b, 0.3, seed);
  return b;
}

}  // namespace moeforge::test
