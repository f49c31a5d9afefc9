// Activation recomputation (activation checkpointing): a piece of the forward runs without keeping its
// autograd graph, and runs again in the backward, with grad enabled, when its gradient is needed. Memory
// for the piece's intermediate activations is traded for a second forward of it.
#pragma once
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <vector>

namespace moeforge {

// What a decoder layer recomputes: nothing, the whole layer, or the MoE block only (its norm, router,
// dispatch and experts: the [N*k, intermediate] expert activations are most of a layer's memory).
enum class Recompute { None, Full, Moe };
Recompute parse_recompute(const std::string& name);  // none | full | moe
const char* recompute_name(Recompute r);

// The recomputed function: differentiable inputs in, floating-point outputs out. It must compute the
// same values when run again (its randomness comes from `generators`, see below).
using RecomputeFn = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;

// Runs fn(inputs) now without a graph and returns its outputs attached to one autograd node; that node's
// backward runs fn again on detached copies of the inputs and backpropagates the incoming gradients
// through the second run (parameter gradients accumulate as usual; the inputs' gradients flow on).
// `generators` are set back to the state they had at the first run for the second one and then restored,
// so random draws (router jitter) repeat exactly and the streams go on as if there had been one run.
// Outputs with no incoming gradient are skipped in the backward (an unused router logit, say). The second run
// accumulates into the parameters' .grad like any backward does, so this is for loss.backward(), not for
// torch::autograd::grad (which would find its parameter gradients in .grad instead of its result).
std::vector<at::Tensor> run_recomputed(RecomputeFn fn, const std::vector<at::Tensor>& inputs,
                                       std::vector<at::Generator> generators = {});

}  // namespace moeforge
