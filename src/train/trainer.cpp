#include "train/trainer.h"

#include <torch/torch.h>

#include <thread>

#include <chrono>
#include <csignal>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "core/compat.h"
#include "core/error.h"
#include "core/log.h"
#include "data/lm_dataset.h"
#include "model/load_balance.h"
#include "model/param_count.h"
#include "parallel/dist.h"
#include "parallel/expert_parallel.h"
#include "parallel/grad_sync.h"
#include "train/checkpoint.h"
#include "train/evaluate.h"
#include "train/lm_objective.h"
#include "train/metrics.h"
#include "train/optimizer.h"
#include "train/schedule.h"
#include "train/stage_data.h"

namespace moeforge::train {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double training_flops_per_token(const ModelConfig& c, int64_t seq_len) {
  ParamCounts p = count_params(c);
  const double dense_active = static_cast<double>(p.active - p.embedding);
  return 6.0 * dense_active + 12.0 * c.num_layers * static_cast<double>(seq_len) * c.q_dim();
}

double measure_peak_gflops(const std::string& device) {
  torch::NoGradGuard ng;
  const bool cuda = device == "cuda";
  const int64_t n = cuda ? 8192 : 2048;
  auto opts = torch::TensorOptions().dtype(cuda ? torch::kBFloat16 : torch::kFloat).device(cuda ? torch::kCUDA : torch::kCPU);
  // Constant inputs: timing does not depend on the values, and the global RNG (which a resumed
  // run has just restored) must not be consumed here.
  auto a = torch::full({n, n}, 0.5, opts), b = torch::full({n, n}, 0.25, opts);
  (void)torch::mm(a, b).sum().item<double>();  // warm-up
  const int iters = cuda ? 20 : 3;
  auto t0 = Clock::now();
  torch::Tensor c;
  for (int i = 0; i < iters; ++i) c = torch::mm(a, b);
  (void)c.sum().item<double>();
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  return 2.0 * n * n * n * iters / s / 1e9;
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

std::string fmt_duration(double s) {
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%dh%02dm", static_cast<int>(s / 3600), static_cast<int>(s / 60) % 60);
  else std::snprintf(buf, sizeof buf, "%dm%02ds", static_cast<int>(s / 60), static_cast<int>(s) % 60);
  return buf;
}

void write_json_atomic(const std::string& path, const nlohmann::json& j) {
  {
    std::ofstream out(path + ".tmp");
    out << j.dump(2) << "\n";
  }
  fsync_path(path + ".tmp");
  fs::rename(path + ".tmp", path);
}

torch::Device pick_device(const RuntimeConfig& rt, const std::string& recipe_path, int local_rank) {
  if (rt.device == "cuda" && !torch::cuda::is_available())
    throw UserError(recipe_path + ": key 'runtime.device': cuda requested but no CUDA device is available");
  const bool cuda = rt.device == "cuda" || (rt.device == "auto" && torch::cuda::is_available());
  if (rt.precision == "bf16" && !cuda)
    throw UserError(recipe_path + ": key 'runtime.precision': bf16 mixed precision needs a CUDA device; use fp32 on CPU");
  // Each local rank takes its own GPU.
  const int n = cuda ? static_cast<int>(torch::cuda::device_count()) : 0;
  return cuda ? torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(local_rank % std::max(1, n)))
              : torch::Device(torch::kCPU);
}

}  // namespace

