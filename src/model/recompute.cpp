#include "model/recompute.h"

#include <ATen/core/ivalue.h>
#include <torch/autograd.h>
#include <torch/torch.h>

#include "core/error.h"

namespace moeforge {

Recompute parse_recompute(const std::string& name) {
  if (name == "none") return Recompute::None;
  if (name == "full") return Recompute::Full;
  if (name == "moe") return Recompute::Moe;
  throw UserError("activation checkpointing must be none, full or moe, got '" + name + "'");
}

const char* recompute_name(Recompute r) {
  switch (r) {
    case Recompute::Full: return "full";
    case Recompute::Moe: return "moe";
    default: return "none";
  }
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct RecomputeState : torch::CustomClassHolder {
  RecomputeFn fn;
  std::vector<at::Generator> generators;
  std::vector<at::Tensor> states;  // of `generators` before the first run
  std::vector<bool> needs_grad;    // per input
};

class RecomputeFunction : public torch::autograd::Function<RecomputeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs, c10::intrusive_ptr<RecomputeState> st) {
    ctx->set_materialize_grads(false);
    // The last input is a marker that always requires grad (see run_recomputed); fn never sees it.
    std::vector<at::Tensor> in(inputs.begin(), inputs.end() - 1);
    ctx->save_for_backward(in);
    ctx->saved_data["state"] = c10::IValue::make_capsule(st);
    return st->fn(in);  // grad mode is off here: no graph is kept
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto st = c10::static_intrusive_pointer_cast<RecomputeState>(ctx->saved_data["state"].toCapsule());
    const variable_list saved = ctx->get_saved_variables();
    std::vector<at::Tensor> in;
    in.reserve(saved.size());
    for (size_t i = 0; i < saved.size(); ++i) {
      const bool g = st->needs_grad[i] && saved[i].defined();
      in.push_back(g ? saved[i].detach().requires_grad_(true) : saved[i]);
    }
    std::vector<at::Tensor> now;
    for (size_t i = 0; i < st->generators.size(); ++i) {
      now.push_back(st->generators[i].get_state());
      st->generators[i].set_state(st->states[i]);
    }
    std::vector<at::Tensor> out;
    {
      torch::AutoGradMode on(true);
      out = st->fn(in);
    }
    for (size_t i = 0; i < st->generators.size(); ++i) st->generators[i].set_state(now[i]);
    MF_CHECK(out.size() == grads.size(), "the recomputed function returned a different number of outputs");
    std::vector<at::Tensor> roots, root_grads;
    for (size_t i = 0; i < out.size(); ++i) {
      if (!grads[i].defined() || !out[i].requires_grad()) continue;
      roots.push_back(out[i]);
      root_grads.push_back(grads[i]);
    }
    if (!roots.empty()) torch::autograd::backward(roots, root_grads);
    variable_list result;
    for (size_t i = 0; i < in.size(); ++i)
      result.push_back(st->needs_grad[i] && in[i].defined() ? in[i].grad() : at::Tensor());
    result.emplace_back();  // the marker
    result.emplace_back();  // the state
    return result;
  }
};

}  // namespace

std::vector<at::Tensor> run_recomputed(RecomputeFn fn, const std::vector<at::Tensor>& inputs,
                                       std::vector<at::Generator> generators) {
  if (!torch::GradMode::is_enabled()) return fn(inputs);  // evaluation: nothing to recompute
  auto st = c10::make_intrusive<RecomputeState>();
  st->fn = std::move(fn);
  st->generators = std::move(generators);
  for (auto& g : st->generators) st->states.push_back(g.get_state());
  for (const auto& t : inputs) st->needs_grad.push_back(t.defined() && t.requires_grad());
  // A marker that requires grad, so the node is part of the graph even when no input requires grad
  // (the parameters inside fn still do).
  std::vector<at::Tensor> all = inputs;
  at::TensorOptions opts;
  for (const auto& t : inputs)
    if (t.defined()) {
      opts = t.options();
      break;
    }
  all.push_back(torch::empty({0}, opts.dtype(torch::kFloat).requires_grad(true)));
  return RecomputeFunction::apply(at::TensorList(all), st);
}

}  // namespace moeforge
