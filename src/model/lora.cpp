#include "model/lora.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "model/mixed.h"

namespace moeforge {

const std::vector<std::string>& lora_target_names() {
  static const std::vector<std::string> v{"q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3", "gate"};
  return v;
}

bool is_expert_target(const std::string& t) { return t == "w1" || t == "w2" || t == "w3"; }

bool is_lora_target(const std::string& t) {
  const auto& known = lora_target_names();
  return t == "lm_head" || std::find(known.begin(), known.end(), t) != known.end();
}

std::vector<std::string> resolve_lora_targets(const std::vector<std::string>& given, const std::string& where) {
  if (given.empty()) throw UserError(where + ": key 'finetune.lora.targets': names no module");
  std::vector<std::string> out;
  auto add = [&](const std::string& t) {
    if (std::find(out.begin(), out.end(), t) == out.end()) out.push_back(t);
  };
  for (const auto& g : given) {
    if (g == "all") {
      for (const auto& t : lora_target_names()) add(t);
      continue;
    }
    if (!is_lora_target(g))
      throw UserError(where + ": key 'finetune.lora.targets': unknown module '" + g +
                      "' (q_proj, k_proj, v_proj, o_proj, w1, w2, w3, gate, lm_head or all)");
    add(g);
  }
  return out;
}

bool LoraSpec::targets_module(const std::string& name) const {
  return std::find(targets.begin(), targets.end(), name) != targets.end();
}

int64_t LoraSpec::rank_of(const std::string& target) const {
  return is_expert_target(target) && expert_rank > 0 ? expert_rank : rank;
}

double LoraSpec::scale_of(const std::string& target) const {
  const double r = static_cast<double>(rank_of(target));
  return rslora ? alpha / std::sqrt(r) : alpha / r;
}

namespace {

at::Tensor dropped(const at::Tensor& x, const LoraRuntime& rt, bool training) {
  if (!training || rt.dropout <= 0) return x;
  // Inverted dropout with the adapters' own generator (a resumed run continues the same stream), drawn on the
  // CPU (the generator's device), so the masks are the same on every device.
  auto keep = at::empty(x.sizes(), at::TensorOptions().dtype(at::kFloat)).bernoulli_(1.0 - rt.dropout, rt.gen);
  return x * keep.to(x.device(), x.scalar_type()) * (1.0 / (1.0 - rt.dropout));
}

}  // namespace

LoraAdapter folded(const LoraAdapter& a, at::ScalarType dtype) {
  return {a.A.to(dtype), (a.B * a.scale).to(dtype), 1.0};
}

at::Tensor add_lora(const at::Tensor& y, const at::Tensor& x, const LoraAdapter& f, const LoraRuntime& rt,
                    bool training) {
  const int64_t r = f.A.size(0), out = f.B.size(0);
  auto h = at::matmul(dropped(x, rt, training), f.A.t()).reshape({-1, r});  // [N, r]
  return at::addmm(y.reshape({-1, out}), h, f.B.t()).view(y.sizes());
}

at::Tensor adapted_linear(const at::Tensor& x, const at::Tensor& w, const LinearExtras* extras, const LoraRuntime* rt,
                          bool training) {
  at::Tensor y = extras && extras->quant ? quantized_linear(x, extras->quant) : mixed_linear(x, w);
  if (extras && extras->lora.defined() && rt && rt->enabled) {
    // Expert slices come folded by their bank (scale 1, compute dtype); attention and router adapters here.
    const auto& a = extras->lora;
    y = add_lora(y, x, a.A.scalar_type() == x.scalar_type() && a.scale == 1.0 ? a : folded(a, x.scalar_type()), *rt,
                 training);
  }
  return y;
}

}  // namespace moeforge
