#include "model/generate.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include "core/error.h"

namespace moeforge {

namespace {

int64_t pick(const torch::Tensor& logits_V, const SamplingOptions& opt, at::Generator& gen) {
  auto l = logits_V.to(torch::kFloat).to(torch::kCPU);
  // Rows past the tokenizer (an embedding padded beyond it) are never produced: no piece would decode them.
  if (opt.vocab_limit > 0 && opt.vocab_limit < l.size(0)) l = l.narrow(0, 0, opt.vocab_limit);
  if (opt.temperature <= 0) return l.argmax().item<int64_t>();
  auto probs = torch::softmax(l / opt.temperature, -1);
  if (opt.top_p < 1.0) {
    auto sorted = probs.sort(-1, /*descending=*/true);
    auto p = std::get<0>(sorted), idx = std::get<1>(sorted);
    auto cum = p.cumsum(-1);
    // Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    auto drop = (cum - p).gt(opt.top_p);
    p = p.masked_fill(drop, 0.0);
    probs = torch::zeros_like(probs).scatter(0, idx, p);
  }
  return torch::multinomial(probs / probs.sum(), 1, /*replacement=*/false, gen).item<int64_t>();
}

}  // namespace

std::vector<int64_t> generate(MixtralForCausalLM& model, const std::vector<int64_t>& prompt, const SamplingOptions& opt,
                              const std::function<void(int64_t)>& on_token) {
  if (prompt.empty()) throw UserError("generation: the prompt is empty");
  EvalModeGuard em(model);
  torch::NoGradGuard ng;
  auto device = model->model->embed_tokens->weight.device();
  const int64_t max_len = static_cast<int64_t>(prompt.size()) + opt.max_new_tokens;
  if (!model->config().sliding_window && max_len > model->config().max_position_embeddings)
    throw UserError("generation: prompt + max-new-tokens = " + std::to_string(max_len) +
                    " exceeds the model's max_position_embeddings (" +
                    std::to_string(model->config().max_position_embeddings) + ")");
  KVCache cache = model->make_cache(1, max_len);
  at::Generator gen = at::detail::createCPUGenerator(opt.seed);
  auto ids = torch::tensor(prompt, torch::kLong).view({1, -1}).to(device);
  auto logits = model->forward_cached(ids, cache);
  std::vector<int64_t> out;
  for (int64_t step = 0; step < opt.max_new_tokens; ++step) {
    int64_t tok = pick(logits[0][-1], opt, gen);
    if (opt.agree) tok = opt.agree(tok);
    if (tok == opt.eos_id) break;
    out.push_back(tok);
    if (on_token) on_token(tok);
    if (step + 1 == opt.max_new_tokens) break;
    logits = model->forward_cached(torch::full({1, 1}, tok, torch::TensorOptions().dtype(torch::kLong).device(device)),
                                   cache);
  }
  return out;
}

std::vector<int64_t> generate_uncached_greedy(MixtralForCausalLM& model, const std::vector<int64_t>& prompt,
                                              int64_t max_new_tokens, int64_t eos_id) {
  EvalModeGuard em(model);
  torch::NoGradGuard ng;
  std::vector<int64_t> seq = prompt, out;
  for (int64_t step = 0; step < max_new_tokens; ++step) {
    auto logits = model->forward(torch::tensor(seq, torch::kLong).view({1, -1})).logits;
    int64_t tok = logits[0][-1].argmax().item<int64_t>();
    if (tok == eos_id) break;
    out.push_back(tok);
    seq.push_back(tok);
  }
  return out;
}

}  // namespace moeforge
