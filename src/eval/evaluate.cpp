#include "eval/evaluate.h"

#include <torch/torch.h>

#include <cmath>

namespace moeforge::train {

namespace {
double sum_ce(MixtralForCausalLM& model, const torch::Tensor& inputs, const torch::Tensor& targets,
              const torch::Device& device) {
  auto out = model->forward(inputs.to(device));
  auto logits = out.logits.reshape({-1, out.logits.size(-1)}).to(torch::kFloat);
  return torch::nn::functional::cross_entropy(
             logits, targets.to(device).reshape({-1}),
             torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
      .item<double>();
}
}  // namespace

EvalResult evaluate_lm(MixtralForCausalLM& model, data::LmSampler& sampler, int64_t batch_size, int64_t max_batches,
                       const torch::Device& device) {
  EvalModeGuard mg(model);
  torch::NoGradGuard ng;
  EvalResult r;
  double total = 0;
  const int64_t windows = sampler.num_windows();
  int64_t done = 0, batches = 0;
  while (done < windows && (max_batches <= 0 || batches < max_batches)) {
    const int64_t b = std::min(batch_size, windows - done);
    auto batch = sampler.batch(done, b);
    total += sum_ce(model, batch.inputs, batch.targets, device);
    r.tokens += batch.targets.numel();
    done += b;
    ++batches;
  }
  r.loss = r.tokens > 0 ? total / static_cast<double>(r.tokens) : 0.0;
  r.perplexity = std::exp(r.loss);
  return r;
}

EvalResult evaluate_tokens(MixtralForCausalLM& model, const std::vector<int64_t>& tokens, int64_t seq_len,
                           const torch::Device& device, std::vector<double>* logprobs) {
  EvalModeGuard mg(model);
  torch::NoGradGuard ng;
  EvalResult r;
  double total = 0;
  const int64_t n = static_cast<int64_t>(tokens.size());
  for (int64_t start = 0; start + 1 < n; start += seq_len) {
    const int64_t len = std::min(seq_len, n - 1 - start);
    auto all = torch::from_blob(const_cast<int64_t*>(tokens.data()) + start, {1, len + 1}, torch::kLong).clone();
    if (logprobs) {
      auto out = model->forward(all.narrow(1, 0, len).to(device));
      auto lp = torch::log_softmax(out.logits.reshape({len, -1}).to(torch::kFloat), -1)
                    .gather(1, all.narrow(1, 1, len).reshape({len, 1}).to(device))
                    .to(torch::kCPU, torch::kDouble);
      for (int64_t i = 0; i < len; ++i) logprobs->push_back(lp[i][0].item<double>());
      total -= lp.sum().item<double>();
    } else {
      total += sum_ce(model, all.narrow(1, 0, len), all.narrow(1, 1, len), device);
    }
    r.tokens += len;
  }
  r.loss = r.tokens > 0 ? total / static_cast<double>(r.tokens) : 0.0;
  r.perplexity = std::exp(r.loss);
  return r;
}

}  // namespace moeforge::train
