// Block-wise quantisation for QLoRA (model/quant.h), against independent references: the published NF4 table
// and its normal-quantile construction recomputed here, nearest levels found by a naive loop over the 16
// levels, per-element error bounds derived from the level spacing and the int8 step, byte counts by hand,
// at::linear on the dequantised weight, and fp64 finite differences.
//
// Error bounds. With the true block absmax a, NF4 stores the level l nearest to w/a (|w/a| <= 1), so
// |w - l a| <= a H, H the largest half-gap between adjacent levels. Double quantisation stores an a' with
// |a - a'| <= s/2 (s the int8 scale of its group), so |w - l a'| <= a H + |l| |a - a'| <= a H + s/2. int8 stores
// round(127 w/a): |w - code a/127| <= a/254, and with double quantisation + s/2 again (|code/127| <= 1). A slack of
// a few fp32 roundings (1e-6 relative) is added to each bound.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <memory>
#include <vector>

#include "core/error.h"
#include "model/quant.h"
#include "test_util.h"

using namespace moeforge;

namespace {

// bitsandbytes' NF4 table (functional.py, get_4bit_type("nf4")), as published.
const double kBnbNf4[16] = {-1.0,
                            -0.6961928009986877,
                            -0.5250730514526367,
                            -0.39491748809814453,
                            -0.28444138169288635,
                            -0.18477343022823334,
                            -0.09105003625154495,
                            0.0,
                            0.07958029955625534,
                            0.16093020141124725,
                            0.24611230194568634,
                            0.33791524171829224,
                            0.44070982933044434,
                            0.5626170039176941,
                            0.7229568362236023,
                            1.0};

// Phi^-1(p) by bisection on Phi(x) = erfc(-x / sqrt 2) / 2.
double normal_quantile(double p) {
  double lo = -40, hi = 40;
  for (int i = 0; i < 200; ++i) {
    const double mid = (lo + hi) / 2;
    (0.5 * std::erfc(-mid / std::sqrt(2.0)) < p ? lo : hi) = mid;
  }
  return (lo + hi) / 2;
}

// The largest half-gap between adjacent NF4 levels, from the published table.
double nf4_max_half_gap() {
  double h = 0;
  for (int i = 0; i < 15; ++i) h = std::max(h, (kBnbNf4[i + 1] - kBnbNf4[i]) / 2);
  return h;
}

std::vector<float> to_vec(const torch::Tensor& t) {
  auto c = t.to(torch::kFloat).contiguous().view({-1});
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

// The true absmax of each block of the flattened weight, by a plain loop.
std::vector<double> naive_absmax(const std::vector<float>& w, int64_t bs) {
  std::vector<double> a((w.size() + bs - 1) / bs, 0.0);
  for (size_t i = 0; i < w.size(); ++i) a[i / bs] = std::max(a[i / bs], std::fabs(double(w[i])));
  return a;
}

// Per block, the largest possible |a - a'| of double quantisation: half the int8 step of its group (0 without).
std::vector<double> absmax_error_bound(const QuantizedWeight& q) {
  const int64_t nb = q.num_blocks();
  std::vector<double> e(nb, 0.0);
  if (!q.spec.double_quant) return e;
  auto s = to_vec(q.absmax_scale);
  for (int64_t b = 0; b < nb; ++b) e[b] = s[b / kAbsmaxGroup] / 2;
  return e;
}

// NF4 codes in element order (high nibble first), by a plain loop.
std::vector<int> unpack_nf4(const QuantizedWeight& q) {
  auto c = q.codes.contiguous();
  const uint8_t* p = c.data_ptr<uint8_t>();
  std::vector<int> codes;
  for (int64_t j = 0; j < c.numel(); ++j) {
    codes.push_back(p[j] >> 4);
    codes.push_back(p[j] & 15);
  }
  return codes;
}

QuantSpec spec_of(QuantType t, int64_t bs, bool dq) {
  QuantSpec s;
  s.type = t;
  s.block_size = bs;
  s.double_quant = dq;
  return s;
}

using test::max_abs_diff;

}  // namespace

TEST(Quant, ParseTypeAndNames) {
  EXPECT_EQ(parse_quant_type("nf4"), QuantType::NF4);
  EXPECT_EQ(parse_quant_type("int8"), QuantType::Int8);
  EXPECT_EQ(quant_type_name(QuantType::NF4), "nf4");
  EXPECT_EQ(quant_type_name(QuantType::Int8), "int8");
  try {
    parse_quant_type("fp4");
    FAIL() << "no UserError";
  } catch (const UserError& e) {
    EXPECT_EQ(std::string(e.what()), "finetune.quant.type must be nf4 or int8, got 'fp4'");
  }
  EXPECT_THROW(parse_quant_type("NF4"), UserError);
}

TEST(Quant, Nf4LevelsAreTheBitsandbytesTable) {
  const auto& l = nf4_levels();
  for (int i = 0; i < 16; ++i) EXPECT_NEAR(l[i], kBnbNf4[i], 1e-7) << "level " << i;
  EXPECT_EQ(l[0], -1.0f);
  EXPECT_EQ(l[7], 0.0f);
  EXPECT_EQ(l[15], 1.0f);
}

// The paper's construction: 8 positive quantiles of N(0, 1) at linspace(offset, 0.5, 9) without its last point,
// 7 negative ones at linspace(offset, 0.5, 8) without its last, and an exact 0; normalised by the largest.
TEST(Quant, Nf4LevelsAreTheNormalQuantileConstruction) {
  const double offset = 0.9677083;
  std::vector<double> v;
  for (int i = 0; i < 8; ++i) v.push_back(normal_quantile(offset + i * (0.5 - offset) / 8));
  for (int i = 0; i < 7; ++i) v.push_back(-normal_quantile(offset + i * (0.5 - offset) / 7));
  v.push_back(0.0);
  std::sort(v.begin(), v.end());
  const double mx = v.back();
  ASSERT_NEAR(mx, 1.848, 1e-3) << "Phi^-1(0.9677083)";
  const auto& l = nf4_levels();
  for (int i = 0; i < 16; ++i) EXPECT_NEAR(l[i], v[i] / mx, 1e-6) << "level " << i;
}

// Every element's NF4 code is a nearest level of w/a (a the true block absmax), its dequantised value is exactly
// that level times block_absmax (an fp32 product), and its error is within a H + s/2. Block sizes include ragged
// last blocks (1073 = 16*64 + 49; 39000 = 609*64 + 24) and more than 256 blocks (several double-quant groups).
TEST(Quant, Nf4RoundTripIsNearestLevelWithinBound) {
  const double H = nf4_max_half_gap();
  ASSERT_NEAR(H, (1.0 - 0.6961928009986877) / 2, 1e-12) << "the widest gap is the bottom one";
  struct Case {
    std::vector<int64_t> shape;
    int64_t bs;
  };
  torch::manual_seed(11);
  for (const Case& c : {Case{{37, 29}, 64}, Case{{300, 130}, 64}, Case{{300, 130}, 32}, Case{{41, 23}, 50},
                        Case{{16, 16}, 256}}) {
    for (bool dq : {false, true}) {
      SCOPED_TRACE("shape " + std::to_string(c.shape[0]) + "x" + std::to_string(c.shape[1]) + " block " +
                   std::to_string(c.bs) + (dq ? " double quant" : ""));
      auto w = torch::randn(c.shape) * 0.05;
      auto q = quantize(w, spec_of(QuantType::NF4, c.bs, dq));
      const int64_t nb = (w.numel() + c.bs - 1) / c.bs;
      ASSERT_EQ(q.num_blocks(), nb);
      ASSERT_EQ(q.codes.scalar_type(), torch::kByte);
      ASSERT_EQ(q.codes.numel(), nb * c.bs / 2);
      auto deq = dequantize(q, torch::kFloat);
      ASSERT_EQ(deq.sizes(), w.sizes());
      ASSERT_EQ(deq.scalar_type(), torch::kFloat);

      auto wv = to_vec(w), dv = to_vec(deq), am = to_vec(block_absmax(q));
      auto a = naive_absmax(wv, c.bs);
      auto da = absmax_error_bound(q);
      auto codes = unpack_nf4(q);
      const auto& lv = nf4_levels();
      double sum_err = 0, sum_bound = 0, max_ratio = 0;
      int64_t wrong_level = 0, not_exact = 0, out_of_bound = 0;
      for (size_t i = 0; i < wv.size(); ++i) {
        const int64_t b = i / c.bs;
        const double u = wv[i] / a[b];
        double best = 1e9;
        for (int k = 0; k < 16; ++k) best = std::min(best, std::fabs(u - kBnbNf4[k]));
        if (std::fabs(u - kBnbNf4[codes[i]]) > best + 1e-6) ++wrong_level;
        if (dv[i] != lv[codes[i]] * am[b]) ++not_exact;
        const double err = std::fabs(double(wv[i]) - dv[i]);
        const double bound = a[b] * H + da[b];
        if (err > bound + 1e-6 * a[b]) ++out_of_bound;
        max_ratio = std::max(max_ratio, err / bound);
        sum_err += err;
        sum_bound += bound;
      }
      EXPECT_EQ(wrong_level, 0) << "codes that are not a nearest level";
      EXPECT_EQ(not_exact, 0) << "values that are not level * block_absmax";
      EXPECT_EQ(out_of_bound, 0) << "largest err/bound " << max_ratio;
      // The padding of the last block holds the code of level 0.
      for (size_t i = wv.size(); i < codes.size(); ++i) EXPECT_EQ(codes[i], 7) << "padding element " << i;
      // Normal data mostly falls where the levels are dense: the typical error is a fraction of the worst case
      // (measured about 0.18 of it), and it is not zero (4 bits cannot store fp32 weights exactly); the largest
      // error comes close to the bound (measured 0.86 to 1.0 of it).
      EXPECT_LT(sum_err / sum_bound, 0.3);
      EXPECT_GT(sum_err / sum_bound, 0.05);
      EXPECT_GT(max_ratio, 0.5) << "the bound is not loose by much";
    }
  }
}

// int8: the code is round(127 w/a), the error at most a/254 (+ s/2 with double quantisation).
TEST(Quant, Int8RoundTripWithinBound) {
  torch::manual_seed(12);
  for (int64_t bs : {64, 33, 128}) {
    for (bool dq : {false, true}) {
      SCOPED_TRACE("block " + std::to_string(bs) + (dq ? " double quant" : ""));
      auto w = torch::randn({300, 130}) * 0.05;
      auto q = quantize(w, spec_of(QuantType::Int8, bs, dq));
      const int64_t nb = (w.numel() + bs - 1) / bs;
      ASSERT_EQ(q.codes.scalar_type(), torch::kChar);
      ASSERT_EQ(q.codes.numel(), nb * bs);
      auto wv = to_vec(w), dv = to_vec(dequantize(q, torch::kFloat)), cv = to_vec(q.codes);
      auto a = naive_absmax(wv, bs);
      auto da = absmax_error_bound(q);
      int64_t bad_code = 0, out_of_bound = 0;
      double sum_err = 0, sum_bound = 0, max_ratio = 0;
      for (size_t i = 0; i < wv.size(); ++i) {
        const int64_t b = i / bs;
        if (std::fabs(cv[i] - 127.0 * wv[i] / a[b]) > 0.5 + 1e-4) ++bad_code;
        const double err = std::fabs(double(wv[i]) - dv[i]);
        const double bound = a[b] / 254 + da[b];
        if (err > bound + 1e-6 * a[b]) ++out_of_bound;
        max_ratio = std::max(max_ratio, err / bound);
        sum_err += err;
        sum_bound += bound;
      }
      EXPECT_EQ(bad_code, 0);
      EXPECT_EQ(out_of_bound, 0) << "largest err/bound " << max_ratio;
      // The rounding error is about uniform over [-step/2, step/2]: its mean is half the bound without double
      // quantisation (measured 0.49), less with it (0.30 to 0.34: the s/2 term is a worst case).
      EXPECT_GT(sum_err / sum_bound, 0.1);
      EXPECT_LT(sum_err / sum_bound, 0.6);
      EXPECT_GT(max_ratio, 0.5);
      for (size_t i = wv.size(); i < cv.size(); ++i) EXPECT_EQ(cv[i], 0.0f) << "padding element " << i;
    }
  }
}

// Double quantisation stores the absmax as int8 in groups of 256 around their fp32 mean; block_absmax is within
// half a step of the true absmax and the whole weight takes fewer bytes than with fp32 absmax.
TEST(Quant, DoubleQuantStoresAbsmaxInInt8) {
  torch::manual_seed(13);
  auto w = torch::randn({300, 130});  // 610 blocks of 64: groups of 256, 256, 98
  auto dq = quantize(w, spec_of(QuantType::NF4, 64, true));
  auto plain = quantize(w, spec_of(QuantType::NF4, 64, false));
  ASSERT_EQ(dq.absmax.scalar_type(), torch::kChar);
  ASSERT_EQ(dq.absmax.numel(), 610);
  ASSERT_EQ(dq.absmax_scale.scalar_type(), torch::kFloat);
  ASSERT_EQ(dq.absmax_scale.numel(), 3);
  ASSERT_EQ(dq.absmax_mean.dim(), 0);
  ASSERT_EQ(plain.absmax.scalar_type(), torch::kFloat);
  EXPECT_FALSE(plain.absmax_scale.defined());
  EXPECT_TRUE(torch::equal(dq.codes, plain.codes)) << "codes are taken against the true absmax";

  auto a = naive_absmax(to_vec(w), 64);
  double mean = 0;
  for (double x : a) mean += x / a.size();
  EXPECT_NEAR(dq.absmax_mean.item<double>(), mean, 1e-6 * mean);
  auto am_plain = to_vec(block_absmax(plain)), am = to_vec(block_absmax(dq)), s = to_vec(dq.absmax_scale);
  double max_dev = 0;
  for (size_t b = 0; b < a.size(); ++b) {
    EXPECT_EQ(am_plain[b], float(a[b])) << "block " << b;
    const double step = s[b / 256];
    EXPECT_LE(std::fabs(am[b] - a[b]), step / 2 + 1e-6 * a[b]) << "block " << b;
    max_dev = std::max(max_dev, std::fabs(am[b] - a[b]));
  }
  EXPECT_GT(max_dev, 0.0) << "the absmax was not quantised";
  // The scale is the group's largest |a - mean| / 127.
  for (int g = 0; g < 3; ++g) {
    double m = 0;
    for (size_t b = g * 256; b < std::min<size_t>(a.size(), (g + 1) * 256); ++b)
      m = std::max(m, std::fabs(a[b] - mean));
    EXPECT_NEAR(s[g], m / 127, 1e-6 * m);
  }
  EXPECT_LT(dq.bytes(), plain.bytes());
  EXPECT_EQ(plain.bytes() - dq.bytes(), 610 * 3 - 3 * 4 - 4) << "fp32 absmax -> int8 absmax + 3 scales + a mean";
}

// The storage of a 4096 x 4096 weight: NF4 with block 64 and double quantisation is 4 bits per parameter plus
// 8 bits per 64 parameters (int8 absmax) plus 32 bits per 64*256 (group scales) plus one fp32 mean: 4.127 bits.
TEST(Quant, BytesMatchTheHandFormula) {
  const int64_t n = 4096LL * 4096;
  torch::manual_seed(14);
  auto w = torch::randn({4096, 4096});
  auto q = quantize(w, spec_of(QuantType::NF4, 64, true));
  const int64_t nb = n / 64, groups = (nb + 255) / 256;
  EXPECT_EQ(q.bytes(), n / 2 + nb + 4 * groups + 4);
  const double bits = 8.0 * q.bytes() / n;
  EXPECT_NEAR(bits, 4 + 8.0 / 64 + 32.0 / (64 * 256), 1e-5);
  EXPECT_NEAR(bits, 4.127, 1e-3);
  EXPECT_EQ(quantize(w, spec_of(QuantType::NF4, 64, false)).bytes(), n / 2 + 4 * nb);
  EXPECT_EQ(quantize(w, spec_of(QuantType::Int8, 64, true)).bytes(), n + nb + 4 * groups + 4);
  // A ragged weight is padded to whole blocks.
  EXPECT_EQ(quantize(torch::randn({3, 7}), spec_of(QuantType::NF4, 8, false)).bytes(), 3 * 8 / 2 + 3 * 4);
}

// quantized_linear computes at::linear(x, dequantize(q)) and its x-gradient is the float one, for fp32 and
// bf16 x; for fp64 x it dequantises to fp64.
TEST(Quant, LinearMatchesDequantizedLinear) {
  torch::manual_seed(15);
  const int64_t O = 24, I = 40;
  auto w = torch::randn({O, I}) * 0.1;
  auto q = std::make_shared<const QuantizedWeight>(quantize(w, spec_of(QuantType::NF4, 64, true)));
  for (auto dt : {torch::kFloat, torch::kBFloat16}) {
    SCOPED_TRACE(dt == torch::kFloat ? "fp32" : "bf16");
    auto x = torch::randn({5, I}).to(dt).requires_grad_(true);
    auto up = torch::randn({5, O}).to(dt);
    auto y = quantized_linear(x, q);
    ASSERT_EQ(y.scalar_type(), dt);
    auto x_ref = x.detach().clone().requires_grad_(true);
    auto y_ref = at::linear(x_ref, dequantize(*q, dt));
    EXPECT_TRUE(torch::equal(y, y_ref));
    (y * up).sum().backward();
    (y_ref * up).sum().backward();
    ASSERT_TRUE(x.grad().defined());
    ASSERT_EQ(x.grad().scalar_type(), dt);
    // Same products in another kernel: allow one rounding of the output dtype.
    const double tol = (dt == torch::kFloat ? 1e-6 : 1.0 / 128) * x_ref.grad().abs().max().item<double>();
    EXPECT_LE(max_abs_diff(x.grad(), x_ref.grad()), tol);
    // And the float one, independently of autograd: dL/dx = up W.
    auto g_expected = torch::matmul(up.to(torch::kFloat), dequantize(*q, torch::kFloat));
    const double tol_f = (dt == torch::kFloat ? 1e-5 : 0.02) * g_expected.abs().max().item<double>();
    EXPECT_LE(max_abs_diff(x.grad(), g_expected), tol_f);
  }
}

// Central finite differences of L = sum(y * up) in fp64 (L is linear in x, so the only error is roundoff).
TEST(Quant, LinearGradientMatchesFp64FiniteDifferences) {
  torch::manual_seed(16);
  const int64_t O = 12, I = 20;
  auto q = std::make_shared<const QuantizedWeight>(quantize(torch::randn({O, I}), spec_of(QuantType::NF4, 16, true)));
  auto x = torch::randn({3, I}, torch::kDouble).requires_grad_(true);
  auto up = torch::randn({3, O}, torch::kDouble);
  auto y = quantized_linear(x, q);
  ASSERT_EQ(y.scalar_type(), torch::kDouble);
  EXPECT_LT(max_abs_diff(y, at::linear(x.detach(), dequantize(*q, torch::kDouble))), 1e-12);
  (y * up).sum().backward();
  auto g = x.grad().view({-1});
  auto xv = x.detach().clone().view({-1});
  const double h = 1e-3;
  torch::NoGradGuard ng;
  for (int64_t i : {0, 7, 19, 21, 40, 59}) {
    const double orig = xv[i].item<double>();
    xv[i] = orig + h;
    const double lp = (quantized_linear(xv.view({3, I}), q) * up).sum().item<double>();
    xv[i] = orig - h;
    const double lm = (quantized_linear(xv.view({3, I}), q) * up).sum().item<double>();
    xv[i] = orig;
    EXPECT_NEAR(g[i].item<double>(), (lp - lm) / (2 * h), 1e-9) << "element " << i;
  }
}

// The frozen weight is outside the graph: quantize drops w's autograd history, nothing in the QuantizedWeight
// requires grad, and autograd finds no path from the output to w. x of shape [B, T, in] works.
TEST(Quant, LinearGradientGoesToXOnly) {
  torch::manual_seed(17);
  auto w = torch::randn({8, 32}).requires_grad_(true);
  auto q = std::make_shared<const QuantizedWeight>(quantize(w, QuantSpec{}));
  for (const auto& t : {q->codes, q->absmax, q->absmax_scale, q->absmax_mean}) {
    ASSERT_TRUE(t.defined());
    EXPECT_FALSE(t.requires_grad());
  }
  auto x = torch::randn({2, 3, 32}).requires_grad_(true);
  auto y = quantized_linear(x, q);
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{2, 3, 8}));
  EXPECT_TRUE(torch::equal(y, at::linear(x.detach(), dequantize(*q, torch::kFloat))));
  auto grads = torch::autograd::grad({y.sum()}, {x, w}, {}, /*retain_graph=*/true, /*create_graph=*/false,
                                     /*allow_unused=*/true);
  ASSERT_TRUE(grads[0].defined());
  EXPECT_EQ(grads[0].sizes(), x.sizes());
  EXPECT_FALSE(grads[1].defined()) << "a gradient path to the quantised weight";
  auto ones = torch::ones({2, 3, 8});
  EXPECT_LT(max_abs_diff(grads[0], torch::matmul(ones, dequantize(*q, torch::kFloat))), 1e-5);
  y.sum().backward();
  EXPECT_FALSE(w.grad().defined());
  // With x frozen too there is no graph at all.
  EXPECT_FALSE(quantized_linear(x.detach(), q).requires_grad());
}

