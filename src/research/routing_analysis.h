// The routing analysis of "Mixtral of Experts" (section 5) on a trace of router decisions: how the
// tokens of each domain spread over the experts, per layer; how often consecutive tokens keep the same
// first-choice expert, and the same top-k set, next to what random routing would give; load imbalance.
#pragma once
#include <ATen/core/Tensor.h>

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/decoder.h"

namespace moeforge::train {

// The router decisions for a set of tokens: sequences laid end to end.
struct RoutingTrace {
  int64_t num_experts = 0, top_k = 0;
  std::vector<std::string> domains;   // domain names (index = domain id)
  std::vector<at::Tensor> topk_NK;    // per layer: int64 [N, K], column j = the j-th choice
  std::vector<int64_t> sequence;      // per token: sequence id (consecutive pairs count inside one only)
  std::vector<int32_t> domain;        // per token: domain id
};

struct LayerRouting {
  int64_t consecutive_pairs = 0;
  double first_choice_repeat_rate = 0;   // P(first choice of token t+1 == that of token t)
  double top2_set_repeat_rate = 0;       // P(set of the k choices equal), k = top_k
  double random_first_choice_rate = 0;   // 1 / E
  double random_top2_set_rate = 0;       // 1 / C(E, k)
  // The paper's "first or second choice" column: the k choices of token t+1 share at least one expert with
  // token t's; random: 1 - C(E-k, k) / C(E, k).
  double top2_overlap_rate = 0, random_top2_overlap_rate = 0;
  // The first-choice repeat rate if consecutive tokens chose independently with this layer's first-choice
  // frequencies: sum_e share_e^2 (= 1/E when balanced). An imbalanced layer repeats often by chance.
  double independent_first_choice_rate = 0;
  std::vector<int64_t> load;             // assignments per expert (all k choices)
  double load_cv = 0;                    // std / mean of the load (population std)
  double load_max_over_mean = 0;
  int64_t dead_experts = 0;              // load under 10% of the fair share
  // domain -> share of the domain's assignments that each expert receives (sums to 1); domains without
  // tokens are left out.
  std::map<std::string, std::vector<double>> expert_share_by_domain;
};

std::vector<LayerRouting> analyze_routing(const RoutingTrace& trace);

// Runs `model` (eval mode, no gradients) over the documents of a prepared split, each cut into chunks of
// at most seq_len tokens (<s> first), until max_tokens; records every layer's choices.
RoutingTrace trace_routing(MixtralForCausalLM& model, const std::string& data_dir, const std::string& split,
                           int64_t seq_len, int64_t max_tokens);

// {"tokens", "num_experts", "top_k", "domains", "layers": [{...LayerRouting...}]}
nlohmann::json routing_json(const RoutingTrace& trace, const std::vector<LayerRouting>& layers);

}  // namespace moeforge::train
