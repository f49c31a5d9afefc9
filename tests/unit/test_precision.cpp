// Mixed precision (bf16 compute, fp32 master weights) and activation recomputation, against independent
// references: fp64 finite differences, the fp32 computation, the same model without recomputation.
//
// Tolerances come from bf16's precision: 8 significant bits, so unit roundoff u = 2^-8 (the largest relative
// error of one rounding to nearest) and machine epsilon 2^-7 (the spacing of bf16 numbers at 1). A rounding
// error is spread about uniformly over [-u, u] relative (rms u / sqrt(3)) with a random sign, so norm-wise
// errors over many entries sit well below the worst case of each entry.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "core/error.h"
#include "data/preference.h"
#include "model/decoder.h"
#include "model/load_balance.h"
#include "model/moe_block.h"
#include "model/rope.h"
#include "moe_block_util.h"
#include "test_util.h"
#include "objective/dpo_objective.h"

using namespace moeforge;
using test::make_moe_block;

namespace {

constexpr double kBf16U = 1.0 / 256;  // 2^-8

double rel_err(const torch::Tensor& a, const torch::Tensor& ref) {
  auto d = a.to(torch::kDouble) - ref.to(torch::kDouble);
  return (d.norm() / ref.to(torch::kDouble).norm()).item<double>();
}

}  // namespace

// The gradients of the MoE block computed in bf16 (fp32 weights cast to bf16 for the expert matmuls) against
// central finite differences of the same block in fp64. Each sampled gradient entry is a sum of products of
// bf16-rounded inputs, weights and intermediate activations (x, w1/w3 x, the SwiGLU, w2 .): about six roundings
// on each path, each up to u, together about sqrt(6) u / sqrt(3) = 1.4u rms; the norm-wise relative error over
// the sampled entries is asserted below 4u. It also requires the error to be above 1e-4, which fp32 arithmetic
// (~1e-7) cannot reach: the bf16 path really ran.
TEST(MixedPrecision, MoEBlockGradientsAgainstFp64FiniteDifferences) {
  const int64_t H = 32, I = 48, E = 4, K = 2, N = 48;
  auto b = make_moe_block(H, I, E, K, 7);
  auto b64 = make_moe_block(H, I, E, K, 7);
  b64->to(torch::kDouble);
  torch::manual_seed(4);
  auto x = torch::randn({N, H}, torch::kDouble);
  auto upstream = torch::randn({N, H}, torch::kDouble);

  auto out = b->forward(x.to(torch::kFloat), torch::kBFloat16);
  ASSERT_EQ(out.y.scalar_type(), torch::kBFloat16);
  (out.y.to(torch::kDouble) * upstream).sum().backward();
  auto routing = out.router.topk_idx_NK.clone();

  auto loss64 = [&] {
    torch::NoGradGuard ng;
    auto o = b64->forward(x);
    EXPECT_TRUE(torch::equal(o.router.topk_idx_NK, routing)) << "a finite-difference step flipped a routing choice";
    return (o.y * upstream).sum().item<double>();
  };
  const double eps = 1e-6;
  std::vector<double> analytic, numeric;
  torch::manual_seed(5);
  auto p64 = b64->named_parameters();
  for (auto& p : b->named_parameters()) {
    if (!p.value().grad().defined()) continue;  // an expert without tokens
    ASSERT_EQ(p.value().grad().scalar_type(), torch::kFloat) << p.key() << ": the master weight's gradient is fp32";
    auto w = p64[p.key()].view({-1});
    auto g = p.value().grad().view({-1});
    for (int rep = 0; rep < 12; ++rep) {
      const int64_t i = torch::randint(0, w.numel(), {1}, torch::kLong).item<int64_t>();
      const double orig = w[i].item<double>();
      torch::NoGradGuard ng;
      w[i] = orig + eps;
      const double lp = loss64();
      w[i] = orig - eps;
      const double lm = loss64();
      w[i] = orig;
      numeric.push_back((lp - lm) / (2 * eps));
      analytic.push_back(g[i].item<double>());
    }
  }
  ASSERT_GT(analytic.size(), 100u);
  const double err = rel_err(torch::tensor(analytic, torch::kDouble), torch::tensor(numeric, torch::kDouble));
  EXPECT_LT(err, 4 * kBf16U);
  EXPECT_GT(err, 1e-4) << "no bf16 rounding in the gradients: the experts did not compute in bf16";
}

