// LoRA and QLoRA on the model: an adapter with B = 0 is the base; the merged weights are W + scale B A (a
// naive loop); only the adapters train; the stacked expert adapters computed group by group equal a naive
// per-token loop (values and gradients); a quantised base equals the float model of its dequantised weights;
// the adapters switched off give the base (DPO's adapters_off reference equals a frozen copy).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <fstream>

#include "core/error.h"
#include "data/preference.h"
#include "model/finetune.h"
#include "model/param_count.h"
#include "moe_block_util.h"
#include "test_util.h"
#include "objective/dpo_objective.h"
#include "optim/optimizer.h"
#include "recipe/recipe.h"

using namespace moeforge;

namespace {

MixtralForCausalLM base_model(uint64_t seed = 3) {
  MixtralForCausalLM m(test::tiny_config());
  init_weights(*m, 0.1, seed);
  return m;
}

// A second model with the same weights (a frozen copy of the base).
MixtralForCausalLM copy_of(MixtralForCausalLM& m) {
  MixtralForCausalLM c(m->config());
  torch::NoGradGuard ng;
  auto src = m->named_parameters();
  for (auto& p : c->named_parameters()) p.value().copy_(src[p.key()]);
  return c;
}

LoraSpec spec_all(int64_t rank = 3, double alpha = 5, int64_t expert_rank = 2) {
  LoraSpec s;
  s.rank = rank;
  s.alpha = alpha;
  s.expert_rank = expert_rank;
  s.dropout = 0;
  s.targets = lora_target_names();
  s.targets.push_back("lm_head");
  return s;
}

// Every B random (as after training), so the adapters change the output.
void randomize_B(MixtralForCausalLM& m, uint64_t seed) {
  torch::NoGradGuard ng;
  auto gen = at::detail::createCPUGenerator(seed);
  for (auto& [n, t] : adapter_tensors(m))
    if (n.find("lora_B") != std::string::npos) {
      auto v = torch::empty(t.sizes()).normal_(0, 0.3, gen);
      t.copy_(v);
    }
}

torch::Tensor logits(MixtralForCausalLM& m, const torch::Tensor& ids) {
  torch::NoGradGuard ng;
  return m->forward(ids).logits;
}

torch::Tensor ids(int64_t B = 2, int64_t T = 11, uint64_t seed = 5) {
  auto gen = at::detail::createCPUGenerator(seed);
  return torch::randint(0, 64, {B, T}, gen, torch::kLong);
}

}  // namespace

TEST(Lora, ZeroBGivesExactlyTheBase) {
  auto base = base_model();
  auto m = copy_of(base);
  freeze_base(m);
  LoraSpec s = spec_all();
  s.dropout = 0.2;  // B = 0: the adapters' term is 0 whatever dropout draws
  attach_lora(m, s, 7);
  auto x = ids();
  base->eval();
  m->eval();
  EXPECT_TRUE(torch::equal(logits(m, x), logits(base, x)));
  m->train();
  base->train();
  EXPECT_TRUE(torch::equal(logits(m, x), logits(base, x)));
  // A is not zero (the adapter trains from the first step).
  for (auto& [n, t] : adapter_tensors(m))
    if (n.find("lora_A") != std::string::npos) EXPECT_GT(t.abs().max().item<double>(), 0.0) << n;
}

