#include "model/chunked_loss.h"

#include <torch/torch.h>

#include <algorithm>

#include "core/error.h"

namespace moeforge {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct ChunkedCrossEntropy : public torch::autograd::Function<ChunkedCrossEntropy> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                            const at::Tensor& targets, int64_t ignore_index, int64_t chunk) {
    const bool need_h = hidden.requires_grad(), need_w = weight.requires_grad();
    const auto dt = hidden.scalar_type();
    const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;  // the log-softmax in fp32 at least
    const auto N = hidden.size(0), V = weight.size(0);
    const at::Tensor w = weight.scalar_type() == dt ? weight.detach() : weight.detach().to(dt);
    const at::Tensor h = hidden.detach();
    const at::Tensor valid = targets.ne(ignore_index);
    const at::Tensor safe = targets.masked_fill(valid.logical_not(), 0).unsqueeze(1);  // [N, 1]
    const at::Tensor validf = valid.to(acc).unsqueeze(1);                            // [N, 1]
    // 1 / (number of valid rows), kept on the device (no host synchronisation).
    const at::Tensor inv = validf.sum().clamp_min(1.0).reciprocal();
    at::Tensor nll = at::zeros({}, hidden.options().dtype(acc));
    at::Tensor grad_h = need_h ? at::empty_like(h) : at::Tensor();
    at::Tensor grad_w = need_w ? at::zeros({V, h.size(1)}, weight.options().dtype(acc)) : at::Tensor();
    for (int64_t s = 0; s < N; s += chunk) {
      const int64_t n = std::min(chunk, N - s);
      const auto x = h.narrow(0, s, n);
      const auto t = safe.narrow(0, s, n);
      const auto m = validf.narrow(0, s, n);
      at::Tensor logp = at::log_softmax(at::mm(x, w.t()).to(acc), -1);  // [n, V], fp32 or fp64
      nll.sub_((logp.gather(1, t) * m).sum());
      if (!need_h && !need_w) continue;
      // d loss / d logits = (softmax - onehot(target)) * valid / n_valid, formed in place.
      at::Tensor g = logp.exp_();
      g.scatter_add_(1, t, at::full({n, 1}, -1.0, g.options()));
      g.mul_(m * inv);
      const at::Tensor gc = g.scalar_type() == dt ? g : g.to(dt);
      if (need_h) grad_h.narrow(0, s, n).copy_(at::mm(gc, w));
      if (need_w) {
        if (dt == acc)
          grad_w.addmm_(gc.t(), x);
        else
          grad_w.add_(at::mm(gc.t(), x));
      }
    }
    if (ctx) {  // null when called without a graph
      ctx->saved_data["grad_h"] = grad_h;
      ctx->saved_data["grad_w"] = need_w ? grad_w.to(weight.scalar_type()) : at::Tensor();
    }
    return nll * inv;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    const at::Tensor g = grad_out[0];
    auto saved = [&](const char* key) {
      const auto& v = ctx->saved_data[key];
      return v.isTensor() ? v.toTensor() : at::Tensor();
    };
    at::Tensor gh = saved("grad_h"), gw = saved("grad_w");
    if (gh.defined()) gh = gh * g.to(gh.scalar_type());
    if (gw.defined()) gw = gw * g.to(gw.scalar_type());
    return {gh, gw, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

int64_t chunked_loss_rows(int64_t vocab) {
  return std::clamp<int64_t>((int64_t{1} << 21) / std::max<int64_t>(vocab, 1), 64, 1024);
}

at::Tensor chunked_lm_cross_entropy(const at::Tensor& hidden_NH, const at::Tensor& weight_VH, const at::Tensor& targets_N,
                                    int64_t ignore_index, int64_t chunk_rows) {
  MF_CHECK(hidden_NH.dim() == 2 && weight_VH.dim() == 2 && hidden_NH.size(1) == weight_VH.size(1),
           "chunked_lm_cross_entropy: hidden [N, H] and weight [V, H]");
  MF_CHECK(targets_N.dim() == 1 && targets_N.size(0) == hidden_NH.size(0), "chunked_lm_cross_entropy: one target per row");
  const int64_t V = weight_VH.size(0);
  const int64_t chunk = chunk_rows > 0 ? chunk_rows : chunked_loss_rows(V);
  if (!torch::GradMode::is_enabled()) {
    // No graph: the loss alone (the autograd function would form no gradients either, but skip its bookkeeping).
    torch::NoGradGuard ng;
    return ChunkedCrossEntropy::forward(nullptr, hidden_NH.detach(), weight_VH.detach(), targets_N, ignore_index, chunk);
  }
  return ChunkedCrossEntropy::apply(hidden_NH, weight_VH, targets_N, ignore_index, chunk);
}

}  // namespace moeforge
