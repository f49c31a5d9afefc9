#include "train/trainer.h"

#include <torch/csrc/autograd/profiler_legacy.h>
#include <torch/torch.h>

#include <dlfcn.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"
#include "data/lm_dataset.h"
#include "io/init_source.h"
#include "io/safetensors.h"
#include "model/finetune.h"
#include "model/mixed.h"
#include "model/param_count.h"
#include "model/recompute.h"
#include "parallel/dist.h"
#include "parallel/layout.h"
#include "checkpoint/base_model.h"
#include "checkpoint/checkpoint.h"
#include "output/metrics.h"
#include "checkpoint/model_setup.h"
#include "objective/moe_terms.h"
#include "optim/optimizer.h"
#include "train/precision_probe.h"
#include "recipe/recipe_keys.h"
#include "output/run_log.h"
#include "optim/schedule.h"
#include "train/stage.h"

namespace moeforge::train {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double training_flops_per_token(const ModelConfig& c, int64_t seq_len) {
  ParamCounts p = count_params(c);
  const double dense_active = static_cast<double>(p.active - p.embedding);
  return 6.0 * dense_active + 12.0 * c.num_layers * static_cast<double>(seq_len) * c.q_dim();
}

double measure_peak_gflops(const std::string& device, const std::string& precision) {
  torch::NoGradGuard ng;
  const bool cuda = device == "cuda";
  const bool bf16 = precision == "bf16";
  const int64_t n = cuda ? 8192 : 2048;
  auto opts = torch::TensorOptions().dtype(bf16 ? torch::kBFloat16 : torch::kFloat).device(cuda ? torch::kCUDA : torch::kCPU);
  // Constant inputs: timing does not depend on the values, and the global RNG (which a resumed
  // run has just restored) must not be consumed here.
  auto a = torch::full({n, n}, 0.5, opts), b = torch::full({n, n}, 0.25, opts);
  (void)torch::mm(a, b).sum().item<double>();  // warm-up
  // Up to 20 (CUDA) / 10 (CPU) products, stopping after half a second: where bf16 is emulated a product can
  // take seconds, and every run (and every test) starts with this.
  const int max_iters = cuda ? 20 : 10;
  auto t0 = Clock::now();
  int iters = 0;
  double s = 0;
  while (iters < max_iters && s < 0.5) {
    (void)torch::mm(a, b).sum().item<double>();
    ++iters;
    s = std::chrono::duration<double>(Clock::now() - t0).count();
  }
  return 2.0 * n * n * n * iters / s / 1e9;
}

static std::string allocator_in_use() {
  // tcmalloc, where it is linked (CMakeLists.txt), answers its own property query with the bytes it serves.
  using Query = int (*)(const char*, size_t*);
  auto q = reinterpret_cast<Query>(::dlsym(RTLD_DEFAULT, "MallocExtension_GetNumericProperty"));
  size_t bytes = 0;
  return q && q("generic.current_allocated_bytes", &bytes) && bytes > 0 ? "tcmalloc" : "glibc";
}

// Hands the allocator's free pages back to the system (tcmalloc only; a no-op under glibc, whose trimming
// src/cli/main.cpp turns off). Called between passes of different shapes (the precision probe, evaluation,
// checkpoint writing): each would otherwise take new pages while the others' stay cached, and the process's
// peak grows with every kind of pass rather than with the largest. Steps re-fault what they need once.
static void release_free_memory() {
  using Release = void (*)();
  static auto f = reinterpret_cast<Release>(::dlsym(RTLD_DEFAULT, "MallocExtension_ReleaseFreeMemory"));
  if (f) f();
}

int64_t peak_rss_bytes() {
  std::FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return 0;
  char line[256];
  int64_t kib = 0;
  while (std::fgets(line, sizeof line, f))
    if (std::sscanf(line, "VmHWM: %ld kB", &kib) == 1) break;
  std::fclose(f);
  return kib * 1024;
}

double unigram_entropy(const std::string& data_dir, const std::string& split) {
  auto ds = std::make_shared<data::TokenDataset>(data_dir, split);
  data::TokenStream stream(ds);
  std::vector<int64_t> counts(static_cast<size_t>(ds->meta().vocab_size), 0);
  std::vector<int64_t> buf(1 << 16);
  for (uint64_t pos = 0; pos < stream.size(); pos += buf.size()) {
    uint64_t n = std::min<uint64_t>(buf.size(), stream.size() - pos);
    stream.read(pos, n, buf.data());
    for (uint64_t i = 0; i < n; ++i) ++counts[static_cast<size_t>(buf[i])];
  }
  const double total = static_cast<double>(stream.size());
  double h = 0;
  for (auto c : counts)
    if (c > 0) h -= (c / total) * std::log(c / total);
  return h;
}

namespace {

torch::Device pick_device(const RuntimeConfig& rt, const std::string& recipe_path, int local_rank) {
  if (rt.device == "cuda" && !torch::cuda::is_available())
    throw UserError(recipe_path + ": key 'runtime.device': cuda requested but no CUDA device is available");
  return parallel::local_rank_device(rt.device == "cuda" || (rt.device == "auto" && torch::cuda::is_available()),
                                     local_rank);
}

// runtime.precision: auto becomes fp32 or bf16 before anything is built: a resumed run keeps the precision its
// checkpoint was trained in, a new one takes the faster of the probe (train/precision_probe.h), every rank the
// same (their probe times summed). The recipe written to the run and its checkpoints names the choice. Returns
// what summary.json records of it (null when the recipe named a precision).
nlohmann::json resolve_auto_precision(Recipe& r, const std::optional<std::string>& latest, parallel::Layout& layout,
                                      const torch::Device& device) {
  if (r.runtime.precision != "auto") return nullptr;
  nlohmann::json j;
  if (latest) {
    r.runtime.precision = checkpoint_precision(*latest);
    j = {{"rule", "resumed"}, {"chosen", r.runtime.precision}};
    MF_INFO("runtime.precision auto: " << r.runtime.precision << ", the precision of the run being resumed");
  } else {
    PrecisionProbe p = probe_precision(r.model, r.train.micro_batch_size, r.train.seq_len, r.train.activation_checkpointing,
                                       device);
    std::vector<torch::Tensor> v{torch::tensor({p.fp32_s, p.bf16_s}, torch::kDouble)};
    layout.all_reduce_sum(v);
    p.fp32_s = v[0][0].item<double>() / layout.world();
    p.bf16_s = v[0][1].item<double>() / layout.world();
    r.runtime.precision = p.chosen();
    j = {{"rule", "probe"}, {"chosen", r.runtime.precision}, {"probe_layers", p.layers},
         {"fp32_step_s", p.fp32_s}, {"bf16_step_s", p.bf16_s}};
    MF_INFO("runtime.precision auto: " << r.runtime.precision << " (probe of " << p.layers << " layer"
                                       << (p.layers == 1 ? "" : "s") << " at " << r.train.micro_batch_size << " x "
                                       << r.train.seq_len << " tokens: forward and backward fp32 "
                                       << static_cast<int>(p.fp32_s * 1e3 + 0.5) << " ms, bf16 "
                                       << static_cast<int>(p.bf16_s * 1e3 + 0.5) << " ms)");
  }
  r.yaml = recipe_keys().emit(r);
  release_free_memory();  // the probe's fp32 pass
  return j;
}

parallel::LayoutOptions layout_options(const Recipe& r) {
  parallel::LayoutOptions lo;
  lo.expert = static_cast<int>(r.parallel_expert);
  lo.zero = r.parallel_zero == 1;
  lo.timeout = std::chrono::milliseconds(r.parallel_timeout_s * 1000);
  lo.source = r.path;
  return lo;
}

void log_adapters(const FinetuneSpec& ft, parallel::Layout& layout, MixtralForCausalLM& model) {
  int64_t trainable = 0;
  for (auto& [n, p] : layout.named_parameters()) trainable += p.numel();
  MF_INFO("fine-tuning " << ft.method << ": " << trainable << " trainable adapter parameters on this rank (rank "
                         << ft.lora.rank << ", alpha " << ft.lora.alpha << ")"
                         << (ft.quantized() ? "; base weights stored " + quant_type_name(ft.quant.type) + ", " +
                                                  std::to_string(quantized_bytes(model) >> 20) + " MiB"
                                            : std::string()));
}

// MFU compares the tokens of all ranks with the matmul rate of all ranks (each measured with its threads), in the
// precision the matmuls run in.
double peak_gflops_of_job(parallel::Layout& layout, const std::string& device, const std::string& precision) {
  std::vector<torch::Tensor> v{torch::tensor({measure_peak_gflops(device, precision)}, torch::kDouble)};
  layout.all_reduce_sum(v);
  return v[0].item<double>();
}

// moe.balance_scope global_batch matters only where a step has more than one micro-batch; where it changes
// nothing, rank 0 says why.
bool global_balance_in_effect(const ModelConfig& cfg, const Stage& stage, const TrainLoopConfig& tc, int W,
                              bool main_rank) {
  const bool global_balance = cfg.moe.balance == Balance::AuxLoss && cfg.moe.balance_scope == BalanceScope::GlobalBatch &&
                              stage.aux_loss_coef() > 0 && tc.grad_accum * W > 1;
  if (cfg.moe.balance_scope == BalanceScope::GlobalBatch && !global_balance && main_rank)
    MF_WARN("model.moe.balance_scope global_batch changes nothing here: "
            << (cfg.moe.balance != Balance::AuxLoss ? std::string("moe.balance is ") + balance_name(cfg.moe.balance) +
                                                          " (the scope is the aux loss's)"
                : stage.aux_loss_coef() <= 0 ? std::string("the aux loss coefficient is 0")
                                             : std::string("a step is one micro-batch on one rank")));
  if (global_balance && tc.grad_accum > 1)
    MF_INFO("global-batch balance over " << tc.grad_accum << " micro-batches: each step first routes them without "
                                            "gradient (one extra forward per micro-batch)");
  return global_balance;
}

// Developer hook: MOEFORGE_PROFILE=trace.json records LibTorch's per-op profile (chrome trace) of steps
// MOEFORGE_PROFILE_STEPS=from:to (default 20:25, 0-based), for docs/performance.md's accounting.
class StepProfile {
 public:
  StepProfile() : path_(std::getenv("MOEFORGE_PROFILE")) {
    if (const char* ps = std::getenv("MOEFORGE_PROFILE_STEPS"))
      if (std::sscanf(ps, "%ld:%ld", &from_, &to_) != 2)
        throw UserError("MOEFORGE_PROFILE_STEPS: expected from:to, got '" + std::string(ps) + "'");
  }
  void before_step(int64_t step) {
    if (path_ && step == from_) profile_.emplace(std::string(path_));
    if (step == to_) profile_.reset();
  }