TEST(Lora, MergedWeightsAreBasePlusScaleTimesBA) {
  auto base = base_model();
  auto m = copy_of(base);
  freeze_base(m);
  const LoraSpec s = spec_all(3, 5.0, 2);
  attach_lora(m, s, 7);
  randomize_B(m, 9);
  auto merged = merged_weights(m);
  std::map<std::string, torch::Tensor> mw(merged.begin(), merged.end());
  auto ad = adapter_tensors(m);
  std::map<std::string, torch::Tensor> at(ad.begin(), ad.end());
  auto bp = base->named_parameters();
  // scale = alpha / r: 5/3 for attention and the router, 5/2 for the experts (expert_rank 2).
  struct Case {
    std::string stem;
    double scale;
    int64_t r;
  } cases[] = {{"model.layers.0.self_attn.q_proj.", 5.0 / 3, 3},
               {"model.layers.1.self_attn.o_proj.", 5.0 / 3, 3},
               {"model.layers.0.block_sparse_moe.gate.", 5.0 / 3, 3},
               {"model.layers.1.block_sparse_moe.experts.2.w2.", 5.0 / 2, 2},
               {"model.layers.0.block_sparse_moe.experts.0.w1.", 5.0 / 2, 2},
               {"lm_head.", 5.0 / 3, 3}};
  for (const auto& c : cases) {
    auto W = bp[c.stem + "weight"].to(torch::kDouble);
    auto A = at.at(c.stem + "lora_A.weight").to(torch::kDouble), B = at.at(c.stem + "lora_B.weight").to(torch::kDouble);
    ASSERT_EQ(A.size(0), c.r) << c.stem;
    auto got = mw.at(c.stem + "weight").to(torch::kDouble);
    auto Wa = W.accessor<double, 2>(), Aa = A.accessor<double, 2>(), Ba = B.accessor<double, 2>(), Ga = got.accessor<double, 2>();
    double worst = 0;
    for (int64_t o = 0; o < W.size(0); ++o)
      for (int64_t i = 0; i < W.size(1); ++i) {
        double acc = 0;
        for (int64_t k = 0; k < c.r; ++k) acc += Ba[o][k] * Aa[k][i];
        worst = std::max(worst, std::abs(Ga[o][i] - (Wa[o][i] + c.scale * acc)));
      }
    EXPECT_LT(worst, 1e-6) << c.stem;
  }
  // Unadapted parameters (embeddings, norms) are the base's; the merged model computes the adapted one.
  EXPECT_TRUE(torch::equal(mw.at("model.embed_tokens.weight"), bp["model.embed_tokens.weight"]));
  MixtralForCausalLM plain(test::tiny_config());
  {
    torch::NoGradGuard ng;
    for (auto& p : plain->named_parameters()) p.value().copy_(mw.at(p.key()));
  }
  auto x = ids();
  m->eval();
  plain->eval();
  EXPECT_LT(test::max_abs_diff(logits(m, x), logits(plain, x)), 1e-5);
  EXPECT_GT(test::max_abs_diff(logits(m, x), logits(base, x)), 1e-3);  // the adapters do change the model
}

