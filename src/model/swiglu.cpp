#include "model/swiglu.h"

#include <torch/torch.h>

#include "core/error.h"

namespace moeforge {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct SwiGLUGate : public torch::autograd::Function<SwiGLUGate> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h13) {
    MF_CHECK(h13.dim() == 2 && h13.size(1) % 2 == 0, "swiglu_gate: [n, 2I] input");
    const int64_t I = h13.size(1) / 2;
    const auto h1 = h13.narrow(1, 0, I), h3 = h13.narrow(1, I, I);
    // silu as h1 * sigmoid(h1): LibTorch 1.13's bf16 silu is a scalar loop (experts.cpp)
    auto s = at::sigmoid(h1);
    auto a = h1 * s;
    ctx->save_for_backward({h13, s, a});
    return a * h3;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const auto &h13 = saved[0], &s = saved[1], &a = saved[2];
    const at::Tensor g = grad_out[0].contiguous();
    const int64_t I = h13.size(1) / 2;
    auto d13 = at::empty_like(h13, at::MemoryFormat::Contiguous);
    auto dh1 = d13.narrow(1, 0, I), dh3 = d13.narrow(1, I, I);
    at::mul_out(dh3, g, a);  // d(a h3)/dh3 = a
    // d silu(h1)/dh1 = s (1 + h1 (1 - s)) = s + a (1 - s) = a + s (1 - a)
    auto u = at::addcmul(a, s, at::rsub(a, 1.0));
    at::mul_out(dh1, at::mul(g, h13.narrow(1, I, I)), u);
    return {d13};
  }
};

}  // namespace

at::Tensor swiglu_gate(const at::Tensor& h13_N2I) { return SwiGLUGate::apply(h13_N2I); }

}  // namespace moeforge
