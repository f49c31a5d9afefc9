// moeforge bench moe: forward+backward of one MoE block against the same FLOPs done
// without routing (one dense SwiGLU FFN over all N*k assignments) and a plain matmul,
// measured in the same run, so the ratio shows what routing costs. --dtype bf16 runs the block in
// mixed precision as training does (fp32 weights and router, bf16 expert matmuls).
#include <torch/csrc/autograd/profiler_legacy.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli/cli.h"
#include "core/compat.h"
#include "core/error.h"
#include "model/decoder.h"
#include "model/moe_block.h"

namespace moeforge::cli {

namespace {

template <class F>
double time_it(F&& f, int warmup, int iters) {
  for (int i = 0; i < warmup; ++i) f();
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
}

}  // namespace

int cmd_bench(const Args& in) {
  Args args = in;
  if (args.empty() || args[0] != "moe") throw UserError("bench: expected 'moe' (usage: moeforge bench moe [options])");
  args.erase(args.begin());
  std::string v;
  int64_t N = 4096, H = 512, I = 1024, E = 8, K = 2, iters = 5, threads = 0;
  std::string device = "cpu", dtype_name = "fp32";
  if (take_option(args, "--tokens", &v)) N = parse_int("--tokens", v);
  if (take_option(args, "--hidden", &v)) H = parse_int("--hidden", v);
  if (take_option(args, "--intermediate", &v)) I = parse_int("--intermediate", v);
  if (take_option(args, "--experts", &v)) E = parse_int("--experts", v);
  if (take_option(args, "--top-k", &v)) K = parse_int("--top-k", v);
  if (take_option(args, "--iters", &v)) iters = parse_int("--iters", v);
  if (take_option(args, "--threads", &v)) threads = parse_int("--threads", v);
  take_option(args, "--device", &device);
  take_option(args, "--dtype", &dtype_name);
  const bool json = take_flag(args, "--json");
  reject_unknown_flags(args, "bench moe",
                       {"--tokens", "--hidden", "--intermediate", "--experts", "--top-k", "--iters", "--threads",
                        "--device", "--dtype", "--json"});
  if (!args.empty()) throw UserError("bench moe: unexpected argument '" + args[0] + "'");
  if (N <= 0 || H <= 0 || I <= 0 || E <= 0 || K <= 0 || iters <= 0)
    throw UserError("bench moe: sizes and --iters must be positive");
  if (K > E) throw UserError("bench moe: --top-k exceeds --experts");
  if (device != "cpu" && device != "cuda") throw UserError("bench moe: --device must be cpu or cuda");
  if (dtype_name != "fp32" && dtype_name != "bf16") throw UserError("bench moe: --dtype must be fp32 or bf16");
  if (device == "cuda" && !torch::cuda::is_available()) throw UserError("bench moe: --device cuda but no CUDA device");
  int nthreads = compat::configure_threads(static_cast<int>(threads));
  auto dev = torch::Device(device == "cuda" ? torch::kCUDA : torch::kCPU);
  auto dtype = dtype_name == "bf16" ? torch::kBFloat16 : torch::kFloat;

  ModelConfig cfg;
  cfg.hidden_size = H;
  cfg.intermediate_size = I;
  cfg.moe.num_experts = E;
  cfg.moe.num_experts_per_tok = K;
  // The MoE block as training runs it: fp32 parameters and router; under bf16 the experts compute in bf16
  // from their fp32 master weights (mixed precision). The dense FFN and the plain matmul run in `dtype`.
  MoEBlock block(cfg);
  init_weights(*block, 0.02, 1234);
  block->to(dev);
  const std::optional<at::ScalarType> compute =
      dtype == torch::kFloat ? std::nullopt : std::optional<at::ScalarType>(dtype);
  Expert dense(H, I);
  init_weights(*dense, 0.02, 1234);
  dense->to(dev, dtype);

  torch::manual_seed(0);
  auto x = torch::randn({N, H}, torch::TensorOptions().device(dev)).requires_grad_(true);
  auto xd = torch::randn({N * K, H}, torch::TensorOptions().dtype(dtype).device(dev)).requires_grad_(true);
  auto a = torch::randn({N * K, H}, torch::TensorOptions().dtype(dtype).device(dev));
  auto b = torch::randn({H, I}, torch::TensorOptions().dtype(dtype).device(dev));

  auto sync = [&](const torch::Tensor& t) { (void)t.sum().item<double>(); };
  const double expert_flops = 3.0 * (2.0 * static_cast<double>(N * K) * 3.0 * H * I);  // fwd + 2x bwd
  const double mm_flops = 2.0 * static_cast<double>(N * K) * H * I;

  double t_moe = time_it([&] {
    block->zero_grad(/*set_to_none=*/true);  // as the trainer does
    auto out = block->forward(x, compute);
    out.y.sum().backward();
    sync(x.grad());
  }, 1, static_cast<int>(iters));
  // Developer hook, as `train` has (docs/performance.md): MOEFORGE_PROFILE=trace.json records the MoE block's
  // per-op profile over --iters more iterations.
  if (const char* profile_path = std::getenv("MOEFORGE_PROFILE")) {
    torch::autograd::profiler::RecordProfile profile{std::string(profile_path)};
    for (int64_t i = 0; i < iters; ++i) {
      block->zero_grad(/*set_to_none=*/true);  // as the trainer does
      auto out = block->forward(x, compute);
      out.y.sum().backward();
      sync(x.grad());
    }
  }
  double t_dense = time_it([&] {
    dense->zero_grad(/*set_to_none=*/true);
    auto y = dense->forward(xd);
    y.sum().backward();
    sync(xd.grad());
  }, 1, static_cast<int>(iters));
  double t_mm = time_it([&] { sync(torch::mm(a, b)); }, 1, static_cast<int>(iters) * 3);

  const double gf_moe = expert_flops / t_moe / 1e9, gf_dense = expert_flops / t_dense / 1e9,
               gf_mm = mm_flops / t_mm / 1e9;
  if (json) {
    nlohmann::json j = {{"tokens", N}, {"hidden", H}, {"intermediate", I}, {"experts", E}, {"top_k", K},
                        {"device", device}, {"dtype", dtype_name}, {"threads", nthreads},
                        {"moe_seconds", t_moe}, {"moe_tokens_per_s", N / t_moe}, {"moe_gflops", gf_moe},
                        {"dense_ffn_gflops", gf_dense}, {"matmul_gflops", gf_mm},
                        {"moe_vs_dense_ffn", gf_moe / gf_dense}, {"moe_vs_matmul", gf_moe / gf_mm}};
    std::cout << j.dump() << "\n";
    return 0;
  }
  std::printf("MoE block fwd+bwd: tokens %ld, hidden %ld, intermediate %ld, experts %ld, top-%ld, %s %s, %d threads\n",
              (long)N, (long)H, (long)I, (long)E, (long)K, device.c_str(), dtype_name.c_str(), nthreads);
  std::printf("  MoE block        %8.3f s/iter  %10.0f tokens/s  %7.1f GFLOP/s (expert matmuls)\n", t_moe, N / t_moe,
              gf_moe);
  std::printf("  dense SwiGLU FFN %8.3f s/iter  (same FLOPs, no routing)   %7.1f GFLOP/s\n", t_dense, gf_dense);
  std::printf("  plain matmul     [%ld x %ld] x [%ld x %ld]                  %7.1f GFLOP/s\n", (long)(N * K), (long)H,
              (long)H, (long)I, gf_mm);
  std::printf("  ratio: MoE / dense FFN = %.2f, MoE / plain matmul = %.2f\n", gf_moe / gf_dense, gf_moe / gf_mm);
  return 0;
}

}  // namespace moeforge::cli