// The router decides in fp32 even when the experts compute in bf16. The case is built so that bf16 would
// choose differently: expert 0's logit is 1.0040 (its weight 1.0040 rounds to 1.0078 in bf16), expert 1's is
// 1.0038 x 1.0004 = 1.00420 (weight and input both round to 1.0 in bf16). In fp32 expert 1 wins (1.00420 >
// 1.00400); with the weight or the input in bf16, expert 0 does (1.0078 > 1.0).
TEST(MixedPrecision, RouterDecidesInFp32) {
  auto b = make_moe_block(4, 8, 4, 1, 3);
  {
    torch::NoGradGuard ng;
    b->gate->weight.copy_(torch::tensor({{1.0040f, 0.f, 0.f, 0.f}, {0.f, 1.0038f, 0.f, 0.f}, {0.f, 0.f, -5.f, 0.f},
                                         {0.f, 0.f, 0.f, -5.f}}));
  }
  auto x = torch::tensor({{1.0f, 1.0004f, 1.0f, 1.0f}});
  auto fp32 = b->forward(x);
  auto mixed = b->forward(x, torch::kBFloat16);
  EXPECT_EQ(fp32.router.topk_idx_NK.item<int64_t>(), 1);
  EXPECT_EQ(mixed.router.topk_idx_NK.item<int64_t>(), 1) << "the router decided in bf16";
  EXPECT_EQ(mixed.router.logits_NE.scalar_type(), torch::kFloat);
  EXPECT_TRUE(torch::equal(mixed.router.logits_NE, fp32.router.logits_NE));
  // What a bf16 router would have done (the premise of the test).
  auto w16 = b->gate->weight.to(torch::kBFloat16).to(torch::kFloat), x16 = x.to(torch::kBFloat16).to(torch::kFloat);
  EXPECT_EQ(torch::matmul(x16, w16.t()).argmax(-1).item<int64_t>(), 0);
}

// In a decoder layer computing in bf16 the router still gets the fp32 output of the post-attention norm: its
// logits equal the fp32 product of that norm output and the fp32 gate weight (to 1e-6: another matmul call),
// while rounding the input to bf16 first, as the experts get it, changes them by far more.
TEST(MixedPrecision, RouterInputIsTheFp32NormOutput) {
  ModelConfig c = test::tiny_config();
  DecoderLayer layer(c);
  init_weights(*layer, 0.3, 17);
  layer->compute_dtype = torch::kBFloat16;
  auto x = torch::randn({2, 6, c.hidden_size});
  auto pos = torch::arange(6, torch::kLong).expand({2, 6});
  auto cs = rope_cos_sin(pos, c.resolved_head_dim(), c.rope_theta, torch::kBFloat16);
  torch::NoGradGuard ng;
  RouterOutput r;
  layer->forward(x, cs.first, cs.second, {}, &r);
  auto h = x + layer->self_attn->forward(layer->input_layernorm->forward(x, torch::kBFloat16), cs.first, cs.second, {});
  auto normed = layer->post_attention_layernorm->forward(h).reshape({-1, c.hidden_size});
  ASSERT_EQ(normed.scalar_type(), torch::kFloat);
  auto expected = torch::matmul(normed, layer->block_sparse_moe->gate->weight.t());
  EXPECT_TRUE(torch::allclose(r.logits_NE, expected, 0, 1e-6));
  auto rounded = torch::matmul(normed.to(torch::kBFloat16).to(torch::kFloat), layer->block_sparse_moe->gate->weight.t());
  EXPECT_GT((r.logits_NE - rounded).abs().max().item<double>(), 1e-5) << "the premise: bf16 input would differ";
}

// The whole model in bf16: logits in bf16 close to the fp32 logits, router logits and every parameter gradient
// fp32; without a compute dtype the forward is the fp32 one, bit for bit. Logit tolerance: the output of the
// last matmul is rounded to bf16 after two layers of bf16 matmuls, a handful of roundings on each path, about
// 1.4u rms together as above; asserted below 4u norm-wise. Every token goes to every expert here (top-k = E): a top-k choice
// near a tie may flip under any rounding, and a flipped choice is not a rounding error (the router's own
// precision is the test above).
TEST(MixedPrecision, ModelComputesInBf16AndKeepsTheRestFp32) {
  ModelConfig c = test::tiny_config();
  c.sliding_window = 5;
  c.moe.num_experts_per_tok = c.moe.num_experts;
  MixtralForCausalLM m(c);
  init_weights(*m, 0.1, 8);
  auto ids = torch::randint(0, c.vocab_size, {2, 12}, torch::kLong);
  torch::Tensor ref_logits;
  {
    torch::NoGradGuard ng;
    ref_logits = m->forward(ids).logits;
  }
  m->set_compute_dtype(torch::kBFloat16);
  auto out = m->forward(ids);
  EXPECT_EQ(out.logits.scalar_type(), torch::kBFloat16);
  for (auto& r : out.router) EXPECT_EQ(r.logits_NE.scalar_type(), torch::kFloat);
  const double err = rel_err(out.logits, ref_logits);
  EXPECT_LT(err, 4 * kBf16U);
  EXPECT_GT(err, 1e-5);
  out.logits.to(torch::kFloat).sum().backward();
  for (auto& p : m->named_parameters()) {
    EXPECT_EQ(p.value().scalar_type(), torch::kFloat) << p.key();
    if (p.value().grad().defined()) EXPECT_EQ(p.value().grad().scalar_type(), torch::kFloat) << p.key();
  }
  m->set_compute_dtype(std::nullopt);
  torch::NoGradGuard ng;
  EXPECT_TRUE(torch::equal(m->forward(ids).logits, ref_logits));
  // Generation with a bf16 cache gives the logits of the full bf16 forward.
  m->set_compute_dtype(torch::kBFloat16);
  auto full = m->forward(ids.slice(0, 0, 1)).logits;
  auto cache = m->make_cache(1, 12);
  auto step = m->forward_cached(ids.slice(0, 0, 1).slice(1, 0, 7), cache);
  auto next = m->forward_cached(ids.slice(0, 0, 1).slice(1, 7, 12), cache);
  EXPECT_EQ(step.scalar_type(), torch::kBFloat16);
  EXPECT_LT(rel_err(torch::cat({step, next}, 1), full), 4 * kBf16U);
}