// An all-zero block (absmax 0) dequantises to exact zeros, without NaN, for both types, with and without double
// quantisation, also when the whole weight is zero (every absmax 0: double-quant scale 0).
TEST(Quant, ZeroBlocksGiveZeros) {
  torch::manual_seed(18);
  auto w = torch::randn({4, 64});
  w[1].zero_();
  for (auto type : {QuantType::NF4, QuantType::Int8})
    for (bool dq : {false, true}) {
      SCOPED_TRACE(quant_type_name(type) + (dq ? " double quant" : ""));
      auto q = quantize(w, spec_of(type, 64, dq));
      auto d = dequantize(q, torch::kFloat);
      EXPECT_FALSE(d.isnan().any().item<bool>());
      EXPECT_TRUE(torch::equal(d[1], torch::zeros({64})));
      EXPECT_GT(d[0].abs().max().item<double>(), 0.0);
      if (type == QuantType::NF4) {
        EXPECT_TRUE(torch::equal(q.codes.narrow(0, 32, 32), torch::full({32}, 0x77, torch::kByte)));
      }
      auto z = quantize(torch::zeros({3, 10}), spec_of(type, 8, dq));
      auto dz = dequantize(z, torch::kFloat);
      EXPECT_TRUE(torch::equal(dz, torch::zeros({3, 10})));
      EXPECT_FALSE(block_absmax(z).isnan().any().item<bool>());
    }
}

