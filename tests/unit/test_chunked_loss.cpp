// The chunked LM head + cross-entropy (model/chunked_loss.h) against the plain expression it replaces,
// cross_entropy(linear(h, W), t) through LibTorch's autograd: in fp64 (the same mathematics; only the order of
// the sums differs, so agreement to ~1e-13 relative) and in bf16 (both against the fp64 value of the same
// bf16-rounded inputs, within the bound bf16's roundings allow).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "model/chunked_loss.h"

using namespace moeforge;

namespace {

struct Ref {
  torch::Tensor loss, gh, gw;
};

// The plain path: logits in the hidden's dtype (W cast to it), log-softmax in fp32 or fp64.
Ref plain(const torch::Tensor& h0, const torch::Tensor& w0, const torch::Tensor& t, double scale = 1.0) {
  auto h = h0.detach().clone().requires_grad_(true), w = w0.detach().clone().requires_grad_(true);
  auto logits = torch::nn::functional::linear(h, w.to(h.scalar_type()));
  auto acc = h.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  auto loss = torch::nn::functional::cross_entropy(logits.to(acc), t);
  (loss * scale).backward();
  return {loss.detach(), h.grad(), w.grad()};
}

Ref chunked(const torch::Tensor& h0, const torch::Tensor& w0, const torch::Tensor& t, int64_t chunk, double scale = 1.0) {
  auto h = h0.detach().clone().requires_grad_(true), w = w0.detach().clone().requires_grad_(true);
  auto loss = chunked_lm_cross_entropy(h, w, t, -100, chunk);
  (loss * scale).backward();
  return {loss.detach(), h.grad(), w.grad()};
}

double rel(const torch::Tensor& a, const torch::Tensor& ref) {
  auto d = a.to(torch::kDouble) - ref.to(torch::kDouble);
  return (d.norm() / ref.to(torch::kDouble).norm()).item<double>();
}

}  // namespace

TEST(ChunkedLoss, EqualsThePlainHeadAndCrossEntropyInFp64) {
  torch::manual_seed(3);
  const int64_t N = 37, H = 8, V = 50;
  auto h = torch::randn({N, H}, torch::kDouble), w = torch::randn({V, H}, torch::kDouble) * 0.5;
  auto t = torch::randint(0, V, {N}, torch::kLong);
  t.index_put_({torch::tensor({0, 5, 36})}, -100);  // ignored rows, the last one in a partial chunk
  const auto ref = plain(h, w, t, 3.0);
  for (int64_t chunk : {1, 8, 37, 64}) {
    const auto got = chunked(h, w, t, chunk, 3.0);  // the incoming gradient (3) scales both gradients
    EXPECT_LT(rel(got.loss, ref.loss), 1e-13) << chunk;
    EXPECT_LT(rel(got.gh, ref.gh), 1e-13) << chunk;
    EXPECT_LT(rel(got.gw, ref.gw), 1e-13) << chunk;
    EXPECT_EQ(got.gh.scalar_type(), torch::kDouble);
  }
  // Rows with an ignored target get no gradient; every row ignored: loss 0, gradients 0.
  const auto got = chunked(h, w, t, 8);
  EXPECT_EQ(got.gh[5].abs().max().item<double>(), 0.0);
  const auto none = chunked(h, w, torch::full({N}, -100, torch::kLong), 8);
  EXPECT_EQ(none.loss.item<double>(), 0.0);
  EXPECT_EQ(none.gw.abs().max().item<double>(), 0.0);
}

TEST(ChunkedLoss, FrozenWeightOrHiddenGetsNoGradientAndNoGraphGivesTheLoss) {
  torch::manual_seed(4);
  auto h = torch::randn({20, 6}, torch::kDouble).requires_grad_(true);
  auto w = torch::randn({30, 6}, torch::kDouble);  // frozen head (adapters elsewhere)
  auto t = torch::randint(0, 30, {20}, torch::kLong);
  auto loss = chunked_lm_cross_entropy(h, w, t, -100, 7);
  loss.backward();
  EXPECT_FALSE(w.grad().defined());
  const auto ref = plain(h, w, t);
  EXPECT_LT(rel(h.grad(), ref.gh), 1e-13);
  torch::NoGradGuard ng;
  auto l2 = chunked_lm_cross_entropy(h, w, t, -100, 7);
  EXPECT_FALSE(l2.requires_grad());
  EXPECT_LT(rel(l2, ref.loss), 1e-13);
}

// bf16 hidden states and an fp32 master weight, as in mixed-precision training. Both paths round the logits
// to bf16 (u = 2^-8 relative each), the logits' gradient to bf16 before the two gradient matmuls, and the
// matmul outputs to bf16 (the chunked path per chunk, then sums in fp32). Against fp64 of the same bf16-rounded
// inputs each gradient entry carries a few such roundings, a norm-wise relative error of about u; the bound
// asserted is 2u for the gradients and u/4 for the loss (a mean of 512 fp32 terms whose logits each moved by
// at most u relative: the errors average out), on both paths, so the chunked path is held to what the plain
// one achieves.
TEST(ChunkedLoss, Bf16IsAsCloseToFp64AsThePlainBf16Path) {
  torch::manual_seed(5);
  const int64_t N = 512, H = 64, V = 300;
  auto h = torch::randn({N, H}).to(torch::kBFloat16);
  auto w = torch::randn({V, H}) * 0.2;
  auto t = torch::randint(0, V, {N}, torch::kLong);
  const auto ref = plain(h.to(torch::kDouble), w.to(torch::kBFloat16).to(torch::kDouble), t);
  const double u = 1.0 / 256;
  const auto p = plain(h, w, t);
  for (int64_t chunk : {64, 200}) {
    const auto c = chunked(h, w, t, chunk);
    EXPECT_EQ(c.gh.scalar_type(), torch::kBFloat16);
    EXPECT_EQ(c.gw.scalar_type(), torch::kFloat);
    EXPECT_LT(rel(c.loss, ref.loss), u / 4) << chunk;
    EXPECT_LT(rel(c.gh, ref.gh), 2 * u) << chunk;
    EXPECT_LT(rel(c.gw, ref.gw), 2 * u) << chunk;
  }
  EXPECT_LT(rel(p.loss, ref.loss), u / 4);
  EXPECT_LT(rel(p.gh, ref.gh), 2 * u);
  EXPECT_LT(rel(p.gw, ref.gw), 2 * u);
}
