#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "model/attention.h"
#include "model/decoder.h"
#include "model/rope.h"
#include "test_util.h"

using namespace moeforge;
using test::max_abs_diff;

namespace {

// In fp64: a token's expert output is computed in a GEMM whose row count depends on how the
// other tokens were routed, and BLAS blocking for different row counts rounds differently
// (~1e-8 in fp32). In fp64 that noise is ~1e-17, far below what a real dependence gives.
MixtralForCausalLM make_model(const ModelConfig& c, uint64_t seed = 7) {
  MixtralForCausalLM m(c);
  init_weights(*m, c.init_std, seed);
  m->to(torch::kDouble);
  m->eval();
  return m;
}
constexpr double kNoDependence = 1e-13;

// Naive multi-head attention with explicit loops over heads and positions, no RoPE.
torch::Tensor naive_mha(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  // q, k, v: [B, N, T, D]
  auto out = torch::zeros_like(q);
  const auto B = q.size(0), N = q.size(1), T = q.size(2), D = q.size(3);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < N; ++h)
      for (int64_t i = 0; i < T; ++i) {
        std::vector<double> s(i + 1);
        double mx = -1e300;
        for (int64_t j = 0; j <= i; ++j) {
          s[j] = (q[b][h][i] * k[b][h][j]).sum().item<double>() / std::sqrt(static_cast<double>(D));
          mx = std::max(mx, s[j]);
        }
        double z = 0;
        for (auto& x : s) z += (x = std::exp(x - mx));
        for (int64_t j = 0; j <= i; ++j) out[b][h][i] += v[b][h][j] * (s[j] / z);
      }
  return out;
}

}  // namespace

TEST(Attention, CausalityOfWholeModel) {
  ModelConfig c = test::tiny_config();
  auto m = make_model(c);
  torch::NoGradGuard ng;
  auto ids = torch::randint(0, c.vocab_size, {2, 12}, torch::kLong);
  auto base = m->forward(ids).logits;
  for (int64_t t : {3, 7, 11}) {
    auto ids2 = ids.clone();
    ids2.index_put_({torch::indexing::Slice(), t}, (ids.index({torch::indexing::Slice(), t}) + 1) % c.vocab_size);
    auto out = m->forward(ids2).logits;
    auto before = torch::indexing::Slice(0, t);
    EXPECT_LT(max_abs_diff(out.index({torch::indexing::Slice(), before}), base.index({torch::indexing::Slice(), before})), kNoDependence)
        << "positions before " << t << " changed";
    EXPECT_GT(max_abs_diff(out.index({torch::indexing::Slice(), t}), base.index({torch::indexing::Slice(), t})), 1e-6);
  }
}

TEST(Attention, SlidingWindowOneLayer) {
  ModelConfig c = test::tiny_config();
  c.num_layers = 1;
  const int64_t w = 4;
  c.sliding_window = w;
  auto m = make_model(c);
  torch::NoGradGuard ng;
  auto ids = torch::randint(0, c.vocab_size, {1, 16}, torch::kLong);
  auto base = m->forward(ids).logits;
  const int64_t t = 12;
  auto perturb = [&](int64_t pos) {
    auto ids2 = ids.clone();
    ids2[0][pos] = (ids[0][pos].item<int64_t>() + 5) % c.vocab_size;
    return max_abs_diff(m->forward(ids2).logits[0][t], base[0][t]);
  };
  // Outside the window (positions < t - w + 1): no influence at all.
  for (int64_t p = 0; p < t - w + 1; ++p) EXPECT_LT(perturb(p), kNoDependence) << "position " << p;
  // The oldest position inside the window does influence t.
  EXPECT_GT(perturb(t - w + 1), 1e-6);
}

TEST(Attention, MaskShapesAndSegments) {
  auto none = build_attention_mask(2, 5, std::nullopt, {}, torch::kCPU);
  EXPECT_FALSE(none.defined());  // plain causal uses the fast path
  auto wide = build_attention_mask(2, 5, 8, {}, torch::kCPU);
  EXPECT_FALSE(wide.defined());  // a window longer than the sequence is plain causal
  auto seg = torch::tensor({0, 0, 1, 1, 1}, torch::kLong).view({1, 5});
  auto m = build_attention_mask(1, 5, 2, seg, torch::kCPU);
  ASSERT_TRUE(m.defined());
  // Row 4 (segment 1) sees 3 and 4 (window 2); row 2 sees only itself (new segment).
  auto expect = torch::tensor({1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1}, torch::kBool)
                    .view({1, 1, 5, 5});
  EXPECT_TRUE(torch::equal(m, expect)) << m;
}

