// moeforge upcycle CKPT_OR_HF_DIR --experts E [--top-k K] [--granularity G] [--noise S] [--seed N] [--dtype fp32|bf16]
//                  --out CKPT
// Sparse upcycling (Komatsuzaki et al. 2022): a dense model (a moeforge checkpoint of a config with one expert,
// or a Hugging Face Mistral / Llama directory) becomes a Mixtral of E experts, each a copy of the dense MLP, and a
// fresh router (N(0, init_std), drawn from --seed as `init` draws it) choosing K of them. With identical experts the
// K weights, renormalised to sum to 1, multiply one and the same output, so whatever the router says the first
// forward is the dense model's. --noise S perturbs every expert's copy, w + S * std(w) * N(0, 1) from a stream of
// its own (seed and parameter name), so that the experts can drift apart from the first step; the first forward is
// then the dense model's up to that noise. The attention, norms and embeddings are copied. The result is written one
// expert share at a time with the source read tensor by tensor, so neither model is ever held whole; the MoE keys
// are the defaults (aux_loss balancing) but for the expert count and top-k.
//
// --granularity G (granular upcycling, He et al. 2024, "Upcycling Large Language Models into Mixture of
// Experts"): the dense MLP of width I is cut into G slices of I / G (rows of w1 and w3, columns of w2), and the E
// experts are E / G copies of each slice (expert e is slice e / (E / G)). The dense MLP is the plain sum of its
// slices, so the first forward stays the dense model's when every token picks each slice equally: the router is
// one fresh [E / G, H] matrix repeated G times ("virtual groups": expert e's row is row e mod E / G), so its
// logits come in G identical blocks and the top K (a multiple of G, default G) are the same K / G copies in every
// block; renormalised, each slice's weights sum to 1 / G, and each slice's w2 is scaled by G to undo it.
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>

#include "cli/cli.h"
#include "core/error.h"
#include "io/hf_checkpoint.h"
#include "io/model_config_yaml.h"
#include "model/decoder.h"
#include "model/param_count.h"
#include "model/param_names.h"
#include "checkpoint/base_model.h"
#include "checkpoint/checkpoint.h"
#include "checkpoint/share_writer.h"