// DPO in bf16 against fp32: each sequence's summed log-prob is computed from bf16 logits taken to fp32 before
// the log-softmax; it stays within one bf16 epsilon (2^-7) of its fp32 value, relative. A reward is
// beta (log pi - log pi_ref), so it may differ by at most beta 2^-7 (|log pi| + |log pi_ref|). (Top-k = E, as
// above: no routing choice to flip.)
TEST(MixedPrecision, DpoRewardsMatchFp32) {
  ModelConfig c = test::tiny_config();
  c.moe.num_experts_per_tok = c.moe.num_experts;
  MixtralForCausalLM policy(c), ref(c);
  init_weights(*policy, 0.1, 31);
  init_weights(*ref, 0.1, 32);
  torch::manual_seed(9);
  std::vector<data::PreferencePair> pairs;
  for (int i = 0; i < 4; ++i) {
    data::PreferencePair p;
    for (auto* ex : {&p.chosen, &p.rejected}) {
      const int n = 10 + 3 * i + (ex == &p.rejected ? 4 : 0);
      for (int t = 0; t < n; ++t) {
        ex->ids.push_back(static_cast<int>(torch::randint(1, c.vocab_size, {1}).item<int64_t>()));
        ex->loss_mask.push_back(t >= 4 ? 1 : 0);  // a 4-token prompt, then the completion
      }
    }
    pairs.push_back(p);
  }
  std::vector<size_t> idx{0, 1, 2, 3};
  train::DpoOptions o;
  o.beta = 0.5;
  auto run = [&](std::optional<at::ScalarType> dt) {
    policy->set_compute_dtype(dt);
    ref->set_compute_dtype(dt);
    auto [rc, rr] = train::reference_logps(ref, pairs, idx, 4, 64, torch::kCPU);
    torch::NoGradGuard ng;
    std::vector<const data::TokenizedExample*> seqs;
    for (auto& p : pairs) seqs.push_back(&p.chosen);
    for (auto& p : pairs) seqs.push_back(&p.rejected);
    auto pl = train::sequence_logps(policy, seqs, 64, torch::kCPU).logps;
    auto l = train::dpo_batch(policy, pairs, idx, rc, rr, o, 64, torch::kCPU);
    return std::make_tuple(pl, torch::cat({rc, rr}), l);
  };
  auto [p32, r32, l32] = run(std::nullopt);
  auto [p16, r16, l16] = run(torch::kBFloat16);
  const double e = 1.0 / 128;
  EXPECT_EQ(p16.scalar_type(), torch::kFloat);
  EXPECT_TRUE(((p16 - p32).abs() <= e * p32.abs()).all().item<bool>()) << p16 << p32;
  EXPECT_TRUE(((r16 - r32).abs() <= e * r32.abs()).all().item<bool>()) << r16 << r32;
  EXPECT_FALSE(torch::equal(p16, p32)) << "no bf16 rounding: the policy did not compute in bf16";
  // Mean rewards (the logged numbers): chosen = beta mean(pc - rc), bounded as above, term by term.
  const int64_t n = 4;
  const double bound_c =
      o.beta * e * (p32.slice(0, 0, n).abs().sum() + r32.slice(0, 0, n).abs().sum()).item<double>() / n;
  const double bound_r =
      o.beta * e * (p32.slice(0, n, 2 * n).abs().sum() + r32.slice(0, n, 2 * n).abs().sum()).item<double>() / n;
  EXPECT_LE(std::abs(l16.metrics.at("rewards/chosen") - l32.metrics.at("rewards/chosen")), bound_c);
  EXPECT_LE(std::abs(l16.metrics.at("rewards/rejected") - l32.metrics.at("rewards/rejected")), bound_r);
  EXPECT_LE(std::abs(l16.metrics.at("rewards/margins") - l32.metrics.at("rewards/margins")), bound_c + bound_r);
}