TEST(Quant, BadBlockSizeIsUserError) {
  auto w = torch::randn({4, 8});
  for (int64_t bs : {0, -64}) {
    for (auto type : {QuantType::NF4, QuantType::Int8}) {
      try {
        quantize(w, spec_of(type, bs, true));
        ADD_FAILURE() << "block " << bs << " accepted";
      } catch (const UserError& e) {
        EXPECT_NE(std::string(e.what()).find("finetune.quant.block_size"), std::string::npos) << e.what();
      }
    }
  }
  EXPECT_THROW(quantize(w, spec_of(QuantType::NF4, 33, true)), UserError) << "NF4 packs two codes per byte";
  EXPECT_NO_THROW(quantize(w, spec_of(QuantType::Int8, 33, true)));
}

// Shapes other than 2-D, dtypes other than fp32, and moving between devices (here CPU to CPU).
TEST(Quant, AnyShapeDtypeAndCopy) {
  torch::manual_seed(19);
  for (const auto& shape : std::vector<std::vector<int64_t>>{{}, {5}, {3, 5, 7}, {0, 8}}) {
    auto w = torch::randn(shape, torch::kDouble);
    auto q = quantize(w, QuantSpec{});
    auto d = dequantize(q, torch::kDouble);
    ASSERT_EQ(d.sizes(), w.sizes());
    ASSERT_EQ(d.scalar_type(), torch::kDouble);
    if (w.numel() > 0) {
      EXPECT_LE(max_abs_diff(d, w), w.abs().max().item<double>() * (nf4_max_half_gap() + 0.01));
    }
  }
  auto wb = torch::randn({6, 16}).to(torch::kBFloat16);
  auto qb = quantize(wb, spec_of(QuantType::Int8, 16, false));
  EXPECT_LE(max_abs_diff(dequantize(qb, torch::kFloat), wb), wb.abs().max().item<double>() / 254 * 1.001);
  auto moved = qb.to(torch::Device(torch::kCPU));
  EXPECT_EQ(moved.device(), torch::Device(torch::kCPU));
  EXPECT_EQ(moved.bytes(), qb.bytes());
  EXPECT_TRUE(torch::equal(dequantize(moved, torch::kFloat), dequantize(qb, torch::kFloat)));
}
