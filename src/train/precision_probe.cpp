#include "train/precision_probe.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <limits>

#include "data/lm_dataset.h"
#include "model/decoder.h"
#include "model/finetune.h"
#include "model/mixed.h"
#include "model/param_count.h"
#include "model/recompute.h"
#include "objective/lm_objective.h"

namespace moeforge::train {

PrecisionProbe probe_precision(const ModelConfig& cfg, int64_t micro_batch, int64_t seq_len, const std::string& recompute,
                               const c10::Device& device) {
  using Clock = std::chrono::steady_clock;
  PrecisionProbe p;
  // Half the run's layers, at most as many as fit in 64 M parameters, at least one: its fp32 pass holds fp32
  // activations, and a probe of every layer would raise a bf16 run's peak memory above the run's own (the
  // quickstart's: 845 against 606 MiB).
  ModelConfig c = cfg;
  c.num_layers = 1;
  const int64_t one = count_params(c).total;
  c.num_layers = 2;
  const int64_t per_layer = std::max<int64_t>(1, count_params(c).total - one);
  c.num_layers = std::max<int64_t>(1, std::min<int64_t>(cfg.num_layers / 2, 1 + (int64_t{64} * 1000 * 1000 - one) / per_layer));
  p.layers = static_cast<int>(c.num_layers);
  // Module construction draws its default initialisation from the global generator: keep the run's stream.
  auto global = at::detail::getDefaultCPUGenerator();
  const at::Tensor saved = global.get_state();
  MixtralForCausalLM m(c);
  global.set_state(saved);
  init_weights(*m, c.init_std, /*seed=*/1);
  move_to(m, device);
  m->set_recompute(parse_recompute(recompute));  // a run that recomputes to fit its memory: so does the probe
  m->train();
  at::Generator gen = at::detail::createCPUGenerator(2);
  data::LmBatch b;
  {
    auto ids = at::randint(c.vocab_size, {micro_batch, seq_len + 1}, gen, at::TensorOptions().dtype(at::kLong));
    b.inputs = ids.narrow(1, 0, seq_len).contiguous();
    b.targets = ids.narrow(1, 1, seq_len).contiguous();
  }
  auto step = [&](const char* precision) {
    m->set_compute_dtype(compute_dtype_for(precision));
    const auto t0 = Clock::now();
    BatchLoss l = lm_loss(m, b, device);
    l.total.backward();
    // Reading a gradient waits for the backward on an asynchronous device.
    (void)m->model->embed_tokens->weight.grad().sum().item<double>();
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    for (auto& q : m->parameters()) q.mutable_grad() = at::Tensor();
    return s;
  };
  step("fp32");  // warm-up: first-touch allocation, kernel selection, thread-pool start
  step("bf16");
  p.fp32_s = p.bf16_s = std::numeric_limits<double>::infinity();
  for (int round = 0; round < 3; ++round) {  // interleaved, so that drift of the machine hits both alike
    p.fp32_s = std::min(p.fp32_s, step("fp32"));
    p.bf16_s = std::min(p.bf16_s, step("bf16"));
  }
  return p;
}

}  // namespace moeforge::train
