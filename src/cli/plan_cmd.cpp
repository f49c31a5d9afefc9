// moeforge plan RECIPE [--nproc-per-node N] [--nnodes M] [--device-memory 80GB] [--device cpu|cuda] [--json]
//                      [--expert-load F] [--set key=value ...]
// Per rank: the bytes of weights, gradients, optimizer state, adapters, quantisation, a DPO reference and
// activations the recipe would take in that layout (model/memory_plan.h), whether it fits, and if not a layout
// or setting that would.
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>

#include "cli/cli.h"
#include "core/error.h"
#include "io/hf_checkpoint.h"
#include "model/memory_plan.h"
#include "model/param_count.h"
#include "recipe/recipe.h"

namespace moeforge::cli {

namespace {

std::string gb(double bytes) {
  char buf[32];
  if (bytes >= 1e9) std::snprintf(buf, sizeof buf, "%.2f GB", bytes / 1e9);
  else std::snprintf(buf, sizeof buf, "%.1f MB", bytes / 1e6);
  return buf;
}

std::string count(int64_t n) {
  char buf[32];
  const double d = static_cast<double>(n);
  if (d >= 1e9) std::snprintf(buf, sizeof buf, "%.2fB", d / 1e9);
  else std::snprintf(buf, sizeof buf, "%.1fM", d / 1e6);
  return buf;
}

int positive(const std::string& s, const std::string& flag) {
  char* end = nullptr;
  const long v = std::strtol(s.c_str(), &end, 10);
  if (s.empty() || *end || v <= 0 || v > 1 << 20) throw UserError("plan: " + flag + " must be a positive integer, got '" + s + "'");
  return static_cast<int>(v);
}

}  // namespace

int cmd_plan(const Args& in) {
  Args args = in;
  const bool json = take_flag(args, "--json");
  auto overrides = take_repeated(args, "--set");
  std::string nproc = "1", nnodes = "1", mem, device, load;
  take_option(args, "--nproc-per-node", &nproc);
  take_option(args, "--nnodes", &nnodes);
  take_option(args, "--device-memory", &mem);
  take_option(args, "--device", &device);
  take_option(args, "--expert-load", &load);
  reject_unknown_flags(args, "plan",
                       {"--json", "--set", "--nproc-per-node", "--nnodes", "--device-memory", "--device", "--expert-load"});
  if (args.size() != 1) throw UserError("plan: expected one RECIPE (usage: moeforge plan RECIPE [--nproc-per-node N] ...)");
  const train::Recipe r = train::load_recipe(args[0], overrides);
  train::refuse_no_op_keys(r, overrides);
  PlanInput p;
  p.model = r.model;
  p.finetune = r.finetune;
  p.precision = r.runtime.precision;
  p.stage = r.stage;
  p.dpo_reference = r.dpo.reference;
  p.micro_batch = r.train.micro_batch_size;
  p.seq_len = r.train.seq_len;
  p.recompute = r.train.activation_checkpointing;
  p.world = positive(nproc, "--nproc-per-node") * positive(nnodes, "--nnodes");
  p.expert = static_cast<int>(r.parallel_expert);
  p.zero = r.parallel_zero == 1;
  p.device = device.empty() ? (r.runtime.device == "cuda" ? "cuda" : "cpu") : device;
  if (p.device != "cpu" && p.device != "cuda") throw UserError("plan: --device must be cpu or cuda, got '" + device + "'");
  if (!load.empty()) {
    char* end = nullptr;
    p.expert_load = std::strtod(load.c_str(), &end);
    if (*end || !(p.expert_load >= 1.0) || p.expert_load > 1e3)
      throw UserError("plan: --expert-load must be a number >= 1 (the busiest rank's routed rows over the mean), got '" + load + "'");
  }
  // runtime.precision: auto is decided by a probe when the run starts: plan the precision that needs more.
  if (p.precision == "auto") {
    PlanInput f = p, b = p;
    f.precision = "fp32";
    b.precision = "bf16";
    p.precision = plan_rank(b).total >= plan_rank(f).total ? "bf16" : "fp32";
  }
  const RankPlan rp = plan_rank(p);
  const double limit = mem.empty() ? 0 : static_cast<double>(io::parse_size(mem, "--device-memory"));
  const PlanAdvice adv = limit > 0 ? advise(p, limit) : PlanAdvice{};
  const ParamCounts pc = count_params(p.model);
  struct Row {
    const char* label;
    const char* key;  // --json
    double bytes;
  };
  const Row rows[] = {{"weights", "weights", rp.weights},
                      {"compute copies", "compute_copies", rp.compute_copies},
                      {"gradients", "gradients", rp.gradients},
                      {"optimizer (AdamW)", "optimizer", rp.optimizer},
                      {"adapters", "adapters", rp.adapters},
                      {"DPO reference", "reference", rp.reference},
                      {"activations", "activations", rp.activations},
                      {"backward in flight", "backward", rp.backward},
                      {"logits", "logits", rp.logits},
                      {"runtime", "runtime", rp.runtime}};
  if (json) {
    nlohmann::json j = {{"recipe", args[0]}, {"world", p.world}, {"expert_parallel", p.expert},
                        {"zero", p.zero ? 1 : 0}, {"method", p.finetune.method}, {"precision", p.precision},
                        {"micro_batch", p.micro_batch}, {"seq_len", p.seq_len}, {"recompute", p.recompute},
                        {"device", p.device}, {"expert_load", p.expert > 1 ? p.expert_load : 1.0}, {"params_total", pc.total}, {"params_held_per_rank", rp.params_held},
                        {"trainable_per_rank", rp.trainable}, {"quant_overhead_bytes", rp.quant_overhead},
                        {"total_bytes", rp.total}};
    for (const auto& row : rows) j["bytes"][row.key] = row.bytes;
    if (limit > 0) {
      j["device_memory_bytes"] = limit;
      j["fits"] = adv.fits;
      if (!adv.fits) j["suggestion"] = adv.suggestion;
    }
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("%s: %s (%s parameters), %s, %s, micro-batch %ld x %ld, recomputation %s, %s\n", args[0].c_str(),
              p.model.name.c_str(), count(pc.total).c_str(), p.finetune.method.c_str(),
              (r.runtime.precision == "auto" ? "auto, planned as " + p.precision + " (the larger)" : p.precision).c_str(),
              (long)p.micro_batch, (long)p.seq_len, p.recompute.c_str(), p.device.c_str());
  std::printf("layout: %d processes = %d data-parallel x %d expert-parallel%s; per rank %s parameters held, %s trained\n",
              p.world, p.world / p.expert, p.expert, p.zero ? ", ZeRO-1" : "", count(rp.params_held).c_str(),
              count(rp.trainable).c_str());
  for (const auto& row : rows)
    if (row.bytes > 0) std::printf("  %-20s %12s\n", row.label, gb(row.bytes).c_str());
  if (rp.quant_overhead > 0) std::printf("  %-20s %12s  (included in weights)\n", "quantisation absmax", gb(rp.quant_overhead).c_str());
  std::printf("  %-20s %12s per rank\n", "total", gb(rp.total).c_str());
  if (limit > 0) {
    if (adv.fits) std::printf("fits in %s per rank\n", gb(limit).c_str());
    else std::printf("does not fit in %s per rank; try %s\n", gb(limit).c_str(), adv.suggestion.c_str());
  }
  return adv.fits ? 0 : 1;
}

}  // namespace moeforge::cli