TEST(Attention, GqaWithEqualHeadsIsPlainMultiHead) {
  ModelConfig c = test::tiny_config();
  c.num_key_value_heads = c.num_attention_heads;
  Attention attn(c);
  init_weights(*attn, 0.2, 3);
  const int64_t B = 2, T = 6, D = c.resolved_head_dim(), N = c.num_attention_heads;
  auto x = torch::randn({B, T, c.hidden_size});
  // Zero angles: RoPE is the identity, so this is plain attention.
  auto pos = torch::zeros({B, T}, torch::kLong);
  auto cs = rope_cos_sin(pos, D, c.rope_theta, torch::kFloat);
  torch::NoGradGuard ng;
  auto y = attn->forward(x, cs.first, cs.second, {});
  auto q = attn->q_proj(x).view({B, T, N, D}).transpose(1, 2);
  auto k = attn->k_proj(x).view({B, T, N, D}).transpose(1, 2);
  auto v = attn->v_proj(x).view({B, T, N, D}).transpose(1, 2);
  auto ref = attn->o_proj(naive_mha(q, k, v).transpose(1, 2).reshape({B, T, N * D}));
  EXPECT_LT(max_abs_diff(y, ref), 1e-5);
}

TEST(Attention, GqaSharesKvHeadsAcrossGroups) {
  // kv heads 2, query heads 4: query heads 0,1 use kv head 0 and 2,3 use kv head 1.
  auto kv = torch::randn({1, 2, 3, 4});
  auto rep = AttentionImpl::repeat_kv(kv, 2);
  ASSERT_EQ(rep.size(1), 4);
  EXPECT_TRUE(torch::equal(rep[0][0], kv[0][0]));
  EXPECT_TRUE(torch::equal(rep[0][1], kv[0][0]));
  EXPECT_TRUE(torch::equal(rep[0][2], kv[0][1]));
  EXPECT_TRUE(torch::equal(rep[0][3], kv[0][1]));
}

TEST(Rope, PreservesNorms) {
  const int64_t D = 16;
  auto x = torch::randn({2, 3, 10, D}, torch::kDouble);
  auto pos = torch::arange(10, torch::kLong).view({1, 10}).expand({2, 10}) * 37;
  auto cs = rope_cos_sin(pos, D, 10000.0, torch::kDouble);
  auto y = apply_rope(x, cs.first, cs.second);
  EXPECT_LT(max_abs_diff(y.norm(2, -1), x.norm(2, -1)), 1e-12);
}

TEST(Rope, ScoresDependOnRelativePositionOnly) {
  const int64_t D = 16;
  auto q = torch::randn({1, 1, 1, D}, torch::kDouble);
  auto k = torch::randn({1, 1, 1, D}, torch::kDouble);
  auto score = [&](int64_t m, int64_t n) {
    auto cq = rope_cos_sin(torch::full({1, 1}, m, torch::kLong), D, 10000.0, torch::kDouble);
    auto ck = rope_cos_sin(torch::full({1, 1}, n, torch::kLong), D, 10000.0, torch::kDouble);
    return (apply_rope(q, cq.first, cq.second) * apply_rope(k, ck.first, ck.second)).sum().item<double>();
  };
  for (int64_t shift : {1, 5, 100, 1000}) {
    EXPECT_NEAR(score(7, 3), score(7 + shift, 3 + shift), 1e-9);
    EXPECT_NEAR(score(2, 9), score(2 + shift, 9 + shift), 1e-9);
  }
  EXPECT_GT(std::abs(score(7, 3) - score(7, 4)), 1e-6);  // but it does depend on the offset
}

TEST(Rope, RotateHalfConvention) {
  // HF Mixtral: rotate_half([x1, x2]) = [-x2, x1]; position 1 with theta such that angle_i = inv_freq_i.
  auto x = torch::tensor({1.0, 2.0, 3.0, 4.0}, torch::kDouble).view({1, 1, 1, 4});
  auto rh = rotate_half(x);
  EXPECT_TRUE(torch::allclose(rh.view({4}), torch::tensor({-3.0, -4.0, 1.0, 2.0}, torch::kDouble)));
  auto cs = rope_cos_sin(torch::ones({1, 1}, torch::kLong), 4, 100.0, torch::kDouble);
  // inv_freq = [1, 100^-0.5 = 0.1], repeated: angles [1, 0.1, 1, 0.1].
  auto y = apply_rope(x, cs.first, cs.second).view({4});
  std::vector<double> a{1.0, 0.1, 1.0, 0.1};
  std::vector<double> xv{1, 2, 3, 4}, rv{-3, -4, 1, 2};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(y[i].item<double>(), xv[i] * std::cos(a[i]) + rv[i] * std::sin(a[i]), 1e-12);
}
