// moeforge routing CHECKPOINT --data DIR [--split val|train] [--seq-len T] [--max-tokens N] [--json]
// The Mixtral paper's routing analysis (section 5) of a checkpoint on prepared data with domain labels.
// Under `moeforge launch` the ranks split the experts (the routers are on every rank); rank 0 reports.
#include <cstdio>
#include <iostream>

#include "cli/cli.h"
#include "core/compat.h"
#include "core/error.h"
#include "checkpoint/checkpoint.h"
#include "eval/inference.h"
#include "research/routing_analysis.h"

namespace moeforge::cli {

int cmd_routing(const Args& in) {
  Args args = in;
  std::string data, split = "val", v;
  int64_t seq_len = 256, max_tokens = 200000, threads = 0;
  if (!take_option(args, "--data", &data)) throw UserError("routing: --data DIR (a prepared directory) is required");
  take_option(args, "--split", &split);
  if (take_option(args, "--seq-len", &v)) seq_len = parse_int("--seq-len", v);
  if (take_option(args, "--max-tokens", &v)) max_tokens = parse_int("--max-tokens", v);
  if (take_option(args, "--threads", &v)) threads = parse_int("--threads", v);
  const std::string precision = take_precision(args, "routing");
  const bool json = take_flag(args, "--json");
  reject_unknown_flags(args, "routing",
                       {"--data", "--split", "--seq-len", "--max-tokens", "--threads", "--json", "--precision"});
  if (args.size() != 1) throw UserError("routing: expected one CHECKPOINT directory");
  if (split != "val" && split != "train") throw UserError("routing: --split must be val or train");
  if (seq_len < 2) throw UserError("routing: --seq-len must be at least 2");
  if (max_tokens < 2) throw UserError("routing: --max-tokens must be at least 2");
  train::InferenceJob job("routing", static_cast<int>(threads));
  const std::string ckpt = args[0];
  MixtralForCausalLM model = job.load(ckpt, precision);
  if (seq_len > model->config().max_position_embeddings)
    throw UserError("routing: --seq-len " + std::to_string(seq_len) + " exceeds the model's max_position_embeddings");
  auto trace = train::trace_routing(model, data, split, seq_len, max_tokens);
  auto layers = train::analyze_routing(trace);
  auto j = train::routing_json(trace, layers);
  j["checkpoint"] = ckpt;
  j["data"] = data;
  j["split"] = split;
  if (!job.is_main()) return 0;
  if (json) {
    std::cout << j.dump() << "\n";
    return 0;
  }
  std::printf("routing of %s on %s (%s, %zu tokens, E=%ld, top-%ld)\n", ckpt.c_str(), data.c_str(), split.c_str(),
              trace.sequence.size(), (long)trace.num_experts, (long)trace.top_k);
  std::printf("layer | first-choice repeat (random 1/E; independent at this load) | top-k sets share one (random) | "
              "same top-k set (random) | load CV | max/mean | dead\n");
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& L = layers[i];
    std::printf("%5zu | %.3f (%.3f; %.3f) | %.3f (%.3f) | %.3f (%.3f) | %.3f | %.2f | %ld\n", i,
                L.first_choice_repeat_rate, L.random_first_choice_rate, L.independent_first_choice_rate,
                L.top2_overlap_rate, L.random_top2_overlap_rate, L.top2_set_repeat_rate, L.random_top2_set_rate,
                L.load_cv, L.load_max_over_mean, (long)L.dead_experts);
  }
  return 0;
}

}  // namespace moeforge::cli