namespace moeforge::cli {

namespace fs = std::filesystem;

namespace {

// "model.layers.3.block_sparse_moe.experts.5.w1.weight" -> "model.layers.3.block_sparse_moe.experts.0.w1.weight"
std::string dense_source_of(const std::string& expert_param) {
  const auto p = parse_expert_param(expert_param);
  return expert_param_name(p->layer, 0, p->rest);
}

}  // namespace

int cmd_upcycle(const Args& in) {
  Args args = in;
  std::string out, experts_s, topk_s, noise_s = "0", seed_s = "0", dtype = "fp32", granularity_s = "1";
  if (!take_option(args, "--out", &out)) throw UserError("upcycle: --out CHECKPOINT is required");
  if (!take_option(args, "--experts", &experts_s)) throw UserError("upcycle: --experts E is required");
  take_option(args, "--top-k", &topk_s);
  take_option(args, "--granularity", &granularity_s);
  take_option(args, "--noise", &noise_s);
  take_option(args, "--seed", &seed_s);
  take_option(args, "--dtype", &dtype);
  reject_unknown_flags(args, "upcycle",
                       {"--out", "--experts", "--top-k", "--granularity", "--noise", "--seed", "--dtype"});
  if (args.size() != 1) throw UserError("upcycle: expected one dense CHECKPOINT or Hugging Face directory");
  const int64_t G = parse_int("--granularity", granularity_s);
  if (G < 1) throw UserError("upcycle: --granularity must be at least 1, got " + granularity_s);
  if (topk_s.empty()) topk_s = G > 1 ? granularity_s : "2";
  const int64_t E = parse_int("--experts", experts_s), K = parse_int("--top-k", topk_s);
  const double noise = parse_double("--noise", noise_s);
  if (E < 2) throw UserError("upcycle: --experts must be at least 2, got " + experts_s);
  if (G > 1 && (E % G != 0 || E == G))
    throw UserError("upcycle: with --granularity " + granularity_s + ", --experts must be a multiple of it above it (E / G "
                    "copies of each of the G slices of the MLP; E = G sends every token to every expert), got " + experts_s);
  if (K < 1 || K > E) throw UserError("upcycle: --top-k must be between 1 and --experts (" + experts_s + "), got " + topk_s);
  if (G > 1 && K % G != 0)
    throw UserError("upcycle: with --granularity " + granularity_s + ", --top-k must be a multiple of it (every token "
                    "takes K / G copies of each slice), got " + topk_s);
  if (!(noise >= 0) || !std::isfinite(noise)) throw UserError("upcycle: --noise must be a non-negative number, got " + noise_s);
  char* end = nullptr;
  const unsigned long long seed = std::strtoull(seed_s.c_str(), &end, 10);
  if (seed_s.empty() || *end || seed_s[0] == '-')
    throw UserError("upcycle: --seed must be a non-negative integer, got '" + seed_s + "'");
  if (dtype != "fp32" && dtype != "bf16") throw UserError("upcycle: --dtype must be fp32 or bf16, got '" + dtype + "'");
  if (fs::exists(out) && !(fs::is_directory(out) && fs::is_empty(out)))
    throw UserError(out + ": already exists; choose a new --out directory");

  // The source, read one tensor at a time under our names.
  const std::string src = args[0];
  ModelConfig dense;
  std::string tokenizer;
  std::unique_ptr<io::HfCheckpoint> hf;
  std::unique_ptr<train::CheckpointTensors> ckpt;
  std::function<at::Tensor(const std::string&)> get;
  if (fs::exists(src + "/config.json")) {
    hf = std::make_unique<io::HfCheckpoint>(src);
    dense = hf->config();
    tokenizer = hf->tokenizer_path();
    get = [&](const std::string& n) { return hf->get(n).to(at::kFloat); };
  } else {
    dense = train::read_checkpoint_config(src);  // UserError when it is neither
    if (train::read_base_pointer(src))
      throw UserError(src + ": is an adapter checkpoint; export it (--format hf) and upcycle the export");
    if (dense.dense()) ckpt = std::make_unique<train::CheckpointTensors>(src, dense);
    tokenizer = train::checkpoint_tokenizer(src);
    get = [&](const std::string& n) { return ckpt->get(n).to(at::kFloat); };
  }
  if (!dense.dense())
    throw UserError(src + ": has " + std::to_string(dense.moe.num_experts) +
                    " experts per layer; upcycle starts from a dense model (model.moe.num_experts: 1)");

  if (dense.intermediate_size % G != 0)
    throw UserError(src + ": intermediate_size " + std::to_string(dense.intermediate_size) +
                    " does not split into --granularity " + granularity_s + " equal slices");

  ModelConfig cfg = dense;
  cfg.name = dense.name + "-upcycled";
  cfg.intermediate_size = dense.intermediate_size / G;
  cfg.moe = MoEConfig{};
  cfg.moe.num_experts = E;
  cfg.moe.num_experts_per_tok = K;
  io::validate_model_config(cfg, "upcycle");

  if (fs::exists(out)) fs::remove(out);
  train::write_checkpoint_by_shares(
      cfg, out, train::default_expert_shares(cfg),
      [&](MixtralForCausalLM& m, int k) {
        torch::NoGradGuard ng;
        // The dense MLP's tensors of the layer at hand, read once for all of its experts in this share.
        std::string cached_layer;
        std::map<std::string, at::Tensor> cache;
        auto dense_mlp = [&](const std::string& expert_param) -> at::Tensor {
          const auto p = parse_expert_param(expert_param);
          if (p->layer != cached_layer) {
            cache.clear();
            cached_layer = p->layer;
          }
          const std::string name = dense_source_of(expert_param);
          auto it = cache.find(name);
          if (it == cache.end()) it = cache.emplace(name, get(name)).first;
          return it->second;
        };
        // Share 0 writes the dense part; the others only their experts.
        init_weights(*m, cfg.init_std, seed,
                     [](const std::string& n) { return n.find(".block_sparse_moe.gate.") != std::string::npos; });
        const int64_t copies = E / G, I = cfg.intermediate_size;
        for (auto& p : m->named_parameters()) {
          const std::string& n = p.key();
          if (n.find(".block_sparse_moe.gate.") != std::string::npos) {  // the fresh router (virtual groups: G blocks)
            if (G > 1 && k == 0) p.value().copy_(p.value().index_select(0, torch::arange(E) % copies));
            continue;
          }
          const auto ep = parse_expert_param(n);
          const bool expert = ep.has_value();
          if (!expert && k != 0) continue;
          at::Tensor w = expert ? dense_mlp(n) : get(n);
          const bool w2 = expert && ep->rest.rfind("w2.", 0) == 0;
          auto want = p.value().sizes().vec();
          if (expert) want[w2 ? 1 : 0] *= G;  // the whole dense MLP
          if (w.sizes().vec() != want)
            throw UserError(src + ": tensor '" + (expert ? dense_source_of(n) : n) + "' has shape " +
                            c10::str(w.sizes()) + ", its config implies " + c10::str(c10::IntArrayRef(want)));
          if (expert && G > 1) {  // this expert's slice; w2's scaled by G (the router gives each slice 1 / G)
            const int64_t g = ep->expert / copies;
            w = w2 ? w.narrow(1, g * I, I) * static_cast<double>(G) : w.narrow(0, g * I, I).clone();
          }
          if (expert && noise > 0) {
            auto gen = at::detail::createCPUGenerator(param_seed(seed, n + "#upcycle-noise"));
            w = w + noise * w.std().item<double>() * at::randn(w.sizes(), gen, at::TensorOptions().dtype(at::kFloat));
          }
          p.value().copy_(w);
        }
        for (auto& b : m->named_buffers())
          if (b.key().find("expert_bias") != std::string::npos) b.value().zero_();
        if (dtype == "bf16")
          for (auto& p : m->parameters()) p.set_data(p.detach().to(torch::kBFloat16));
      },
      tokenizer, "upcycle");
  std::printf("upcycled %s (dense, %lld parameters) -> %s: %lld experts of %lld (granularity %lld), top-%lld, noise %g "
              "(%lld parameters, %lld active)\n",
              src.c_str(), static_cast<long long>(count_params(dense).total), out.c_str(), static_cast<long long>(E),
              static_cast<long long>(cfg.intermediate_size), static_cast<long long>(G), static_cast<long long>(K), noise,
              static_cast<long long>(count_params(cfg).total), static_cast<long long>(count_params(cfg).active));
  return 0;
}

}  // namespace moeforge::cli
