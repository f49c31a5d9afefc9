#include "train/recipe.h"

#include <yaml-cpp/yaml.h>

#include "core/error.h"
#include "io/yaml_reader.h"
#include "train/checkpoint.h"

namespace moeforge::train {

namespace {
void positive(io::YamlMap& m, const std::string& k, int64_t v) {
  if (v <= 0) m.fail(k, "must be positive, got " + std::to_string(v));
}
void non_negative(io::YamlMap& m, const std::string& k, double v) {
  if (v < 0) m.fail(k, "must be >= 0, got " + std::to_string(v));
}

std::string emit(const Recipe& r) {
  YAML::Emitter e;
  e << YAML::BeginMap;
  e << YAML::Key << "stage" << YAML::Value << r.stage;
  e << YAML::Key << "model" << YAML::Value << YAML::Load(model_config_to_yaml(r.model));
  e << YAML::Key << "model_source" << YAML::Value << r.model_source;
  e << YAML::Key << "tokenizer" << YAML::Value << r.tokenizer;
  e << YAML::Key << "data" << YAML::Value << YAML::BeginMap << YAML::Key << "dir" << YAML::Value << r.data_dir
    << YAML::Key << "train" << YAML::Value << r.sft_train << YAML::Key << "val" << YAML::Value << r.sft_val
    << YAML::EndMap;
  e << YAML::Key << "sft" << YAML::Value << YAML::BeginMap << YAML::Key << "train_on_all" << YAML::Value
    << r.sft_train_on_all << YAML::Key << "overlong" << YAML::Value << r.sft_overlong << YAML::Key << "aux_loss_coef"
    << YAML::Value;
  if (r.sft_aux_loss_coef) e << *r.sft_aux_loss_coef; else e << YAML::Null;
  e << YAML::EndMap;
  e << YAML::Key << "dpo" << YAML::Value << YAML::BeginMap << YAML::Key << "beta" << YAML::Value << r.dpo.beta
    << YAML::Key << "loss" << YAML::Value << r.dpo.loss << YAML::Key << "label_smoothing" << YAML::Value
    << r.dpo.label_smoothing << YAML::Key << "reference" << YAML::Value << r.dpo.reference << YAML::Key
    << "aux_loss_coef" << YAML::Value;
  if (r.dpo.aux_loss_coef) e << *r.dpo.aux_loss_coef; else e << YAML::Null;
  e << YAML::Key << "rpo_alpha" << YAML::Value << r.dpo.rpo_alpha;
  e << YAML::EndMap;
  const auto& t = r.train;
  e << YAML::Key << "train" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "micro_batch_size" << YAML::Value << t.micro_batch_size;
  e << YAML::Key << "seq_len" << YAML::Value << t.seq_len;
  e << YAML::Key << "grad_accum" << YAML::Value << t.grad_accum;
  e << YAML::Key << "max_steps" << YAML::Value << t.max_steps;
  e << YAML::Key << "max_tokens" << YAML::Value;
  if (t.max_tokens) e << *t.max_tokens; else e << YAML::Null;
  e << YAML::Key << "log_interval" << YAML::Value << t.log_interval;
  e << YAML::Key << "eval_interval" << YAML::Value << t.eval_interval;
  e << YAML::Key << "eval_batches" << YAML::Value << t.eval_batches;
  e << YAML::Key << "checkpoint_interval" << YAML::Value << t.checkpoint_interval;
  e << YAML::Key << "keep_checkpoints" << YAML::Value << t.keep_checkpoints;
  e << YAML::Key << "seed" << YAML::Value << t.seed;
  e << YAML::EndMap;
  const auto& o = r.optim;
  e << YAML::Key << "optim" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "lr" << YAML::Value << o.lr << YAML::Key << "min_lr" << YAML::Value << o.min_lr;
  e << YAML::Key << "betas" << YAML::Value << YAML::Flow << std::vector<double>{o.beta1, o.beta2};
  e << YAML::Key << "eps" << YAML::Value << o.eps << YAML::Key << "weight_decay" << YAML::Value << o.weight_decay;
  e << YAML::Key << "grad_clip" << YAML::Value << o.grad_clip << YAML::Key << "schedule" << YAML::Value << o.schedule;
  e << YAML::Key << "warmup_steps" << YAML::Value << o.warmup_steps;
  e << YAML::Key << "decay_fraction" << YAML::Value << o.decay_fraction;
  e << YAML::EndMap;
  e << YAML::Key << "runtime" << YAML::Value << YAML::BeginMap;
  e << YAML::Key << "device" << YAML::Value << r.runtime.device << YAML::Key << "precision" << YAML::Value
    << r.runtime.precision << YAML::Key << "threads" << YAML::Value << r.runtime.threads;
  e << YAML::EndMap;
  e << YAML::Key << "parallel" << YAML::Value << YAML::BeginMap << YAML::Key << "timeout_s" << YAML::Value
    << r.parallel_timeout_s << YAML::Key << "expert" << YAML::Value << r.parallel_expert << YAML::Key << "zero"
    << YAML::Value << r.parallel_zero << YAML::EndMap;
  e << YAML::Key << "output_dir" << YAML::Value << r.output_dir;
  e << YAML::Key << "resume" << YAML::Value << r.resume;
  e << YAML::Key << "init_from" << YAML::Value << r.init_from;
  e << YAML::EndMap;
  return std::string(e.c_str()) + "\n";
}
}  // namespace

Recipe load_recipe(const std::string& path, const std::vector<std::string>& overrides) {
  YAML::Node root = io::load_yaml_file(path);
  // `--set model.x=v` where the recipe names a config file changes that file's config (applied to it once
  // loaded below); written into the recipe instead, it would replace the file name by a mapping holding
  // only x, and every other model key would silently take its default.
  std::vector<std::string> model_overrides;
  for (const auto& o : overrides)
    if (o.rfind("model.", 0) != 0) io::apply_override(root, o);
  for (const auto& o : overrides)
    if (o.rfind("model.", 0) == 0) {
      if (root["model"] && root["model"].IsScalar()) model_overrides.push_back(o.substr(6));
      else io::apply_override(root, o);
    }
  Recipe r;
  r.path = path;
  io::YamlMap m(root, path);
  r.stage = m.get_enum("stage", {"pretrain", "sft", "dpo"}, "pretrain");
  // model: a path to a config file, or the config inline; absent: the init_from checkpoint's.
  r.init_from = m.get_string("init_from", "");
  if (!m.has("model") && !r.init_from.empty()) {
    m.get_string("model", "");  // marks the key as known
    r.model_source = r.init_from;
    r.model = read_init_config(r.init_from);
  } else if (!m.has("model")) {
    m.fail("model", "required: a model config file or an inline mapping (or give init_from)");
  } else if (root["model"].IsScalar()) {
    r.model_source = m.get_string("model");
    YAML::Node mn = io::load_yaml_file(r.model_source);
    for (const auto& o : model_overrides) io::apply_override(mn, o);
    r.model = parse_model_config(mn, r.model_source);
  } else {
    m.get_map("model");  // marks the key as known
    r.model_source = "<inline>";
    r.model = parse_model_config(root["model"], path, "model.");
  }
  // Written back by emit(): a resolved recipe (model inline) keeps naming the config file it came from.
  const std::string source = m.get_string("model_source", "");
  if (r.model_source == "<inline>" && !source.empty()) r.model_source = source;
  r.tokenizer = m.get_string("tokenizer", "");
  io::YamlMap d = m.get_map("data");
  r.data_dir = d.get_string("dir", "");
  r.sft_train = d.get_string("train", "");
  r.sft_val = d.get_string("val", "");
  if (r.stage == "pretrain" && r.data_dir.empty()) d.fail("dir", "required for stage pretrain: a directory made by 'moeforge prepare'");
  if (r.stage == "sft" && r.sft_train.empty()) d.fail("train", "required for stage sft: a JSONL file of examples");
  if (r.stage == "sft" && r.sft_val.empty()) d.fail("val", "required for stage sft: a JSONL file of held-out examples");
  if (r.stage == "dpo" && r.sft_train.empty()) d.fail("train", "required for stage dpo: a JSONL file of preference pairs");
  if (r.stage == "dpo" && r.sft_val.empty()) d.fail("val", "required for stage dpo: a JSONL file of held-out pairs");
  if (r.stage == "dpo" && r.init_from.empty())
    m.fail("init_from", "required for stage dpo: the checkpoint to tune (it is also the reference model)");
  d.finish();
  io::YamlMap sft = m.get_map("sft");
  r.sft_train_on_all = sft.get_bool("train_on_all", false);
  r.sft_overlong = sft.get_enum("overlong", {"truncate", "skip"}, "truncate");
  r.sft_aux_loss_coef = sft.get_optional_double("aux_loss_coef", std::nullopt);
  if (r.sft_aux_loss_coef) non_negative(sft, "aux_loss_coef", *r.sft_aux_loss_coef);
  sft.finish();
  io::YamlMap dpo = m.get_map("dpo");
  r.dpo.beta = dpo.get_double("beta", r.dpo.beta);
  if (!(r.dpo.beta > 0)) dpo.fail("beta", "must be positive");
  r.dpo.loss = dpo.get_enum("loss", {"sigmoid", "ipo", "hinge", "robust"}, r.dpo.loss);
  r.dpo.label_smoothing = dpo.get_double("label_smoothing", r.dpo.label_smoothing);
  if (r.dpo.label_smoothing < 0 || r.dpo.label_smoothing >= 0.5) dpo.fail("label_smoothing", "must be in [0, 0.5)");
  r.dpo.reference = dpo.get_enum("reference", {"frozen", "precompute"}, r.dpo.reference);
  r.dpo.aux_loss_coef = dpo.get_optional_double("aux_loss_coef", std::nullopt);
  if (r.dpo.aux_loss_coef) non_negative(dpo, "aux_loss_coef", *r.dpo.aux_loss_coef);
  r.dpo.rpo_alpha = dpo.get_double("rpo_alpha", r.dpo.rpo_alpha);
  non_negative(dpo, "rpo_alpha", r.dpo.rpo_alpha);
  dpo.finish();

  io::YamlMap t = m.get_map("train");
  auto& tc = r.train;
  tc.micro_batch_size = t.get_int("micro_batch_size", tc.micro_batch_size);
  positive(t, "micro_batch_size", tc.micro_batch_size);
  tc.seq_len = t.get_int("seq_len", tc.seq_len);
  positive(t, "seq_len", tc.seq_len);
  if (tc.seq_len > r.model.max_position_embeddings)
    t.fail("seq_len", "exceeds the model's max_position_embeddings (" + std::to_string(r.model.max_position_embeddings) + ")");
  tc.grad_accum = t.get_int("grad_accum", tc.grad_accum);
  positive(t, "grad_accum", tc.grad_accum);
  tc.max_steps = t.get_int("max_steps", tc.max_steps);
  positive(t, "max_steps", tc.max_steps);
  tc.max_tokens = t.get_optional_int("max_tokens", std::nullopt);
  if (tc.max_tokens) positive(t, "max_tokens", *tc.max_tokens);
  tc.log_interval = t.get_int("log_interval", tc.log_interval);
  positive(t, "log_interval", tc.log_interval);
  tc.eval_interval = t.get_int("eval_interval", tc.eval_interval);
  positive(t, "eval_interval", tc.eval_interval);
  tc.eval_batches = t.get_int("eval_batches", tc.eval_batches);
  positive(t, "eval_batches", tc.eval_batches);
  tc.checkpoint_interval = t.get_int("checkpoint_interval", tc.checkpoint_interval);
  positive(t, "checkpoint_interval", tc.checkpoint_interval);
  tc.keep_checkpoints = t.get_int("keep_checkpoints", tc.keep_checkpoints);
  positive(t, "keep_checkpoints", tc.keep_checkpoints);
  int64_t seed = t.get_int("seed", static_cast<int64_t>(tc.seed));
  if (seed < 0) t.fail("seed", "must be >= 0");
  tc.seed = static_cast<uint64_t>(seed);
  t.finish();

  io::YamlMap o = m.get_map("optim");
  auto& oc = r.optim;
  oc.lr = o.get_double("lr", oc.lr);
  if (!(oc.lr > 0)) o.fail("lr", "must be positive");
  oc.min_lr = o.get_double("min_lr", oc.min_lr);
  non_negative(o, "min_lr", oc.min_lr);
  auto betas = o.get_double_list("betas", {oc.beta1, oc.beta2});
  if (betas.size() != 2) o.fail("betas", "expected [beta1, beta2]");
  oc.beta1 = betas[0];
  oc.beta2 = betas[1];
  if (oc.beta1 < 0 || oc.beta1 >= 1 || oc.beta2 < 0 || oc.beta2 >= 1) o.fail("betas", "each must be in [0, 1)");
  oc.eps = o.get_double("eps", oc.eps);
  if (!(oc.eps > 0)) o.fail("eps", "must be positive");
  oc.weight_decay = o.get_double("weight_decay", oc.weight_decay);
  non_negative(o, "weight_decay", oc.weight_decay);
  oc.grad_clip = o.get_double("grad_clip", oc.grad_clip);
  non_negative(o, "grad_clip", oc.grad_clip);
  oc.schedule = o.get_enum("schedule", {"cosine", "wsd", "constant"}, oc.schedule);
  oc.warmup_steps = o.get_int("warmup_steps", oc.warmup_steps);
  if (oc.warmup_steps < 0) o.fail("warmup_steps", "must be >= 0");
  oc.decay_fraction = o.get_double("decay_fraction", oc.decay_fraction);
  if (oc.decay_fraction < 0 || oc.decay_fraction > 1) o.fail("decay_fraction", "must be in [0, 1]");
  o.finish();

  io::YamlMap rt = m.get_map("runtime");
  r.runtime.device = rt.get_enum("device", {"auto", "cpu", "cuda"}, r.runtime.device);
  r.runtime.precision = rt.get_enum("precision", {"fp32", "bf16"}, r.runtime.precision);
  r.runtime.threads = static_cast<int>(rt.get_int("threads", r.runtime.threads));
  if (r.runtime.threads < 0) rt.fail("threads", "must be >= 0 (0 = all cores)");
  rt.finish();

  io::YamlMap par = m.get_map("parallel");
  r.parallel_timeout_s = par.get_int("timeout_s", r.parallel_timeout_s);
  positive(par, "timeout_s", r.parallel_timeout_s);
  r.parallel_expert = par.get_int("expert", r.parallel_expert);
  positive(par, "expert", r.parallel_expert);
  if (r.model.moe.num_experts % r.parallel_expert != 0)
    par.fail("expert", std::to_string(r.parallel_expert) + " does not divide model.moe.num_experts (" +
                           std::to_string(r.model.moe.num_experts) + ")");
  r.parallel_zero = par.get_int("zero", r.parallel_zero);
  if (r.parallel_zero != 0 && r.parallel_zero != 1) par.fail("zero", "must be 0 (off) or 1 (optimizer state sharded)");
  par.finish();

  r.output_dir = m.get_string("output_dir", r.output_dir);
  if (r.output_dir.empty()) m.fail("output_dir", "must not be empty");
  r.resume = m.get_enum("resume", {"never", "auto"}, r.resume);
  m.finish();
  r.yaml = emit(r);
  return r;
}

}  // namespace moeforge::train