// Recomputation changes memory, not results: the gradients of every parameter, the logits, the router
// statistics and the aux loss equal those of the run that keeps its activations, for the whole layer and for
// the MoE block, with router jitter on (the recomputation must draw the same noise) and two micro-batches
// accumulated; afterwards the jitter generators are where the plain run leaves them.
TEST(Recompute, SameGradientsLoadsAndJitterStream) {
  ModelConfig c = test::tiny_config();
  c.moe.router_jitter = 0.2;
  auto ids = torch::randint(0, c.vocab_size, {2, 2, 10}, torch::kLong);
  auto targets = torch::randint(0, c.vocab_size, {2, 2, 10}, torch::kLong);
  struct Result {
    std::map<std::string, torch::Tensor> grads;
    std::vector<torch::Tensor> logits, loads, aux;
    torch::Tensor gen_state, seeded_state;
  };
  auto run = [&](Recompute mode) {
    MixtralForCausalLM m(c);
    init_weights(*m, 0.1, 12);
    m->seed_router_jitter(99);
    m->set_recompute(mode);
    m->train();
    Result r;
    r.seeded_state = m->moe_blocks()[0]->gate->jitter_generator().get_state();
    for (int mb = 0; mb < 2; ++mb) {
      auto out = m->forward(ids[mb]);
      // The router logits leave a recomputed piece through its autograd node.
      const std::string node = out.router[0].logits_NE.grad_fn()->name();
      EXPECT_EQ(node.find("RecomputeFunction") != std::string::npos, mode != Recompute::None) << node;
      std::vector<torch::Tensor> logits, idx;
      for (auto& ro : out.router) {
        logits.push_back(ro.logits_NE);
        idx.push_back(ro.topk_idx_NK);
        r.loads.push_back(ro.tokens_per_expert);
      }
      auto aux = load_balancing_loss(logits, idx);
      auto ce = torch::nn::functional::cross_entropy(out.logits.reshape({-1, c.vocab_size}), targets[mb].reshape({-1}));
      (ce + 0.1 * aux + 0.01 * router_z_loss(logits)).backward();
      r.logits.push_back(out.logits.detach());
      r.aux.push_back(aux.detach());
    }
    for (auto& p : m->named_parameters())
      if (p.value().grad().defined()) r.grads[p.key()] = p.value().grad().clone();
    r.gen_state = m->moe_blocks()[0]->gate->jitter_generator().get_state();
    return r;
  };
  const Result plain = run(Recompute::None);
  ASSERT_GT(plain.grads.size(), 10u);
  EXPECT_FALSE(torch::equal(plain.gen_state, plain.seeded_state)) << "no jitter was drawn";
  for (Recompute mode : {Recompute::Full, Recompute::Moe}) {
    SCOPED_TRACE(recompute_name(mode));
    const Result r = run(mode);
    ASSERT_EQ(r.grads.size(), plain.grads.size());
    for (const auto& [k, g] : plain.grads) {
      ASSERT_EQ(r.grads.count(k), 1u) << k;
      EXPECT_LE(test::max_abs_diff(r.grads.at(k), g), 1e-6 * (1 + g.abs().max().item<double>())) << k;
    }
    for (size_t i = 0; i < plain.logits.size(); ++i) EXPECT_TRUE(torch::equal(r.logits[i], plain.logits[i]));
    ASSERT_EQ(r.loads.size(), plain.loads.size());
    for (size_t i = 0; i < plain.loads.size(); ++i) EXPECT_TRUE(torch::equal(r.loads[i], plain.loads[i]));
    for (size_t i = 0; i < plain.aux.size(); ++i) EXPECT_TRUE(torch::equal(r.aux[i], plain.aux[i]));
    EXPECT_TRUE(torch::equal(r.gen_state, plain.gen_state)) << "the recomputation advanced the jitter stream";
  }
}

TEST(Recompute, NamesAndErrors) {
  EXPECT_EQ(parse_recompute("none"), Recompute::None);
  EXPECT_EQ(parse_recompute("full"), Recompute::Full);
  EXPECT_EQ(parse_recompute("moe"), Recompute::Moe);
  EXPECT_STREQ(recompute_name(Recompute::Moe), "moe");
  EXPECT_THROW(parse_recompute("layer"), UserError);
}