 private:
  const char* path_;
  int64_t from_ = 20, to_ = 25;
  std::optional<torch::autograd::profiler::RecordProfile> profile_;
};

// Test hook: an interruption right after the checkpoint of step MOEFORGE_TEST_KILL_AFTER_CHECKPOINT (resume
// tests), of one rank (MOEFORGE_TEST_KILL_RANK, default every rank), by SIGKILL or SIGSTOP (a hung rank).
void maybe_stop_for_test(int64_t step, int rank) {
  const char* kill_after = std::getenv("MOEFORGE_TEST_KILL_AFTER_CHECKPOINT");
  const char* kill_rank = std::getenv("MOEFORGE_TEST_KILL_RANK");
  if (kill_after && std::to_string(step) == kill_after && (!kill_rank || std::to_string(rank) == kill_rank))
    std::raise(std::getenv("MOEFORGE_TEST_KILL_SIGNAL") && std::string(std::getenv("MOEFORGE_TEST_KILL_SIGNAL")) == "STOP"
                   ? SIGSTOP
                   : SIGKILL);
}

}  // namespace

TrainResult run_training(const Recipe& given, bool force_resume) {
  Recipe r = given;  // runtime.precision: auto is resolved below
  const parallel::DistEnv denv = parallel::read_dist_env();
  const int threads = parallel::configure_rank_threads(r.runtime.threads, denv.world_size);
  const torch::Device device = pick_device(r.runtime, r.path, denv.local_rank);
  const std::string run_dir = r.output_dir;
  const bool resume = force_resume || r.resume == "auto";
  if (fs::exists(run_dir) && !fs::is_directory(run_dir)) throw UserError(run_dir + ": exists and is not a directory");
  if (fs::exists(run_dir) && !fs::is_empty(run_dir) && !resume)
    throw UserError(run_dir + ": run directory already exists; set 'resume: auto' (or pass --resume) to continue it, "
                              "or choose another output_dir");
  parallel::Layout layout(denv, layout_options(r), device);
  layout.barrier();  // every rank has checked the run directory before rank 0 writes into it
  const bool main_rank = layout.is_main();
  const ModelConfig& cfg = r.model;
  const auto& tc = r.train;

  const std::optional<std::string> latest = resume ? latest_checkpoint_of_job(run_dir, layout) : std::nullopt;
  const nlohmann::json precision_choice = resolve_auto_precision(r, latest, layout, device);
  std::unique_ptr<Stage> stage = make_stage(r);

  // Model and optimizer: this rank's share, built and loaded without the rest ever existing here.
  const FinetuneSpec& ft = r.finetune;
  TrainingModel built = build_training_model(r, layout, latest);
  MixtralForCausalLM model = built.model;
  const BasePointer base = built.base;
  move_to(model, device);
  if (ft.adapters()) log_adapters(ft, layout, model);
  model->set_compute_dtype(compute_dtype_for(r.runtime.precision));
  model->set_recompute(parse_recompute(tc.activation_checkpointing));
  model->train();
  AdamW opt(layout.named_parameters(), AdamWOptions{r.optim.beta1, r.optim.beta2, r.optim.eps, r.optim.weight_decay},
            layout.owned());
  if (layout.zero())
    MF_INFO("ZeRO-1: optimizer state " << opt.state_bytes() / 1024 << " KiB on rank " << layout.rank() << " (of "
                                       << layout.unsharded_state_bytes() / 1024 << " KiB unsharded)");

  const int64_t tokens_per_step = tc.micro_batch_size * tc.seq_len * tc.grad_accum;
  int64_t total_steps = tc.max_steps;
  if (tc.max_tokens) total_steps = std::max<int64_t>(1, std::min(total_steps, *tc.max_tokens / tokens_per_step));

  TrainerState state;
  state.seq_len = tc.seq_len;
  state.seed = tc.seed;
  state.samples_seen = tc.skip_samples;  // a resumed run reads its own count below
  if (latest) {
    load_training_state(*latest, opt, state, model);
    if (state.seq_len != tc.seq_len || state.seed != tc.seed)
      throw UserError(*latest + ": was trained with seq_len " + std::to_string(state.seq_len) + " and seed " +
                      std::to_string(state.seed) + "; the recipe now says " + std::to_string(tc.seq_len) + " and " +
                      std::to_string(tc.seed));
    MF_INFO("resuming from " << *latest << " (step " << state.step << ")");
  }
  const bool resumed = latest.has_value();
  std::unique_ptr<MetricsLog> metrics;
  if (main_rank) {
    fs::create_directories(run_dir);
    write_file_atomic(run_dir + "/config.yaml", r.yaml);
    metrics = std::make_unique<MetricsLog>(run_dir, state.step);  // drops lines written after the last checkpoint
  }
  layout.barrier();
  stage->start(run_dir, device, main_rank, model, [&](uint64_t v) { return layout.xor_over_expert_group(v); });

  const std::string dev_name = device.is_cuda() ? "cuda" : "cpu";
  const double peak = peak_gflops_of_job(layout, dev_name, r.runtime.precision);
  const double flops_per_token = training_flops_per_token(cfg, tc.seq_len);
  const ParamCounts pc = count_params(cfg);
  const int W = layout.world();
  if (!resumed) MF_INFO("starting a new run in " << run_dir);
  MF_INFO("model " << cfg.name << ": " << pc.total << " parameters, " << pc.active << " active; " << dev_name << ", "
                   << threads << " threads, " << r.runtime.precision
                   << (tc.activation_checkpointing != "none" ? ", recomputing " + tc.activation_checkpointing : std::string())
                   << "; peak " << r.runtime.precision << " matmul " << static_cast<int>(peak) << " GFLOP/s; allocator "
                   << allocator_in_use());
  MF_INFO("training " << total_steps << " steps of " << tokens_per_step * W << " tokens (" << tc.micro_batch_size
                      << " x " << tc.seq_len << " x " << tc.grad_accum << " accumulation"
                      << (W > 1 ? " x " + std::to_string(W) + " ranks" : std::string()) << "); "
                      << (W > 1 ? "layout " + layout.describe() + "; " : std::string()) << stage->describe());

  const int L = static_cast<int>(cfg.num_layers);
  const bool global_balance = global_balance_in_effect(cfg, *stage, tc, W, main_rank);
  RunLog log(std::move(metrics), main_rank, total_steps, flops_per_token, peak);
  EvalResult last_eval;
  auto log_eval = [&](const EvalResult& ev) {
    log.eval(state.step, ev);
    last_eval = ev;
  };
  if (!resumed && stage->evaluates_at_start())
    log_eval(stage->evaluate(model, tc.micro_batch_size, tc.eval_batches, device));
  double train_seconds = 0;       // optimizer steps only (no eval, no checkpoints), this process
  int64_t tokens_this_run = 0;
  double interval_seconds = 0;
  int64_t interval_tokens = 0, interval_steps = 0;
  double last_loss = NAN, last_val = NAN;
  auto run_start = Clock::now();
  const double elapsed_before = state.elapsed_s;

  // Micro-batch a of this step on this rank.
  auto micro_batch = [&](int64_t a) {
    return stage->train_batch(model, state.samples_seen + layout.global_micro_batch(a) * tc.micro_batch_size,
                              tc.micro_batch_size, device);
  };
  StepProfile profile;
  if (const std::string dump = test_dump_path(); !dump.empty() && !resumed) {  // adapters before step 1
    std::vector<std::pair<std::string, torch::Tensor>> adapters;
    for (auto& [n, t] : saved_parameters(model))
      if (n.find(".lora_") != std::string::npos) adapters.emplace_back(n, t.to(torch::kFloat));
    io::write_safetensors(dump + ".init.safetensors", adapters);
  }
  while (state.step < total_steps) {
    profile.before_step(state.step);
    auto t0 = Clock::now();
    const double lr = lr_at(state.step, total_steps, r.optim.warmup_steps, r.optim.lr, r.optim.min_lr,
                            r.optim.schedule, r.optim.decay_fraction);
    opt.zero_grad();
    StepTotals step(L);
    // Global-batch balance: the aux loss's fractions over the whole step. With several micro-batches per rank
    // they are counted first by a forward of each without gradient, from the same random draws (router
    // jitter, adapter dropout) the step's passes then make, and summed over the ranks.
    GlobalBalance gb;
    std::optional<GlobalBalanceScope> gb_scope;
    if (global_balance) {
      gb.parts = static_cast<double>(tc.grad_accum * W);
      gb.all_reduce_sum = [&](std::vector<torch::Tensor>& v) { layout.all_reduce_sum(v); };
      gb_scope.emplace(gb);
      if (tc.grad_accum > 1) {
        const std::vector<torch::Tensor> draws = model->random_state();
        {
          torch::NoGradGuard ng;
          for (int64_t a = 0; a < tc.grad_accum; ++a) (void)micro_batch(a);
        }
        model->set_random_state(draws);
        finish_counting(gb);
      } else {
        gb.phase = GlobalBalance::Phase::ReduceAndApply;
      }
    }
    for (int64_t a = 0; a < tc.grad_accum; ++a) {
      BatchLoss l = micro_batch(a);
      (l.total / static_cast<double>(tc.grad_accum)).backward();
      step.add(l, tc.grad_accum);
    }
    gb_scope.reset();  // evaluation below scores each batch alone
    state.samples_seen += tc.micro_batch_size * tc.grad_accum * W;
    layout.sync_gradients();
    step.reduce(layout);
    if (!std::isfinite(step.loss))
      throw UserError("training diverged: loss is " + std::to_string(step.loss) + " at step " +
                      std::to_string(state.step + 1) + "; lower optim.lr");
    const double gnorm = layout.clip_grad_norm(r.optim.grad_clip);
    opt.step(lr);
    layout.share_updated_parameters();
    // With adapters the routers' biases are the base's, frozen, unless finetune.lora.update_expert_bias.
    if (cfg.moe.balance == Balance::AuxFreeBias && (!ft.adapters() || ft.lora.update_expert_bias)) {
      auto blocks = model->moe_blocks();
      for (int i = 0; i < L; ++i) blocks[i]->gate->update_expert_bias(step.loads[i], cfg.moe.bias_update_rate, cfg.moe.bias_update);
    }
    state.step += 1;
    state.tokens_seen += step.tokens;
    state.target_tokens_seen += step.targets;
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    train_seconds += dt;
    tokens_this_run += step.tokens;
    interval_seconds += dt;
    interval_tokens += step.tokens;
    ++interval_steps;
    last_loss = step.loss;

    if (state.step % tc.log_interval == 0 || state.step == total_steps) {
      const double tps = interval_tokens / std::max(interval_seconds, 1e-9);
      const double eta = (total_steps - state.step) * interval_seconds / std::max<int64_t>(1, interval_steps);
      log.train(state, step, stage->total_loss(step.loss, step.aux, step.z, step.metrics), lr, gnorm, tps, eta);
      interval_seconds = 0;
      interval_tokens = 0;
      interval_steps = 0;
    }
    if (state.step % tc.eval_interval == 0 || state.step == total_steps) {
      release_free_memory();
      EvalResult ev = stage->evaluate(model, tc.micro_batch_size, tc.eval_batches, device);
      last_val = ev.loss;
      log_eval(ev);
      release_free_memory();
    }
    if (state.step % tc.checkpoint_interval == 0 || state.step == total_steps) {
      state.elapsed_s = elapsed_before + std::chrono::duration<double>(Clock::now() - run_start).count();
      CheckpointContents c;
      c.config = &cfg;
      c.model = model;
      c.optimizer = &opt;
      c.state = &state;
      c.tokenizer_path = stage->tokenizer();
      c.recipe_yaml = r.yaml;
      if (ft.adapters()) c.base_json = base_pointer_json(base);
      const std::string dir = save_checkpoint(layout, run_dir, c, static_cast<int>(tc.keep_checkpoints));
      release_free_memory();
      if (main_rank) MF_INFO("checkpoint " << dir);
      maybe_stop_for_test(state.step, layout.rank());
    }
  }

  TrainResult res;
  res.run_dir = run_dir;
  res.steps = state.step;
  res.final_train_loss = last_loss;
  if (std::isnan(last_val)) {
    EvalResult ev = stage->evaluate(model, tc.micro_batch_size, tc.eval_batches, device);
    last_val = ev.loss;
    last_eval = ev;
  }
  res.final_val_loss = last_val;
  res.tokens_per_second = tokens_this_run / std::max(train_seconds, 1e-9);
  res.mfu = flops_per_token * res.tokens_per_second / (peak * 1e9);
  nlohmann::json summary = {
      {"stage", r.stage},
      {"steps", state.step},
      {"tokens", state.tokens_seen},
      {"final_train_loss", std::isnan(last_loss) ? nlohmann::json(nullptr) : nlohmann::json(last_loss)},
      {"final_val_loss", last_val},
      {"final_val_perplexity",
       std::isnan(last_eval.perplexity) ? nlohmann::json(nullptr) : nlohmann::json(std::exp(last_val))},
      {"tokens_per_second", res.tokens_per_second},
      {"mfu", res.mfu},
      {"peak_gflops", peak},
      {"model_flops_per_token", flops_per_token},
      {"total_params", pc.total},
      {"active_params", pc.active},
      {"device", dev_name},
      {"precision", r.runtime.precision},
      {"precision_choice", precision_choice},
      {"activation_checkpointing", tc.activation_checkpointing},
      {"peak_rss_bytes", peak_rss_bytes()},
      {"allocator", allocator_in_use()},
      {"threads", threads},
      {"elapsed_s", elapsed_before + std::chrono::duration<double>(Clock::now() - run_start).count()}};
  for (const auto& [k, v] : last_eval.metrics) summary["final_val_" + k] = v;
  stage->summarize(summary);
  {  // every rank's peak resident memory (VmHWM), for memory plans checked against measurement
    auto t = torch::zeros({W}, torch::kLong);
    t[layout.rank()] = peak_rss_bytes();
    std::vector<at::Tensor> ts{t};
    layout.all_reduce_sum(ts);
    summary["peak_rss_bytes_per_rank"] = std::vector<int64_t>(ts[0].data_ptr<int64_t>(), ts[0].data_ptr<int64_t>() + W);
  }
  summary["data_parallel_ranks"] = layout.data_parallel();
  summary["expert_parallel_ranks"] = layout.expert_parallel();
  summary["world_size"] = W;
  if (main_rank) write_file_atomic(run_dir + "/summary.json", summary.dump(2) + "\n");
  const double h = summary.value("unigram_entropy", NAN);
  std::string extra;
  if (!std::isnan(h)) extra = " (unigram entropy of the val tokens " + std::to_string(h).substr(0, 6) + ")";
  for (const char* k : {"rewards/accuracies", "rewards/margins"})
    if (last_eval.metrics.count(k)) extra += " | val " + std::string(k) + " " + std::to_string(last_eval.metrics.at(k)).substr(0, 6);
  if (main_rank)
    std::fprintf(stderr, "done: %ld steps | final val loss %.4f%s | %.0f tokens/s | MFU %.1f%% of a %.0f GFLOP/s %s matmul\n",
                 (long)state.step, last_val, extra.c_str(), res.tokens_per_second, 100 * res.mfu, peak,
                 r.runtime.precision.c_str());
  return res;
}

}  // namespace moeforge::train
