// moeforge eval CHECKPOINT: held-out loss (--data / --text), exact match of greedy completions (--generate),
// DPO reward accuracy against a reference (--preferences). Under `moeforge launch` the ranks split every MoE
// layer's experts (expert parallelism over the world) and all run the same inputs; rank 0 reports.
#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/cli.h"
#include "core/compat.h"
#include "core/error.h"
#include "core/log.h"
#include "data/chat.h"
#include "data/lm_dataset.h"
#include "data/preference.h"
#include "data/tokenizer.h"
#include "io/jsonl.h"
#include "model/generate.h"
#include "model/mixed.h"
#include "model/finetune.h"
#include "checkpoint/checkpoint.h"
#include "objective/dpo_objective.h"
#include "eval/evaluate.h"
#include "eval/inference.h"
#include "recipe/recipe.h"

namespace moeforge::cli {

// Greedy completions for each prompt of a JSONL file ({"prompt", "completion"} or {"messages"} ending in
// an assistant turn), rendered in the chat format; exact match against the reference after trimming.
static int eval_generate(const std::string& ckpt, const std::string& file, int64_t max_new, bool json, int threads,
                         const std::string& precision) {
  train::InferenceJob job("eval", threads);
  data::Tokenizer tok(train::require_checkpoint_tokenizer(ckpt, "--generate"));
  MixtralForCausalLM model = job.load(ckpt, precision);
  auto trim = [](std::string s) {
    size_t a = s.find_first_not_of(" \t\r\n"), b = s.find_last_not_of(" \t\r\n");
    return a == std::string::npos ? std::string() : s.substr(a, b - a + 1);
  };
  int64_t n = 0, correct = 0;
  io::for_each_jsonl(file, [&](const nlohmann::json& j, const std::string& where) {
    bool plain = false;
    auto messages = data::example_messages(j, where, &plain);
    if (plain || messages.back().role != "assistant")
      throw UserError(where + ": --generate needs a prompt and a reference completion");
    std::string reference = messages.back().content;
    messages.pop_back();
    auto ex = data::tokenize_chat(tok, messages, false, where);
    SamplingOptions o;
    o.max_new_tokens = max_new;
    o.eos_id = tok.eos_id();
    o.vocab_limit = tok.vocab_size();
    if (job.world() > 1) o.agree = [&](int64_t t) { return job.agree(t); };
    std::vector<int64_t> prompt(ex.ids.begin(), ex.ids.end());
    auto out = generate(model, prompt, o);
    std::string text = tok.decode(std::vector<int>(out.begin(), out.end()));
    ++n;
    if (trim(text) == trim(reference)) ++correct;
  });
  if (n == 0) throw UserError(file + ": no examples");
  const double em = static_cast<double>(correct) / static_cast<double>(n);
  if (!job.is_main()) return 0;
  if (json) {
    std::cout << nlohmann::json{{"checkpoint", ckpt}, {"data", file}, {"exact_match", em}, {"n", n}, {"correct", correct}}
                     .dump()
              << "\n";
  } else {
    std::printf("%s on %s: exact match %.3f (%ld of %ld)\n", ckpt.c_str(), file.c_str(), em, (long)correct, (long)n);
  }
  return 0;
}

// Seq_len a checkpoint was trained with, or (weights only) the model's limit capped at 2048.
static int64_t checkpoint_seq_len(const std::string& ckpt, const ModelConfig& cfg) {
  if (auto st = train::checkpoint_trainer_state(ckpt)) return st->seq_len;
  return std::min<int64_t>(cfg.max_position_embeddings, 2048);
}

// DPO's implicit rewards of a tuned checkpoint against its reference on held-out preference pairs.
static int eval_preferences(const std::string& ckpt, const std::string& ref_ckpt, const std::string& file, double beta,
                            std::string loss, int64_t batch_size, int64_t seq_len, bool json, int threads,
                            const std::string& precision) {
  train::InferenceJob job("eval", threads);
  ModelConfig cfg = train::read_checkpoint_config(ckpt), ref_cfg = train::read_checkpoint_config(ref_ckpt);
  if (cfg.vocab_size != ref_cfg.vocab_size)
    throw UserError(ref_ckpt + ": its vocabulary (" + std::to_string(ref_cfg.vocab_size) + ") differs from " + ckpt +
                    "'s (" + std::to_string(cfg.vocab_size) + ")");
  const std::string tok_path = train::require_checkpoint_tokenizer(ckpt, "--preferences");
  // beta, loss and label smoothing: as given, else as the checkpoint was tuned (its recipe, when a DPO run's),
  // else TRL's defaults.
  train::DpoConfig tuned;
  if (auto recipe = train::checkpoint_recipe(ckpt); recipe && recipe->stage == "dpo") tuned = recipe->dpo;
  if (beta <= 0) beta = tuned.beta;
  if (loss.empty()) loss = tuned.loss;
  const double label_smoothing = tuned.label_smoothing;
  if (seq_len <= 0) seq_len = checkpoint_seq_len(ckpt, cfg);
  if (seq_len > cfg.max_position_embeddings || seq_len > ref_cfg.max_position_embeddings)
    throw UserError("eval: --seq-len " + std::to_string(seq_len) + " exceeds a model's max_position_embeddings");
  data::Tokenizer tok(tok_path);
  if (tok.vocab_size() > cfg.vocab_size) throw UserError(tok_path + ": has more pieces than the model's vocab_size");
  data::PreferenceStats stats;
  auto pairs = data::load_preference_pairs(file, tok, seq_len, &stats);
  if (stats.skips.total()) MF_WARN(file << ": skipped " << stats.skips.describe());
  const torch::Device device = job.device();
  // Both models compute in the policy's precision (as they did in training: the DPO reference follows it).
  const std::string dtype = precision.empty() ? train::checkpoint_precision(ckpt) : precision;
  MixtralForCausalLM policy = job.load(ckpt, dtype), ref = job.load(ref_ckpt, dtype);
  train::DpoOptions o;
  o.beta = beta;
  o.loss = loss;
  o.label_smoothing = label_smoothing;
  const auto ev = train::evaluate_pairs(
      policy, pairs, pairs.size(), batch_size,
      [&](const std::vector<size_t>& idx) { return train::reference_logps(ref, pairs, idx, batch_size, seq_len, device); },
      o, seq_len, device);
  nlohmann::json out = {{"checkpoint", ckpt},      {"reference", ref_ckpt}, {"data", file},
                        {"n", pairs.size()},       {"beta", beta},          {"loss_type", loss},
                        {"label_smoothing", label_smoothing}, {"loss", ev.loss},
                        {"skipped", stats.skips.total()},     {"truncated", stats.truncated}};
  for (const auto& [k, v] : ev.metrics) out[k] = v;
  if (!job.is_main()) return 0;
  if (json) {
    std::cout << out.dump() << "\n";
  } else {
    std::printf("%s vs %s on %s (%zu pairs, beta %g): rewards/accuracies %.3f | rewards/margins %.4f | "
                "rewards/chosen %.4f | rewards/rejected %.4f | %s loss %.4f\n",
                ckpt.c_str(), ref_ckpt.c_str(), file.c_str(), pairs.size(), beta, out["rewards/accuracies"].get<double>(),
                out["rewards/margins"].get<double>(), out["rewards/chosen"].get<double>(),
                out["rewards/rejected"].get<double>(), loss.c_str(), ev.loss);
  }
  return 0;
}

int cmd_eval(const Args& in) {
  Args args = in;
  std::string data_dir, text_file, v;
  const bool json = take_flag(args, "--json");
  const bool gen = take_flag(args, "--generate");
  std::string prefs, ref_ckpt, loss_type;
  double beta = 0;
  take_option(args, "--preferences", &prefs);
  take_option(args, "--reference", &ref_ckpt);
  take_option(args, "--loss", &loss_type);
  if (take_option(args, "--beta", &v)) {
    try {
      beta = std::stod(v);
    } catch (const std::exception&) {
      beta = -1;
    }
    if (!(beta > 0)) throw UserError("eval: --beta must be a positive number, got '" + v + "'");
  }
  int64_t max_new = 64;
  if (take_option(args, "--max-new-tokens", &v)) max_new = parse_int("--max-new-tokens", v);
  take_option(args, "--data", &data_dir);
  take_option(args, "--text", &text_file);
  int64_t batches = 0, batch_size = 8, seq_len = 0, threads = 0;
  if (take_option(args, "--batches", &v)) batches = parse_int("--batches", v);
  if (take_option(args, "--batch-size", &v)) batch_size = parse_int("--batch-size", v);
  if (take_option(args, "--seq-len", &v)) seq_len = parse_int("--seq-len", v);
  if (take_option(args, "--threads", &v)) threads = parse_int("--threads", v);
  const std::string precision = take_precision(args, "eval");  // "" = the checkpoint's
  const bool token_logprobs = take_flag(args, "--token-logprobs");
  reject_unknown_flags(args, "eval", {"--precision", "--json", "--data", "--text", "--batches", "--batch-size", "--seq-len", "--threads",
                                      "--generate", "--max-new-tokens", "--preferences", "--reference", "--beta", "--loss",
                                      "--token-logprobs"});
  if (token_logprobs && (text_file.empty() || !json))
    throw UserError("eval: --token-logprobs goes with --text FILE and --json (the ids and each next token's log-probability)");
  if (!prefs.empty() || !ref_ckpt.empty()) {
    if (args.size() != 1 || prefs.empty() || ref_ckpt.empty())
      throw UserError("eval --preferences: usage: moeforge eval CHECKPOINT --preferences FILE.jsonl --reference "
                      "REF_CHECKPOINT [--beta B] [--loss sigmoid|ipo|hinge|robust] [--json]");
    const auto& losses = train::dpo_loss_types();
    if (!loss_type.empty() && std::find(losses.begin(), losses.end(), loss_type) == losses.end()) {
      std::string names;
      for (const auto& l : losses) names += (names.empty() ? "" : ", ") + l;
      throw UserError("eval: --loss must be one of " + names + ", got '" + loss_type + "'" + did_you_mean(loss_type, losses));
    }
    if (batch_size <= 0) throw UserError("eval: --batch-size must be positive");
    return eval_preferences(args[0], ref_ckpt, prefs, beta, loss_type, batch_size, seq_len, json,
                            static_cast<int>(threads), precision);
  }
  if (gen) {
    if (args.size() != 1 || data_dir.empty())
      throw UserError("eval --generate: usage: moeforge eval CHECKPOINT --generate --data FILE.jsonl [--json]");
    if (max_new <= 0) throw UserError("eval: --max-new-tokens must be positive");
    return eval_generate(args[0], data_dir, max_new, json, static_cast<int>(threads), precision);
  }
  if (args.size() != 1) throw UserError("eval: expected one CHECKPOINT directory (usage: moeforge eval CHECKPOINT --data DIR | --text FILE [--json])");
  if (data_dir.empty() == text_file.empty()) throw UserError("eval: give exactly one of --data DIR or --text FILE");
  if (batch_size <= 0) throw UserError("eval: --batch-size must be positive");
  const std::string ckpt = args[0];
  train::InferenceJob job("eval", static_cast<int>(threads));
  ModelConfig cfg = train::read_checkpoint_config(ckpt);
  if (seq_len <= 0) seq_len = checkpoint_seq_len(ckpt, cfg);
  if (seq_len > cfg.max_position_embeddings)
    throw UserError("eval: --seq-len " + std::to_string(seq_len) + " exceeds the model's max_position_embeddings");
  MixtralForCausalLM model = job.load(ckpt, precision);
  const torch::Device device = job.device();
  train::EvalResult r;
  std::string source;
  std::vector<double> logprobs;
  std::vector<int64_t> token_ids;
  if (!data_dir.empty()) {
    auto ds = std::make_shared<data::TokenDataset>(data_dir, "val");
    if (ds->meta().vocab_size > cfg.vocab_size) throw UserError(data_dir + ": its vocabulary is larger than the model's");
    data::LmSampler sampler(std::make_shared<data::TokenStream>(ds), seq_len, 0, false);
    if (sampler.num_windows() == 0) throw UserError(data_dir + ": validation split shorter than one window");
    r = train::evaluate_lm(model, sampler, batch_size, batches, device);
    source = data_dir;
  } else {
    std::string tok_path = train::checkpoint_tokenizer(ckpt);
    if (tok_path.empty()) throw UserError(ckpt + ": has no tokenizer.model; --text needs one");
    data::Tokenizer tok(tok_path);
    std::ifstream f(text_file, std::ios::binary);
    if (!f) throw UserError(text_file + ": cannot open");
    std::stringstream ss;
    ss << f.rdbuf();
    auto ids = tok.encode(ss.str());
    std::vector<int64_t> tokens{tok.bos_id()};
    tokens.insert(tokens.end(), ids.begin(), ids.end());
    if (tokens.size() < 2) throw UserError(text_file + ": no text to evaluate");
    r = train::evaluate_tokens(model, tokens, seq_len, device, token_logprobs ? &logprobs : nullptr);
    source = text_file;
    if (token_logprobs) token_ids = tokens;
  }
  if (!job.is_main()) return 0;
  if (json) {
    nlohmann::json out{{"checkpoint", ckpt}, {"source", source}, {"loss", r.loss}, {"perplexity", r.perplexity},
                       {"tokens", r.tokens}, {"seq_len", seq_len}};
    if (token_logprobs) {  // ids[0] is BOS; logprobs[i] is that of ids[i + 1]
      out["ids"] = token_ids;
      out["logprobs"] = logprobs;
    }
    std::cout << out.dump() << "\n";
  } else {
    std::printf("%s on %s: loss %.4f nats/token, perplexity %.2f (%ld tokens, windows of %ld)\n", ckpt.c_str(),
                source.c_str(), r.loss, r.perplexity, (long)r.tokens, (long)seq_len);
  }
  return 0;
}

}  // namespace moeforge::cli