TEST(Lora, ScalesAndTargets) {
  LoraSpec s;
  s.rank = 16;
  s.alpha = 32;
  s.expert_rank = 4;
  EXPECT_DOUBLE_EQ(s.scale_of("q_proj"), 2.0);
  EXPECT_DOUBLE_EQ(s.scale_of("w1"), 8.0);
  s.rslora = true;
  EXPECT_DOUBLE_EQ(s.scale_of("q_proj"), 32.0 / 4.0);
  EXPECT_DOUBLE_EQ(s.scale_of("w2"), 32.0 / 2.0);
  EXPECT_EQ(resolve_lora_targets({"all"}, "r.yaml").size(), 8u);
  EXPECT_EQ(resolve_lora_targets({"q_proj", "v_proj", "q_proj"}, "r.yaml"), (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_THROW(resolve_lora_targets({"q_proj", "mlp"}, "r.yaml"), UserError);
  EXPECT_EQ(resolve_lora_targets({"all", "lm_head"}, "r.yaml").size(), 9u);  // lm_head is not in all (as in PEFT)
  // The default leaves the router frozen.
  EXPECT_FALSE(LoraSpec().targets_module("gate"));
  EXPECT_TRUE(LoraSpec().targets_module("w2"));
}

TEST(Lora, OnlyAdaptersTrainAndTheBaseStaysBitIdentical) {
  auto base = base_model();
  auto m = copy_of(base);
  freeze_base(m);
  LoraSpec s = spec_all(4, 8, 0);
  s.dropout = 0.1;
  attach_lora(m, s, 7);
  std::vector<std::pair<std::string, torch::Tensor>> trainable;
  int64_t n = 0;
  for (auto& p : m->named_parameters())
    if (p.value().requires_grad()) {
      EXPECT_NE(p.key().find("lora_"), std::string::npos) << p.key();
      trainable.emplace_back(p.key(), p.value());
      n += p.value().numel();
    }
  // `moeforge info --finetune lora` counts the same parameters from the config alone.
  FinetuneSpec ft;
  ft.method = "lora";
  ft.lora = s;
  EXPECT_EQ(n, estimate_finetune(m->config(), ft, false).trainable);
  std::map<std::string, torch::Tensor> before;
  for (auto& p : m->named_parameters()) before[p.key()] = p.value().clone();
  train::AdamW opt(trainable, train::AdamWOptions{});
  m->train();
  for (int step = 0; step < 3; ++step) {
    opt.zero_grad();
    auto x = ids(2, 9, 11 + step);
    auto out = m->forward(x);
    torch::nn::functional::cross_entropy(out.logits.view({-1, 64}), x.view({-1})).backward();
    opt.step(1e-2);
  }
  for (auto& p : m->named_parameters()) {
    if (p.key().find("lora_") == std::string::npos) {
      EXPECT_TRUE(torch::equal(p.value(), before[p.key()])) << p.key() << " moved";
      EXPECT_FALSE(p.value().grad().defined()) << p.key();
    } else {
      EXPECT_FALSE(torch::equal(p.value(), before[p.key()])) << p.key() << " did not train";
    }
  }
}

// The expert adapters live stacked per bank ([E, r, in], [E, out, r]) and are computed on the dispatcher's
// grouped rows; the reference runs every token through its k experts one at a time.
TEST(Lora, GroupedExpertAdaptersMatchANaivePerTokenLoop) {
  const int64_t H = 16, I = 24, E = 4, K = 2, r = 3;
  auto b = test::make_moe_block(H, I, E, K);
  for (auto& p : b->parameters()) p.requires_grad_(false);
  auto gen = at::detail::createCPUGenerator(21);
  std::array<torch::Tensor, 3> A, Bm;
  const int64_t ins[3] = {H, I, H}, outs[3] = {I, H, I};
  for (size_t j = 0; j < 3; ++j) {
    A[j] = torch::empty({E, r, ins[j]}).normal_(0, 0.3, gen).set_requires_grad(true);
    Bm[j] = torch::empty({E, outs[j], r}).normal_(0, 0.3, gen).set_requires_grad(true);
  }
  auto rt = std::make_shared<LoraRuntime>();
  const double scale = 1.7;
  b->experts->set_lora(A, Bm, scale, rt);
  auto x = torch::empty({13, H}).normal_(0, 1, gen);
  auto g = torch::empty({13, H}).normal_(0, 1, gen);
  auto out = b->forward(x);
  (out.y * g).sum().backward();
  std::array<torch::Tensor, 3> gA, gB;
  for (size_t j = 0; j < 3; ++j) {
    gA[j] = A[j].grad().clone();
    gB[j] = Bm[j].grad().clone();
    A[j].mutable_grad().zero_();
    Bm[j].mutable_grad().zero_();
  }
  // Naive: token by token, expert by expert, the adapted SwiGLU written out.
  std::vector<torch::Tensor> rows;
  for (int64_t t = 0; t < 13; ++t) {
    auto xt = x[t];
    auto acc = torch::zeros({H});
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = out.router.topk_idx_NK[t][k].item<int64_t>();
      auto& ex = b->experts->expert(e);
      auto lin = [&](size_t j, const torch::Tensor& W, const torch::Tensor& v) {
        return torch::mv(W, v) + scale * torch::mv(Bm[j][e], torch::mv(A[j][e], v));
      };
      auto h = torch::silu(lin(0, ex->w1->weight, xt)) * lin(2, ex->w3->weight, xt);
      acc = acc + out.router.topk_weight_NK[t][k].detach() * lin(1, ex->w2->weight, h);
    }
    rows.push_back(acc);
  }
  auto ref = torch::stack(rows);
  EXPECT_LT(test::max_abs_diff(out.y, ref), 1e-5);
  (ref * g).sum().backward();
  for (size_t j = 0; j < 3; ++j) {
    EXPECT_GT(gA[j].abs().max().item<double>(), 1e-3);
    EXPECT_LT(test::max_abs_diff(gA[j], A[j].grad()), 1e-5) << "A " << j;
    EXPECT_LT(test::max_abs_diff(gB[j], Bm[j].grad()), 1e-5) << "B " << j;
  }
}

TEST(Qlora, QuantisedBaseComputesItsDequantisedWeights) {
  for (auto type : {QuantType::NF4, QuantType::Int8}) {
    auto base = base_model();
    auto q = copy_of(base);
    freeze_base(q);
    QuantSpec spec;
    spec.type = type;
    spec.block_size = 32;
    quantize_base(q, spec);
    // The float storage of the quantised weights is gone; the router, norms and embeddings stay float.
    auto& l0 = *q->model->layers[0];
    EXPECT_EQ(l0.self_attn->q_proj->weight.numel(), 0);
    EXPECT_EQ(l0.block_sparse_moe->experts->expert(1)->w2->weight.numel(), 0);
    EXPECT_GT(l0.block_sparse_moe->gate->weight.numel(), 0);
    const ParamCounts pc = count_params(q->config());
    const double per = (type == QuantType::NF4 ? 0.5 : 1.0) + (1.0 + 4.0 / 256) / 32;  // codes + int8 absmax (+ scale)
    EXPECT_NEAR(static_cast<double>(quantized_bytes(q)), per * (pc.attention + pc.experts), 0.05 * per * (pc.attention + pc.experts));
    // The same network with the dequantised weights in float.
    auto merged = merged_weights(q);
    std::map<std::string, torch::Tensor> mw(merged.begin(), merged.end());
    MixtralForCausalLM plain(q->config());
    {
      torch::NoGradGuard ng;
      for (auto& p : plain->named_parameters()) p.value().copy_(mw.at(p.key()));
    }
    auto x = ids();
    q->eval();
    plain->eval();
    EXPECT_LT(test::max_abs_diff(logits(q, x), logits(plain, x)), 1e-5);
    EXPECT_GT(test::max_abs_diff(logits(q, x), logits(base, x)), 1e-6);  // quantisation is not free
    // LoRA on top: gradients reach the adapters through the quantised matmuls.
    LoraSpec s = spec_all();
    attach_lora(q, s, 3);
    randomize_B(q, 4);
    q->train();
    torch::nn::functional::cross_entropy(q->forward(x).logits.view({-1, 64}), x.view({-1})).backward();
    for (auto& p : q->named_parameters())
      if (p.key().find("lora_A") != std::string::npos) EXPECT_GT(p.value().grad().abs().max().item<double>(), 0.0) << p.key();
  }
}

TEST(Lora, AdaptersOffIsTheBaseAndTheDpoReferenceEqualsAFrozenCopy) {
  auto base = base_model();
  auto policy = copy_of(base);
  freeze_base(policy);
  attach_lora(policy, spec_all(), 7);
  randomize_B(policy, 9);
  auto x = ids();
  policy->eval();
  base->eval();
  EXPECT_GT(test::max_abs_diff(logits(policy, x), logits(base, x)), 1e-3);
  {
    AdaptersOffGuard off(policy);
    EXPECT_TRUE(torch::equal(logits(policy, x), logits(base, x)));
  }
  EXPECT_GT(test::max_abs_diff(logits(policy, x), logits(base, x)), 1e-3);  // back on after the scope
  // DPO reference log-probs of a few pairs: the policy with its adapters off vs a frozen copy of the base.
  std::vector<data::PreferencePair> pairs;
  auto gen = at::detail::createCPUGenerator(17);
  for (int i = 0; i < 4; ++i) {
    data::PreferencePair p;
    for (auto* e : {&p.chosen, &p.rejected}) {
      const int len = 6 + i;
      for (int t = 0; t < len; ++t) {
        e->ids.push_back(static_cast<int>(torch::randint(3, 64, {1}, gen).item<int64_t>()));
        e->loss_mask.push_back(t >= 3 ? 1 : 0);
      }
    }
    pairs.push_back(p);
  }
  std::vector<size_t> idx{0, 1, 2, 3};
  policy->train();
  std::pair<torch::Tensor, torch::Tensor> off_ref;
  {
    AdaptersOffGuard off(policy);
    off_ref = train::reference_logps(policy, pairs, idx, 2, 16, torch::kCPU);
  }
  auto frozen = train::reference_logps(base, pairs, idx, 2, 16, torch::kCPU);
  EXPECT_TRUE(torch::equal(off_ref.first, frozen.first));
  EXPECT_TRUE(torch::equal(off_ref.second, frozen.second));
  EXPECT_TRUE(policy->is_training());
}

TEST(Lora, RecipeKeysRefuseImpossibleValues) {
  auto expect_error = [](const std::string& yaml, const std::string& needle) {
    const std::string path = test::write_temp("lora_recipe.yaml", yaml);
    try {
      train::load_recipe(path, {});
      ADD_FAILURE() << "accepted: " << yaml;
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  const std::string model =
      "model: {name: t, vocab_size: 64, hidden_size: 32, intermediate_size: 48, num_layers: 2, num_attention_heads: 4, "
      "num_key_value_heads: 2, max_position_embeddings: 256}\ndata: {dir: /nonexistent}\n";
  expect_error(model + "init_from: /x\nfinetune: {method: lora, lora: {targets: [q_proj, mlp]}}\n", "finetune.lora.targets");
  expect_error(model + "init_from: /x\nfinetune: {method: lora, lora: {targets: [q_proj, mlp]}}\n", "mlp");
  expect_error(model + "finetune: {method: lora}\n", "init_from");
  expect_error(model + "init_from: /x\nfinetune: {method: dora}\n", "finetune.method");
  expect_error(model + "init_from: /x\nfinetune: {method: qlora, quant: {type: nf3}}\n", "finetune.quant.type");
  expect_error(model + "init_from: /x\nfinetune: {method: qlora, quant: {block_size: 63}}\n", "block_size");
  expect_error(model + "init_from: /x\nfinetune: {method: lora, lora: {rank: 0}}\n", "finetune.lora.rank");
  expect_error(model + "init_from: /x\nfinetune: {method: lora, lora: {dropout: 1.0}}\n", "finetune.lora.dropout");
  expect_error(model + "init_from: /x\nfinetune: {method: lora, lora: {rnak: 4}}\n", "rnak");
  expect_error(model + "dpo: {reference: adapters_off}\n", "dpo.reference");
  expect_error(model + "init_from: /x\nfinetune: {method: qlora}\ndpo: {reference: frozen}\n", "dpo.reference");
  // The DPO reference follows the method.
  const std::string ok = test::write_temp("lora_ok.yaml", model + "init_from: /x\nfinetune: {method: qlora, lora: {targets: all}}\n");
  auto r = train::load_recipe(ok, {});
  EXPECT_EQ(r.dpo.reference, "adapters_off");
  EXPECT_EQ(r.finetune.lora.targets.size(), 8u);
  EXPECT_TRUE(r.finetune.quantized());
  EXPECT_EQ(r.finetune.quant.type, QuantType::NF4);
}