TrainResult run_training(const Recipe& r, bool force_resume) {
  // Ranks: WORLD_SIZE processes (one when the variables are not set) = DP data-parallel replicas x EP
  // expert-parallel ranks. Ranks dp*EP .. dp*EP+EP-1 share one copy of the experts (an expert-parallel
  // group); the ranks holding the same experts (one per replica) average their gradients.
  const parallel::DistEnv denv = parallel::read_dist_env();
  const int W = denv.world_size, rank = denv.rank;
  const int EP = static_cast<int>(r.parallel_expert);
  if (W % EP != 0)
    throw UserError(r.path + ": key 'parallel.expert': " + std::to_string(EP) + " does not divide the number of processes (" +
                    std::to_string(W) + (W == 1 ? "; start the ranks with `moeforge launch --nproc-per-node N -- train ...`"
                                                : "") + ")");
  const int DP = W / EP, ep_rank = rank % EP, dp_rank = rank / EP;
  int want_threads = r.runtime.threads;
  if (want_threads == 0 && W > 1) {  // share the cores among the ranks of this machine
    const char* lws = std::getenv("LOCAL_WORLD_SIZE");
    const int local = lws ? std::max(1, std::atoi(lws)) : W;
    want_threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / local);
  }
  const int threads = compat::configure_threads(want_threads);
  const torch::Device device = pick_device(r.runtime, r.path, denv.local_rank);
  const std::string run_dir = r.output_dir;
  const bool resume = force_resume || r.resume == "auto";
  if (fs::exists(run_dir) && !fs::is_directory(run_dir)) throw UserError(run_dir + ": exists and is not a directory");
  if (fs::exists(run_dir) && !fs::is_empty(run_dir) && !resume)
    throw UserError(run_dir + ": run directory already exists; set 'resume: auto' (or pass --resume) to continue it, "
                              "or choose another output_dir");
  std::unique_ptr<parallel::Dist> dist =
      W > 1 ? std::make_unique<parallel::Dist>(denv, std::chrono::milliseconds(r.parallel_timeout_s * 1000), device)
            : std::make_unique<parallel::Dist>();
  dist->barrier();  // every rank has checked the run directory before rank 0 writes into it
  std::shared_ptr<parallel::Group> ep_group, replica_group;
  if (EP > 1) {
    std::vector<int> ep_ranks, replica_ranks;
    for (int k = 0; k < EP; ++k) ep_ranks.push_back(dp_rank * EP + k);
    for (int j = 0; j < DP; ++j) replica_ranks.push_back(j * EP + ep_rank);
    ep_group = dist->new_group("ep" + std::to_string(dp_rank), ep_ranks);
    replica_group = dist->new_group("experts" + std::to_string(ep_rank), replica_ranks);
  }
  const bool main_rank = dist->is_main();
  const ModelConfig& cfg = r.model;
  const auto& tc = r.train;

  // Data: what the stage trains on.
  std::unique_ptr<StageData> data = make_stage_data(r);
  const std::string tokenizer = data->tokenizer();

  // Model and optimizer.
  torch::manual_seed(tc.seed);  // the global generator drives router jitter only
  MixtralForCausalLM model(cfg);
  init_weights(*model, cfg.init_std, tc.seed);
  if (!r.init_from.empty()) load_init_weights(r.init_from, model);
  const std::optional<std::string> latest = resume ? latest_checkpoint(run_dir) : std::nullopt;
  // Weights of a checkpoint in any expert-parallel layout load into the full model; then this rank keeps
  // its experts.
  if (latest) load_model_weights(*latest, model);
  if (EP > 1) parallel::apply_expert_parallel(model, ep_group);
  model->to(device);
  model->train();
  std::vector<std::pair<std::string, torch::Tensor>> named;
  std::vector<torch::Tensor> params, dense_params, expert_params;
  for (auto& p : model->named_parameters()) {
    named.emplace_back(p.key(), p.value());
    params.push_back(p.value());
    (is_expert_param(p.key()) ? expert_params : dense_params).push_back(p.value());
  }
  // ZeRO-1: dense parameters have W copies (one per rank), experts DP copies (one per replica).
  const bool zero = r.parallel_zero == 1 && W > 1;
  std::vector<int> dense_owner, expert_owner;
  std::vector<bool> owned;
  if (zero) {
    dense_owner = parallel::assign_owners(dense_params, W);
    expert_owner = parallel::assign_owners(expert_params, DP);
    size_t di = 0, ei = 0;
    for (const auto& [name, p] : named)
      owned.push_back(is_expert_param(name) ? expert_owner[ei++] == dp_rank : dense_owner[di++] == rank);
  }
  AdamW opt(named, AdamWOptions{r.optim.beta1, r.optim.beta2, r.optim.eps, r.optim.weight_decay}, owned);
  if (zero)
    MF_INFO("ZeRO-1: optimizer state " << opt.state_bytes() / 1024 << " KiB on rank " << rank << " (of "
                                       << [&] {
                                         int64_t b = 0;
                                         for (const auto& p : params) b += p.numel() * 8 + 8;
                                         return b / 1024;
                                       }() << " KiB unsharded)");

  const int64_t tokens_per_step = tc.micro_batch_size * tc.seq_len * tc.grad_accum;
  int64_t total_steps = tc.max_steps;
  if (tc.max_tokens) total_steps = std::max<int64_t>(1, std::min(total_steps, *tc.max_tokens / tokens_per_step));

  TrainerState state;
  state.seq_len = tc.seq_len;
  state.seed = tc.seed;
  bool resumed = false;  // for the log line below
  if (resume) {
    if (latest) {
      load_training_state(*latest, opt, state);
      if (state.seq_len != tc.seq_len || state.seed != tc.seed)
        throw UserError(*latest + ": was trained with seq_len " + std::to_string(state.seq_len) + " and seed " +
                        std::to_string(state.seed) + "; the recipe now says " + std::to_string(tc.seq_len) + " and " +
                        std::to_string(tc.seed));
      resumed = true;
      MF_INFO("resuming from " << *latest << " (step " << state.step << ")");
    }
  }
  std::unique_ptr<MetricsLog> metrics;
  if (main_rank) {
    fs::create_directories(run_dir);
    std::ofstream(run_dir + "/config.yaml.tmp") << r.yaml;
    fs::rename(run_dir + "/config.yaml.tmp", run_dir + "/config.yaml");
    metrics = std::make_unique<MetricsLog>(run_dir, state.step);  // drops lines written after the last checkpoint
  }
  dist->barrier();
  data->start(run_dir, device, main_rank);

  const std::string dev_name = device.is_cuda() ? "cuda" : "cpu";
  const bool bf16 = device.is_cuda() && r.runtime.precision == "bf16";
  // MFU compares the tokens of all ranks with the matmul rate of all ranks (each measured with its threads).
  const double peak = [&] {
    std::vector<torch::Tensor> v{torch::tensor({measure_peak_gflops(dev_name)}, torch::kDouble)};
    dist->all_reduce_sum(v);
    return v[0].item<double>();
  }();
  const double flops_per_token = training_flops_per_token(cfg, tc.seq_len);
  const ParamCounts pc = count_params(cfg);
  if (!resumed) MF_INFO("starting a new run in " << run_dir);
  MF_INFO("model " << cfg.name << ": " << pc.total << " parameters, " << pc.active << " active; " << dev_name << ", "
                   << threads << " threads; peak matmul " << static_cast<int>(peak) << " GFLOP/s");
  MF_INFO("training " << total_steps << " steps of " << tokens_per_step * W << " tokens (" << tc.micro_batch_size
                      << " x " << tc.seq_len << " x " << tc.grad_accum << " accumulation"
                      << (W > 1 ? " x " + std::to_string(W) + " ranks" : std::string()) << "); "
                      << (W > 1 ? "layout " + std::to_string(DP) + " data-parallel x " + std::to_string(EP) +
                                      " expert-parallel; "
                                : std::string())
                      << data->describe());

  const int L = static_cast<int>(cfg.num_layers);
  // The balancing coefficient this stage trains with (fine-tuning stages may set their own).
  double aux_coef = cfg.moe.aux_loss_coef;
  if (r.stage == "sft" && r.sft_aux_loss_coef) aux_coef = *r.sft_aux_loss_coef;
  if (r.stage == "dpo" && r.dpo.aux_loss_coef) aux_coef = *r.dpo.aux_loss_coef;
  EvalResult last_eval;
  auto log_eval = [&](const EvalResult& ev) {
    nlohmann::json rec = {{"step", state.step}, {"val_loss", ev.loss}, {"val_tokens", ev.tokens}};
    if (!std::isnan(ev.perplexity)) rec["val_perplexity"] = ev.perplexity;
    std::string extra;
    for (const auto& [k, v] : ev.metrics) {
      rec["val_" + k] = v;
      if (k == "rewards/accuracies" || k == "rewards/margins") extra += " | " + k + " " + std::to_string(v).substr(0, 6);
    }
    if (metrics) metrics->write(rec, "val/");
    last_eval = ev;
    if (!main_rank) return;
    if (r.stage == "dpo")
      std::fprintf(stderr, "step %6ld/%ld | val loss %.4f%s\n", (long)state.step, (long)total_steps, ev.loss,
                   extra.c_str());
    else
      std::fprintf(stderr, "step %6ld/%ld | val loss %.4f | val ppl %.2f (%ld tokens)\n", (long)state.step,
                   (long)total_steps, ev.loss, ev.perplexity, (long)ev.tokens);
  };
  // Fine-tuning starts from a trained model: record where the held-out numbers begin.
  if (!resumed && r.stage != "pretrain") log_eval(data->evaluate(model, tc.micro_batch_size, tc.eval_batches, device));
  double train_seconds = 0;       // optimizer steps only (no eval, no checkpoints), this process
  int64_t tokens_this_run = 0;
  double interval_seconds = 0;
  int64_t interval_tokens = 0, interval_steps = 0;
  double last_loss = NAN, last_val = NAN;
  auto run_start = Clock::now();
  const double elapsed_before = state.elapsed_s;

  while (state.step < total_steps) {
    auto t0 = Clock::now();
    const double lr = lr_at(state.step, total_steps, r.optim.warmup_steps, r.optim.lr, r.optim.min_lr,
                            r.optim.schedule, r.optim.decay_fraction);
    opt.zero_grad();
    double ce = 0, aux = 0, z = 0, acc = 0;
    std::map<std::string, double> extra;
    std::vector<torch::Tensor> loads(static_cast<size_t>(L));
    std::vector<double> entropy(static_cast<size_t>(L), 0.0);
    int64_t step_tokens = 0, step_targets = 0;
    for (int64_t a = 0; a < tc.grad_accum; ++a) {
      BatchLoss l = [&] {
        compat::CudaBf16Autocast autocast(bf16);
        // Micro-batch a of rank r is global micro-batch a * W + r: W ranks x A steps see what one process
        // sees with W x A accumulation steps.
        return data->train_batch(model, state.samples_seen + (a * W + rank) * tc.micro_batch_size,
                                 tc.micro_batch_size, device);
      }();
      (l.total / static_cast<double>(tc.grad_accum)).backward();
      step_tokens += l.processed;
      step_targets += l.tokens;
      ce += l.loss / tc.grad_accum;
      acc += l.accuracy / tc.grad_accum;
      aux += l.aux / tc.grad_accum;
      z += l.z / tc.grad_accum;
      for (const auto& [k, v] : l.metrics) extra[k] += v / static_cast<double>(tc.grad_accum);
      for (int i = 0; i < L; ++i) {
        loads[i] = loads[i].defined() ? loads[i] + l.load_per_layer[i] : l.load_per_layer[i];
        entropy[i] += l.entropy_per_layer[i] / tc.grad_accum;
      }
    }
    state.samples_seen += tc.micro_batch_size * tc.grad_accum * W;
    if (W > 1) {
      if (EP == 1) {
        parallel::sync_gradients(dist->world(), params, W);  // everything replicated: one bucket
      } else {
        parallel::sync_gradients(dist->world(), dense_params, W);
        parallel::sync_gradients(*replica_group, expert_params, W);
      }
      // Logged numbers: means over the ranks (token counts and loads: sums).
      std::vector<double> v{ce, acc, aux, z, static_cast<double>(step_tokens), static_cast<double>(step_targets)};
      for (double e : entropy) v.push_back(e);
      for (const auto& [k, x] : extra) v.push_back(x);
      std::vector<torch::Tensor> buf{torch::tensor(v, torch::kDouble),
                                     torch::stack(loads).to(torch::kDouble).contiguous()};
      dist->all_reduce_sum(buf);
      auto s = buf[0].accessor<double, 1>();
      ce = s[0] / W;
      acc = s[1] / W;
      aux = s[2] / W;
      z = s[3] / W;
      step_tokens = static_cast<int64_t>(s[4]);
      step_targets = static_cast<int64_t>(s[5]);
      for (int i = 0; i < L; ++i) entropy[i] = s[6 + i] / W;
      int k = 6 + L;
      for (auto& [name, x] : extra) x = s[k++] / W;
      for (int i = 0; i < L; ++i) loads[i] = buf[1][i].to(torch::kLong);
    }
    if (!std::isfinite(ce)) throw UserError("training diverged: loss is " + std::to_string(ce) + " at step " +
                                            std::to_string(state.step + 1) + "; lower optim.lr");
    const double gnorm = EP > 1 ? parallel::clip_grad_norm_sharded(dense_params, expert_params, *ep_group, r.optim.grad_clip)
                                : clip_grad_norm(params, r.optim.grad_clip);
    opt.step(lr);
    if (zero) {
      parallel::share_updated_params(dist->world(), dense_params, dense_owner);
      if (EP > 1) parallel::share_updated_params(*replica_group, expert_params, expert_owner);
      else parallel::share_updated_params(dist->world(), expert_params, expert_owner);
    }
    if (cfg.moe.balance == Balance::AuxFreeBias) {
      auto blocks = model->moe_blocks();
      for (int i = 0; i < L; ++i) blocks[i]->gate->update_expert_bias(loads[i], cfg.moe.bias_update_rate);
    }
    state.step += 1;
    state.tokens_seen += step_tokens;
    state.target_tokens_seen += step_targets;
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    train_seconds += dt;
    tokens_this_run += step_tokens;
    interval_seconds += dt;
    interval_tokens += step_tokens;
    ++interval_steps;
    last_loss = ce;

    if (state.step % tc.log_interval == 0 || state.step == total_steps) {
      const double tps = interval_tokens / std::max(interval_seconds, 1e-9);
      const double eta = (total_steps - state.step) * interval_seconds / std::max<int64_t>(1, interval_steps);
      nlohmann::json rec = {{"step", state.step}, {"loss", ce}, {"aux_loss", aux}, {"z_loss", z},
                            {"total_loss", ce + (cfg.moe.balance == Balance::AuxLoss ? aux_coef * aux : 0.0) +
                                               cfg.moe.z_loss_coef * z +
                                               (r.stage == "dpo" && extra.count("nll_loss") ? r.dpo.rpo_alpha * extra["nll_loss"] : 0.0)},
                            {"lr", lr}, {"grad_norm", gnorm}, {"tokens_per_second", tps},
                            {"tokens", state.tokens_seen}, {"tokens_trained", state.target_tokens_seen},
                            {"mfu", flops_per_token * tps / (peak * 1e9)}};
      nlohmann::json load_json = nlohmann::json::array(), maxmean = nlohmann::json::array(),
                     cv = nlohmann::json::array(), ent = nlohmann::json::array();
      double worst = 0;
      for (int i = 0; i < L; ++i) {
        auto li = loads[i].to(torch::kLong);
        std::vector<int64_t> v(li.data_ptr<int64_t>(), li.data_ptr<int64_t>() + li.numel());
        load_json.push_back(v);
        const double mean = li.to(torch::kDouble).mean().item<double>();
        const double mx = li.max().item<int64_t>();
        maxmean.push_back(mean > 0 ? mx / mean : 0.0);
        worst = std::max(worst, mean > 0 ? mx / mean : 0.0);
        cv.push_back(load_cv(li));
        ent.push_back(entropy[i]);
      }
      rec["load_max_over_mean"] = worst;
      if (r.stage == "sft") rec["token_accuracy"] = acc;
      for (const auto& [k, v] : extra) rec[k] = v;
      nlohmann::json full = rec;
      full["expert_load"] = load_json;
      full["layer_load_max_over_mean"] = maxmean;
      full["layer_load_cv"] = cv;
      full["layer_router_entropy"] = ent;
      if (metrics) metrics->write(full, "train/");
      if (main_rank)
        std::fprintf(stderr,
                   "step %6ld/%ld | loss %.4f | aux %.3f | z %.3f | lr %.2e | gnorm %.3f | %.0f tok/s | "
                   "max/mean load %.2f | ETA %s\n",
                   (long)state.step, (long)total_steps, ce, aux, z, lr, gnorm, tps, worst, fmt_duration(eta).c_str());
      interval_seconds = 0;
      interval_tokens = 0;
      interval_steps = 0;
    }
    if (state.step % tc.eval_interval == 0 || state.step == total_steps) {
      EvalResult ev = data->evaluate(model, tc.micro_batch_size, tc.eval_batches, device);
      last_val = ev.loss;
      log_eval(ev);
    }
    if (state.step % tc.checkpoint_interval == 0 || state.step == total_steps) {
      state.elapsed_s = elapsed_before + std::chrono::duration<double>(Clock::now() - run_start).count();
      CheckpointContents c;
      c.config = &cfg;
      c.model = model;
      c.optimizer = &opt;
      c.state = &state;
      c.tokenizer_path = tokenizer;
      c.recipe_yaml = r.yaml;
      c.expert_shards = EP;
      c.expert_shard = ep_rank;
      c.data_parallel = DP;
      if (zero) {
        c.optimizer_parts = W;
        c.optimizer_part = rank;
      }
      if (c.sharded()) {  // every rank writes its optimizer part (ZeRO-1), the first replica its experts
        if (main_rank) begin_sharded_checkpoint(run_dir, state.step);
        dist->barrier();
        if (!main_rank) write_rank_files(sharded_staging_dir(run_dir, state.step), c, dp_rank == 0);
        dist->barrier();
      }
      if (main_rank) {  // replicas hold the same weights and optimizer state
        auto dir = save_checkpoint(run_dir, c, static_cast<int>(tc.keep_checkpoints));
        MF_INFO("checkpoint " << dir);
      }
      dist->barrier();
      // Test hook: an interruption right after this checkpoint (resume tests).
      const char* kill_after = std::getenv("MOEFORGE_TEST_KILL_AFTER_CHECKPOINT");
      const char* kill_rank = std::getenv("MOEFORGE_TEST_KILL_RANK");  // only this rank (default: every rank)
      if (kill_after && std::to_string(state.step) == kill_after && (!kill_rank || std::to_string(rank) == kill_rank))
        std::raise(std::getenv("MOEFORGE_TEST_KILL_SIGNAL") && std::string(std::getenv("MOEFORGE_TEST_KILL_SIGNAL")) == "STOP"
                       ? SIGSTOP  // a hung rank
                       : SIGKILL);
    }
  }

  TrainResult res;
  res.run_dir = run_dir;
  res.steps = state.step;
  res.final_train_loss = last_loss;
  if (std::isnan(last_val)) {
    EvalResult ev = data->evaluate(model, tc.micro_batch_size, tc.eval_batches, device);
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
      {"final_val_perplexity", r.stage == "dpo" ? nlohmann::json(nullptr) : nlohmann::json(std::exp(last_val))},
      {"tokens_per_second", res.tokens_per_second},
      {"mfu", res.mfu},
      {"peak_gflops", peak},
      {"model_flops_per_token", flops_per_token},
      {"total_params", pc.total},
      {"active_params", pc.active},
      {"device", dev_name},
      {"threads", threads},
      {"elapsed_s", elapsed_before + std::chrono::duration<double>(Clock::now() - run_start).count()}};
  for (const auto& [k, v] : last_eval.metrics) summary["final_val_" + k] = v;
  data->summarize(summary);
  summary["data_parallel_ranks"] = DP;
  summary["expert_parallel_ranks"] = EP;
  summary["world_size"] = W;
  if (main_rank) write_json_atomic(run_dir + "/summary.json", summary);
  const double h = summary.value("unigram_entropy", NAN);
  std::string extra;
  if (!std::isnan(h)) extra = " (unigram entropy of the val tokens " + std::to_string(h).substr(0, 6) + ")";
  for (const char* k : {"rewards/accuracies", "rewards/margins"})
    if (last_eval.metrics.count(k)) extra += " | val " + std::string(k) + " " + std::to_string(last_eval.metrics.at(k)).substr(0, 6);
  if (main_rank)
    std::fprintf(stderr, "done: %ld steps | final val loss %.4f%s | %.0f tokens/s | MFU %.1f%% of a %.0f GFLOP/s matmul\n",
               (long)state.step, last_val, extra.c_str(), res.tokens_per_second, 100 * res.mfu, peak);
  return res;
}

}  // namespace moeforge::train
