#include "model/memory_plan.h"

#include <algorithm>

#include "core/error.h"
#include "model/chunked_loss.h"
#include "model/param_count.h"

namespace moeforge {

namespace {

// Bytes autograd keeps per token of one decoder layer until the backward reaches it (no recomputation),
// counted from the model code: f = fp32, c = the compute dtype's bytes.
//  attention: the norm's fp32 input and its compute-dtype output (shared by q, k, v); q and the keys and
//    values repeated to every query head (the score and value matmuls keep them); the scores' fp32 softmax
//    output and its compute-dtype copy over the whole [T, T] matrix (LibTorch 1.13 on the CPU has no fused
//    attention; on CUDA, 2.x's fused kernel keeps a log-sum-exp per query instead); the merged heads (o_proj's
//    input).
//  MoE: the post-attention norm's input and output, router logits and probabilities (fp32), the dispatched
//    rows, per routed copy h1, sigmoid(h1), silu, h3 and their product (w2's input), the experts' output and its
//    regrouped copy for the weighted combine; with shared experts (width S I) per token h1, sigmoid(h1), silu, h3
//    and their product, the output, and the gate's logit and sigmoid (fp32).
double layer_bytes_per_token(const ModelConfig& m, double c, int64_t T, bool attention, bool moe, bool fused_attention,
                             double load) {
  const double f = 4, H = static_cast<double>(m.hidden_size), I = static_cast<double>(m.intermediate_size);
  const double q = static_cast<double>(m.q_dim()), nh = static_cast<double>(m.num_attention_heads);
  const double E = static_cast<double>(m.moe.num_experts), k = static_cast<double>(m.moe.num_experts_per_tok);
  double b = 0;
  // LibTorch 2.x's fused attention (CUDA) keeps the output and a log-sum-exp per query instead of the matrix.
  const double scores = fused_attention ? f * nh : (f + c) * nh * static_cast<double>(T);
  if (attention) b += f * H + c * H + 3 * c * q + scores + c * q;
  if (moe) b += f * H + c * H + 2 * f * E + load * (k * c * H + k * 5 * c * I + 2 * k * c * H);
  if (moe && m.moe.num_shared_experts > 0)
    b += 5 * c * static_cast<double>(m.shared_intermediate_size()) + c * H + (m.moe.shared_expert_gate ? 2 * f : 0);
  return b;
}

}  // namespace

RankPlan plan_rank(const PlanInput& in) {
  const ModelConfig& m = in.model;
  if (in.expert < 1 || in.world % in.expert != 0)
    throw UserError("plan: parallel.expert " + std::to_string(in.expert) + " does not divide the " +
                    std::to_string(in.world) + " processes");
  if (m.moe.num_experts % in.expert != 0)
    throw UserError("plan: parallel.expert " + std::to_string(in.expert) + " does not divide model.moe.num_experts (" +
                    std::to_string(m.moe.num_experts) + ")");
  const ParamCounts p = count_params(m);
  const int EP = in.expert, DP = in.world / in.expert;
  const double experts_rank = static_cast<double>(p.experts) / EP;
  const double dense = static_cast<double>(p.total - p.experts);
  const bool bf16 = in.precision == "bf16";
  const double c = bf16 ? 2 : 4;
  RankPlan r;
  r.params_held = static_cast<int64_t>(dense + experts_rank);
  const FinetuneSpec& ft = in.finetune;
  const double zero_dense = in.zero ? 1.0 / in.world : 1.0, zero_experts = in.zero ? 1.0 / DP : 1.0;
  if (!ft.adapters()) {
    r.trainable = r.params_held;
    r.weights = 4 * (dense + experts_rank);
    r.gradients = 4 * (dense + experts_rank);
    r.optimizer = 8 * (dense * zero_dense + experts_rank * zero_experts);
    // The matmuls' bf16 weight copies stay in the graph until the backward (one layer's under full
    // recomputation): attention, this rank's experts, the shared experts, the LM head.
    if (bf16) {
      const double per_layer = static_cast<double>(p.attention + p.experts / EP + p.shared) / static_cast<double>(m.num_layers);
      const double layers = in.recompute == "full" ? 1.0 : static_cast<double>(m.num_layers);
      r.compute_copies = 2 * (per_layer * layers + static_cast<double>(p.lm_head));
    }
  } else {
    // The frozen base: attention and this rank's experts as stored (bf16 / quantised), the rest fp32.
    const double linear = static_cast<double>(p.attention) + experts_rank;
    const double rest = dense - static_cast<double>(p.attention);
    if (ft.quantized()) {
      const double bs = static_cast<double>(ft.quant.block_size);
      const double codes = ft.quant.type == QuantType::NF4 ? 0.5 : 1.0;
      r.quant_overhead = linear * (ft.quant.double_quant ? 1.0 / bs + 4.0 / (bs * 256) : 4.0 / bs);
      r.weights = linear * codes + r.quant_overhead + 4 * rest;
    } else {
      r.weights = linear * (bf16 ? 2 : 4) + 4 * rest;
    }
    // Adapters: the whole model's, with the experts' split like the experts.
    const FinetuneEstimate whole = estimate_finetune(m, ft, bf16);
    const LoraSpec& l = ft.lora;
    auto adapter = [&](const char* t, int64_t a, int64_t b) { return l.targets_module(t) ? l.rank_of(t) * (a + b) : 0; };
    const int64_t H = m.hidden_size, I = m.intermediate_size;
    const double expert_adapters = static_cast<double>(m.num_layers * m.moe.num_experts *
                                                       (adapter("w1", H, I) + adapter("w2", I, H) + adapter("w3", H, I)));
    const double non_expert = static_cast<double>(whole.trainable) - expert_adapters;
    const double t = non_expert + expert_adapters / EP;
    r.trainable = static_cast<int64_t>(t);
    r.adapters = 4 * t;
    r.gradients = 4 * t;
    r.optimizer = 8 * (non_expert * zero_dense + expert_adapters / EP * zero_experts);
    // QLoRA: one weight dequantised at a time (to the compute dtype), not kept.
    if (ft.quantized()) r.compute_copies = c * static_cast<double>(std::max(m.intermediate_size * m.hidden_size, m.q_dim() * m.hidden_size));
  }
  // DPO's frozen reference: a second copy of what the rank holds, fp32, sharded like the policy.
  std::string ref = in.dpo_reference;
  if (ref == "auto") ref = ft.adapters() ? "adapters_off" : "frozen";
  if (in.stage == "dpo" && ref == "frozen") r.reference = 4 * (dense + experts_rank);
  // Activations of one micro-batch (DPO: chosen and rejected, twice the rows).
  const double rows = static_cast<double>(in.micro_batch) * (in.stage == "dpo" ? 2 : 1);
  const double tokens = rows * static_cast<double>(in.seq_len);
  const double L = static_cast<double>(m.num_layers);
  const bool fused = in.device == "cuda";
  const double load = in.expert > 1 ? in.expert_load : 1.0;  // one rank holding every expert sees k rows a token
  const double whole_layer = layer_bytes_per_token(m, c, in.seq_len, true, true, fused, load);
  double per_token;
  if (in.recompute == "full") per_token = L * 4 * static_cast<double>(m.hidden_size) + whole_layer;  // inputs + one layer
  else if (in.recompute == "moe")
    per_token = L * (layer_bytes_per_token(m, c, in.seq_len, true, false, fused, load) + 4.0 * m.hidden_size) + whole_layer;
  else per_token = L * whole_layer;
  r.activations = tokens * per_token;
  r.backward = tokens * whole_layer;
  // Logits: compute-dtype logits and their fp32 log-softmax; in the backward the NLL's dense fp32 gradient, the
  // log-softmax's fp32 gradient and the compute-dtype gradient of the logits. Pretraining in bf16 with a plain
  // head runs the head and the loss chunk by chunk (model/chunked_loss.h): one chunk's compute-dtype and fp32
  // logits (about 2 M of them), and the gradients of the hidden states (compute dtype) and of the head (fp32).
  const bool plain_head = !(ft.adapters() && ft.lora.targets_module("lm_head"));
  if (in.stage == "pretrain" && bf16 && plain_head) {
    const double chunk_rows = static_cast<double>(chunked_loss_rows(m.vocab_size));
    r.logits = std::min(tokens, chunk_rows) * static_cast<double>(m.vocab_size) * (c + 4) +
               tokens * static_cast<double>(m.hidden_size) * c + 4.0 * static_cast<double>(p.lm_head);
  } else {
    r.logits = tokens * static_cast<double>(m.vocab_size) * (c + 4 + 4 + 4 + c);
  }
  // The process: on CPU measured (memory_plan.h); on CUDA the context and the caching allocator's slack, an
  // estimate not yet measured (no GPU has been lent to this project).
  r.runtime = in.device == "cuda" ? 1024.0 * (1 << 20) : 185.0 * (1 << 20);
  r.total = r.weights + r.compute_copies + r.gradients + r.optimizer + r.adapters + r.reference + r.activations +
            r.backward + r.logits + r.runtime;
  return r;
}

PlanAdvice advise(const PlanInput& in, double device_bytes) {
  PlanAdvice a;
  if (plan_rank(in).total <= device_bytes) return a;
  a.fits = false;
  auto fits = [&](const PlanInput& x) { return plan_rank(x).total <= device_bytes; };
  auto describe_layout = [](const PlanInput& x) {
    return std::to_string(x.world) + " processes, parallel.expert " + std::to_string(x.expert) +
           (x.zero ? ", parallel.zero 1" : "");
  };
  // More expert parallelism within the world, then ZeRO-1, then recomputation, then adapters, then smaller
  // micro-batches, then more processes (each a power of two up to 1024).
  for (int ep = in.expert * 2; ep <= in.world && in.model.moe.num_experts % ep == 0; ep *= 2) {
    if (in.world % ep != 0) continue;
    PlanInput x = in;
    x.expert = ep;
    if (fits(x)) return a.suggestion = "parallel.expert: " + std::to_string(ep) + " (" + describe_layout(x) + ")", a;
  }
  PlanInput x = in;
  if (!x.zero && x.world / x.expert > 1) {
    x.zero = true;
    if (fits(x)) return a.suggestion = "parallel.zero: 1", a;
  }
  if (x.recompute != "full") {
    x.recompute = "full";
    if (fits(x)) return a.suggestion = "train.activation_checkpointing: full" + std::string(x.zero != in.zero ? " and parallel.zero: 1" : ""), a;
  }
  for (const char* method : {"lora", "qlora"}) {
    if (x.finetune.method == method || (x.finetune.method == "qlora")) continue;
    PlanInput y = x;
    y.finetune.method = method;
    if (fits(y)) return a.suggestion = std::string("finetune.method: ") + method + " (with activation_checkpointing: full)", a;
  }
  for (int64_t mb = x.micro_batch / 2; mb >= 1; mb /= 2) {
    PlanInput y = x;
    y.micro_batch = mb;
    if (fits(y)) return a.suggestion = "train.micro_batch_size: " + std::to_string(mb) + " (raise grad_accum to keep the batch), with activation_checkpointing: full", a;
  }
  for (int w = in.world * 2; w <= 1024; w *= 2) {
    for (int ep = 1; ep <= w && in.model.moe.num_experts % ep == 0; ep *= 2) {
      PlanInput y = in;
      y.world = w;
      y.expert = ep;
      y.zero = w / ep > 1;
      if (fits(y)) return a.suggestion = "more processes: " + describe_layout(y), a;
    }
  }
  a.suggestion = "nothing within 1024 processes; use QLoRA with recomputation and micro-batch 1";
  return a;
}

}  // namespace moeforge
