// moeforge plan's arithmetic: the per-rank bytes of weights, gradients and optimizer state against values
// computed by hand for a small config in several layouts, adapters per rank, and the activation model against
// what LibTorch actually keeps alive after a forward (bytes counted by a wrapping CPU allocator).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/error.h"
#include "counting_allocator.h"
#include "model/decoder.h"
#include "model/finetune.h"
#include "model/memory_plan.h"
#include "test_util.h"

using namespace moeforge;

namespace {
// tiny_config by hand: embedding 64x32 = 2048, LM head 2048, attention 2 x (32x32 + 16x32 + 16x32 + 32x32) = 6144,
// router 2 x 4x32 = 256, norms 2 x 2 x 32 + 32 = 160: dense 10,656; experts 2 x 4 x 3 x 32x48 = 36,864.
constexpr double kDense = 10656, kExperts = 36864;

PlanInput input(int world, int expert, bool zero, const std::string& precision) {
  PlanInput p;
  p.model = test::tiny_config();
  p.precision = precision;
  p.world = world;
  p.expert = expert;
  p.zero = zero;
  return p;
}
}  // namespace

TEST(MemoryPlan, FullTrainingBytesPerRankByHand) {
  auto one = plan_rank(input(1, 1, false, "fp32"));
  EXPECT_EQ(one.params_held, 47520);
  EXPECT_DOUBLE_EQ(one.weights, 4 * (kDense + kExperts));
  EXPECT_DOUBLE_EQ(one.gradients, 4 * (kDense + kExperts));
  EXPECT_DOUBLE_EQ(one.optimizer, 8 * (kDense + kExperts));
  EXPECT_DOUBLE_EQ(one.compute_copies, 0);
  // EP 2 of 2 ranks: half the experts each.
  auto ep2 = plan_rank(input(2, 2, false, "fp32"));
  EXPECT_DOUBLE_EQ(ep2.weights, 4 * (kDense + kExperts / 2));
  // 4 ranks = 2 DP x EP 2 with ZeRO-1: dense state over 4 ranks, expert state over the 2 replicas.
  auto zero = plan_rank(input(4, 2, true, "fp32"));
  EXPECT_DOUBLE_EQ(zero.optimizer, 8 * (kDense / 4 + kExperts / 2 / 2));
  EXPECT_DOUBLE_EQ(zero.gradients, 4 * (kDense + kExperts / 2));
  // bf16: the bf16 copies of attention, experts (this rank's) and the LM head, 2 bytes each.
  auto bf = plan_rank(input(2, 2, false, "bf16"));
  EXPECT_DOUBLE_EQ(bf.compute_copies, 2 * (6144 + kExperts / 2 + 2048));
  EXPECT_THROW(plan_rank(input(3, 2, false, "fp32")), UserError);  // EP must divide the world
  EXPECT_THROW(plan_rank(input(3, 3, false, "fp32")), UserError);  // and the experts
}

TEST(MemoryPlan, AdaptersPerRankByHand) {
  auto p = input(2, 2, false, "bf16");
  p.finetune.method = "lora";
  p.finetune.lora.rank = 4;
  p.finetune.lora.targets = {"q_proj", "w1"};
  auto r = plan_rank(p);
  // q_proj: 4 x (32 + 32) per layer; w1: 4 x (32 + 48) per expert, 2 of 4 experts per rank.
  const double t = 2 * 4 * (32 + 32) + 2 * 2 * 4 * (32 + 48);
  EXPECT_EQ(r.trainable, static_cast<int64_t>(t));
  EXPECT_DOUBLE_EQ(r.adapters, 4 * t);
  EXPECT_DOUBLE_EQ(r.optimizer, 8 * t);
  // The base: attention and this rank's experts in bf16, the rest fp32.
  EXPECT_DOUBLE_EQ(r.weights, 2 * (6144 + kExperts / 2) + 4 * (kDense - 6144));
}

// The activation model against LibTorch: bytes alive after the forward and the loss (the graph the backward
// will walk), minus what existed before, for fp32 and bf16 compute.
TEST(MemoryPlan, ActivationsMatchWhatTheForwardKeeps) {
  auto& counting = test::CountingAllocator::install();
  struct Case {
    std::string precision, method;
  };
  for (const Case& k : {Case{"fp32", "full"}, Case{"bf16", "full"}, Case{"bf16", "lora"}}) {
    const std::string& precision = k.precision;
    ModelConfig c = test::tiny_config();
    c.vocab_size = 512;
    c.hidden_size = 64;
    c.intermediate_size = 160;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.max_position_embeddings = 128;
    const int64_t B = 4, T = 64;
    MixtralForCausalLM m(c);
    init_weights(*m, 0.02, 1);
    FinetuneSpec ft;
    ft.method = k.method;
    if (ft.adapters()) {  // a frozen base stored in bf16, adapters on the default targets
      freeze_base(m);
      for (auto& l : m->model->layers) store_linear_weights(*l, torch::kBFloat16);
      attach_lora(m, ft.lora, 1);
    }
    if (precision == "bf16") m->set_compute_dtype(torch::kBFloat16);
    m->train();
    auto ids = torch::randint(0, c.vocab_size, {B, T}, torch::kLong);
    auto targets = torch::randint(0, c.vocab_size, {B * T}, torch::kLong);
    const int64_t before = counting.now.load();
    auto out = m->forward(ids);
    auto loss = torch::nn::functional::cross_entropy(out.logits.reshape({-1, c.vocab_size}).to(torch::kFloat), targets);
    const double alive = static_cast<double>(counting.now.load() - before);
    PlanInput p;
    p.model = c;
    p.precision = precision;
    p.finetune = ft;
    p.micro_batch = B;
    p.seq_len = T;
    auto r = plan_rank(p);
    // After the forward: the layers' activations, the bf16 weight copies, the logits and their log-softmax.
    const double c_bytes = precision == "bf16" ? 2 : 4;
    const double predicted = r.activations + r.compute_copies + static_cast<double>(B * T * c.vocab_size) * (c_bytes + 4);
    std::printf("[plan] %s %s: predicted %.0f, alive %.0f bytes (%.3f)\n", precision.c_str(), k.method.c_str(), predicted,
                alive, predicted / alive);
    EXPECT_NEAR(predicted / alive, 1.0, 0.2) << precision << ": predicted " << predicted << " bytes, alive " << alive;
    loss.backward();
  }
}
