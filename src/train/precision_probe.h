// runtime.precision: auto. A short measured probe at start-up picks fp32 or bf16 (mixed) for the run: a
// whole training step's forward and backward, on the machine at hand, at the run's shapes. The matmul ratio
// alone does not decide it: on LibTorch 1.13 for CPU the bf16 step's casts, softmaxes and gathers can cost
// more than its matmuls save (issue 26 measured bf16 at 0.72x fp32 on an AMD EPYC whose bf16 matmul is 4x).
#pragma once
#include <c10/core/Device.h>

#include <string>

#include "model/config.h"

namespace moeforge::train {

struct PrecisionProbe {
  double fp32_s = 0, bf16_s = 0;  // best forward+backward seconds of the probe model, per precision
  int layers = 0;                 // decoder layers of the probe model
  std::string chosen() const { return bf16_s < fp32_s ? "bf16" : "fp32"; }
};

// Times the forward and backward of the LM loss on a `micro_batch` x `seq_len` batch of random tokens through a
// model of `cfg` with half its decoder layers, at most as many as fit in 64 M parameters, at least one (the layers repeat,
// so their costs are what the whole step is made of; a rank of a large model never builds the whole model for
// it: one Mixtral 8x7B layer with the embedding and head is 1.7 B parameters, about 14 GB in fp32 with its
// gradients, against some 750 GB for the whole model's training state), fp32 and bf16 interleaved over 3 rounds
// after a warm-up, best of each, with the run's activation recomputation (`recompute`: none | full | moe). It
// draws from no generator of the run (the global one is put back) and allocates only the probe model, freed on
// return. Its fp32 step holds fp32 activations: where a bf16 run only just fits in memory, name the precision.
PrecisionProbe probe_precision(const ModelConfig& cfg, int64_t micro_batch, int64_t seq_len, const std::string& recompute,
                               const c10::Device& device);

}  // namespace moeforge::train
