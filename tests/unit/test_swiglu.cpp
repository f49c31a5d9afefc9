// The fused SwiGLU gate (model/swiglu.h) against the expression it replaces, silu(h1) * h3 through LibTorch's
// autograd: in fp64 the same mathematics (the backward's d silu = a + s (1 - a) is an exact rewrite of
// s (1 + h1 (1 - s)), so agreement to rounding, ~1e-15 relative), and the bf16 expert that uses it (one GEMM
// against w1 | w3) against fp64 of the same bf16-rounded inputs, as close as the unfused bf16 expression is.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "model/experts.h"
#include "model/swiglu.h"

using namespace moeforge;

namespace {

double rel(const torch::Tensor& a, const torch::Tensor& ref) {
  auto d = a.to(torch::kDouble) - ref.to(torch::kDouble);
  return (d.norm() / ref.to(torch::kDouble).norm()).item<double>();
}

}  // namespace

TEST(SwiGLUGate, Fp64EqualsAutogradOfSiluTimesGate) {
  torch::manual_seed(3);
  const int64_t n = 37, I = 24;
  auto h0 = torch::randn({n, 2 * I}, torch::kDouble) * 3.0;
  auto g = torch::randn({I, n}, torch::kDouble).t();  // a non-contiguous incoming gradient
  auto h = h0.clone().requires_grad_(true);
  auto y = swiglu_gate(h);
  (y * g).sum().backward();
  auto hr = h0.clone().requires_grad_(true);
  auto yr = torch::silu(hr.narrow(1, 0, I)) * hr.narrow(1, I, I);
  (yr * g).sum().backward();
  EXPECT_LT(rel(y, yr), 1e-15);
  EXPECT_LT(rel(h.grad(), hr.grad()), 1e-14);
  // Against central finite differences of the whole function, as an independent check of the rewrite.
  auto f = [&](const torch::Tensor& x) {
    return (torch::silu(x.narrow(1, 0, I)) * x.narrow(1, I, I) * g).sum().item<double>();
  };
  for (int64_t idx : {0L, 5L, I + 3, 2 * I - 1, 10 * 2 * I + 7}) {
    auto p = h0.clone(), m = h0.clone();
    const double eps = 1e-6;
    p.reshape({-1})[idx] += eps;
    m.reshape({-1})[idx] -= eps;
    const double fd = (f(p) - f(m)) / (2 * eps);
    EXPECT_NEAR(h.grad().reshape({-1})[idx].item<double>(), fd, 1e-8 * std::max(1.0, std::abs(fd))) << idx;
  }
}

// The bf16 expert as mixed precision runs it (fp32 master weights, bf16 activations): forward and the
// gradients of x and of w1, w2, w3, each against the fp64 expert on the same bf16-rounded x and weights.
// The unfused bf16 expression (separate GEMMs, h1 * sigmoid(h1) * h3 by autograd) sets the bar: every
// rounding the fused path makes, the unfused one makes too (the gate's intermediates round to bf16 in both),
// so the fused one must be no further from fp64 than 1.5x the unfused one, and both within 2^-6 relative.
TEST(SwiGLUGate, Bf16ExpertIsAsCloseToFp64AsTheUnfusedPath) {
  torch::manual_seed(4);
  const int64_t n = 96, H = 64, I = 128;
  Expert e(H, I);
  for (auto& p : e->parameters()) {
    torch::NoGradGuard ng;
    p.copy_((torch::randn_like(p) * 0.1).to(torch::kBFloat16).to(torch::kFloat));
  }
  auto x16 = torch::randn({n, H}).to(torch::kBFloat16);
  auto gy = torch::randn({n, H}).to(torch::kBFloat16);

  // fused: Expert::forward on bf16 input
  auto x = x16.clone().requires_grad_(true);
  e->zero_grad(true);
  auto y = e->forward(x);
  ASSERT_EQ(y.scalar_type(), torch::kBFloat16);
  y.backward(gy);
  std::vector<torch::Tensor> g_fused = {x.grad(), e->w1->weight.grad(), e->w2->weight.grad(), e->w3->weight.grad()};

  // unfused bf16, by hand
  auto w = [&](const torch::nn::Linear& l) { return l->weight.detach().clone().requires_grad_(true); };
  auto w1 = w(e->w1), w2 = w(e->w2), w3 = w(e->w3);
  auto xu = x16.clone().requires_grad_(true);
  auto h1 = torch::mm(xu, w1.to(torch::kBFloat16).t()), h3 = torch::mm(xu, w3.to(torch::kBFloat16).t());
  auto yu = torch::mm(h1 * torch::sigmoid(h1) * h3, w2.to(torch::kBFloat16).t());
  yu.backward(gy);
  std::vector<torch::Tensor> g_unfused = {xu.grad(), w1.grad(), w2.grad(), w3.grad()};

  // fp64 reference
  auto d = [](const torch::Tensor& t) { return t.detach().to(torch::kDouble).requires_grad_(true); };
  auto xr = d(x16), w1r = d(w1), w2r = d(w2), w3r = d(w3);
  auto yr = torch::mm(torch::silu(torch::mm(xr, w1r.t())) * torch::mm(xr, w3r.t()), w2r.t());
  yr.backward(gy.to(torch::kDouble));
  std::vector<torch::Tensor> g_ref = {xr.grad(), w1r.grad(), w2r.grad(), w3r.grad()};

  const double bar = std::pow(2.0, -6);
  EXPECT_LT(rel(y, yr), std::max(1.5 * rel(yu, yr), 1e-3));
  EXPECT_LT(rel(y, yr), bar);
  for (size_t i = 0; i < g_ref.size(); ++i) {
    ASSERT_TRUE(g_fused[i].defined()) << i;
    EXPECT_EQ(g_fused[i].scalar_type(), i == 0 ? torch::kBFloat16 : torch::kFloat) << i;
    EXPECT_LT(rel(g_fused[i], g_ref[i]), std::max(1.5 * rel(g_unfused[i], g_ref[i]), 1e-3)) << i;
    EXPECT_LT(rel(g_fused[i], g_ref[i]), bar) << i;
  }
}

// fp32 experts keep LibTorch's silu and separate GEMMs: the same bits as the expression by hand.
TEST(SwiGLUGate, Fp32ExpertIsTheUnfusedExpressionBitForBit) {
  torch::manual_seed(5);
  Expert e(32, 48);
  auto x = torch::randn({20, 32});
  auto y = e->forward(x);
  auto ref = torch::nn::functional::linear(
      torch::silu(torch::nn::functional::linear(x, e->w1->weight)) * torch::nn::functional::linear(x, e->w3->weight),
      e->w2->weight);
  EXPECT_TRUE(torch::equal(y, ref));
}
