#include "recipe/recipe.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <set>

#include "core/error.h"
#include "core/log.h"
#include "io/model_config_yaml.h"
#include "io/yaml_reader.h"
#include "io/init_source.h"
#include "recipe/recipe_keys.h"

namespace moeforge::train {

const std::vector<std::string>& dpo_loss_types() {
  static const std::vector<std::string> v{"sigmoid", "ipo", "hinge", "robust"};
  return v;
}

const io::KeyTable<Recipe>& recipe_keys() {
  using namespace io;
  static const KeyTable<Recipe> t = [] {
    KeyTable<Recipe> k;
    auto not_empty = [](const std::string& s) { return s.empty() ? std::string("must not be empty") : std::string(); };
    k.choice("stage", [](auto& r) -> auto& { return r.stage; }, {"pretrain", "sft", "dpo"},
             "what the run trains: pretraining, supervised fine-tuning or DPO")
        // `model` (a config file, an inline mapping, or absent: init_from's) is read by load_recipe and
        // written here, inline, so that a run directory's config.yaml is self-contained.
        .add({"model", "path or mapping", "the model config: a file, inline keys, or absent (init_from's config)",
              [](YamlMap& m, const std::string& leaf, Recipe&) { m.accept(leaf); },
              [](YAML::Emitter& e, const Recipe& r) { model_config_keys().emit(e, r.model); }, nullptr})
        .shown_default("(init_from's config)")
        .string("model_source", [](auto& r) -> auto& { return r.model_source; }, nullptr,
                "where the model config came from (written by moeforge)")
        .string("tokenizer", [](auto& r) -> auto& { return r.tokenizer; }, nullptr,
                "SentencePiece model; empty = the prepared data's or init_from's")
        .string("data.dir", [](auto& r) -> auto& { return r.data_dir; }, nullptr,
                "pretrain: a directory made by 'moeforge prepare'")
        .string("data.train", [](auto& r) -> auto& { return r.sft_train; }, nullptr,
                "sft, dpo: JSONL of training examples or preference pairs")
        .string("data.val", [](auto& r) -> auto& { return r.sft_val; }, nullptr,
                "sft, dpo: JSONL of held-out examples or pairs")
        .boolean("sft.train_on_all", [](auto& r) -> auto& { return r.sft_train_on_all; },
                 "loss on every token, not only the assistant's")
        .choice("sft.overlong", [](auto& r) -> auto& { return r.sft_overlong; }, {"truncate", "skip"},
                "examples longer than seq_len")
        .optional_number("sft.aux_loss_coef", [](auto& r) -> auto& { return r.sft_aux_loss_coef; }, non_negative(),
                         "balancing coefficient for the stage (null: the model's)")
        .number("dpo.beta", [](auto& r) -> auto& { return r.dpo.beta; }, positive(), "DPO temperature")
        .choice("dpo.loss", [](auto& r) -> auto& { return r.dpo.loss; }, dpo_loss_types(), "DPO loss (TRL's names)")
        .number("dpo.label_smoothing", [](auto& r) -> auto& { return r.dpo.label_smoothing; }, in_range(0, 0.5, false),
                "sigmoid/robust: assumed probability that a preference label is flipped")
        .choice("dpo.reference", [](auto& r) -> auto& { return r.dpo.reference; },
                {"auto", "frozen", "precompute", "adapters_off"},
                "frozen: a copy of init_from in memory; precompute: its log-probs stored before training; "
                "adapters_off: the policy with its adapters off (lora/qlora); auto: adapters_off with adapters, else frozen")
        .optional_number("dpo.aux_loss_coef", [](auto& r) -> auto& { return r.dpo.aux_loss_coef; }, non_negative(),
                         "balancing coefficient for the stage (null: the model's)")
        .number("dpo.rpo_alpha", [](auto& r) -> auto& { return r.dpo.rpo_alpha; }, non_negative(),
                "> 0 adds alpha x the chosen completions' NLL per token (TRL's rpo_alpha)")
        .choice("finetune.method", [](auto& r) -> auto& { return r.finetune.method; }, {"full", "lora", "qlora"},
                "full: every parameter trains; lora: adapters on a frozen base; qlora: adapters on a base stored quantised")
        .integer("finetune.lora.rank", [](auto& r) -> auto& { return r.finetune.lora.rank; }, positive(),
                 "adapter rank r")
        .number("finetune.lora.alpha", [](auto& r) -> auto& { return r.finetune.lora.alpha; }, positive(),
                "scale = alpha / r (alpha / sqrt(r) with rslora)")
        .number("finetune.lora.dropout", [](auto& r) -> auto& { return r.finetune.lora.dropout; }, in_range(0, 1, false),
                "dropout on the adapters' input")
        .add({"finetune.lora.targets", "list of names",
              "HF module names: q_proj k_proj v_proj o_proj (attention), w1 w2 w3 (every expert), gate (the router), "
              "lm_head, or all (every one but lm_head)",
              [](YamlMap& m, const std::string& leaf, Recipe& r) {
                auto v = m.get_string_list(leaf, r.finetune.lora.targets);
                if (v.empty()) m.fail(leaf, "names no module");
                for (const auto& g : v)
                  if (g != "all" && !is_lora_target(g))
                    m.fail(leaf, "unknown module '" + g + "' (q_proj, k_proj, v_proj, o_proj, w1, w2, w3, gate, lm_head or all)");
                r.finetune.lora.targets = resolve_lora_targets(v, m.file());
              },
              [](YAML::Emitter& e, const Recipe& r) { e << YAML::Flow << r.finetune.lora.targets; }, nullptr})
        .integer("finetune.lora.expert_rank", [](auto& r) -> auto& { return r.finetune.lora.expert_rank; },
                 non_negative(), "the experts' adapter rank (0 = rank; e.g. rank / top-k keeps expert adapters small)")
        .boolean("finetune.lora.rslora", [](auto& r) -> auto& { return r.finetune.lora.rslora; },
                 "rank-stabilised scale alpha / sqrt(r)")
        .boolean("finetune.lora.update_expert_bias", [](auto& r) -> auto& { return r.finetune.lora.update_expert_bias; },
                 "under model.moe.balance: aux_free_bias, the routers' selection biases keep balancing the load while "
                 "the adapters train (saved with them); false: the base's, frozen (unset: true, but false for DPO "
                 "with reference adapters_off)")
        .choice("finetune.quant.type", [](auto& r) -> auto& { return r.quant_type; }, {"nf4", "int8"},
                "qlora: how the frozen base weights are stored")
        .integer("finetune.quant.block_size", [](auto& r) -> auto& { return r.finetune.quant.block_size; }, positive(),
                 "qlora: weights per absmax block (even for nf4)")
        .boolean("finetune.quant.double_quant", [](auto& r) -> auto& { return r.finetune.quant.double_quant; },
                 "qlora: the absmax values quantised to 8 bits too (QLoRA's double quantisation)")
        .integer("train.micro_batch_size", [](auto& r) -> auto& { return r.train.micro_batch_size; }, positive(),
                 "samples per rank per micro-batch (DPO: pairs)")
        .integer("train.seq_len", [](auto& r) -> auto& { return r.train.seq_len; }, positive(),
                 "tokens per sample (<= model.max_position_embeddings)")
        .integer("train.grad_accum", [](auto& r) -> auto& { return r.train.grad_accum; }, positive(),
                 "micro-batches per optimizer step")
        .integer("train.max_steps", [](auto& r) -> auto& { return r.train.max_steps; }, positive(), "optimizer steps")
        .optional_integer("train.max_tokens", [](auto& r) -> auto& { return r.train.max_tokens; }, positive(),
                          "token budget: steps = min(max_steps, budget / tokens per step)")
        .integer("train.log_interval", [](auto& r) -> auto& { return r.train.log_interval; }, positive(),
                 "steps between log lines")
        .integer("train.eval_interval", [](auto& r) -> auto& { return r.train.eval_interval; }, positive(),
                 "steps between held-out evaluations")
        .integer("train.eval_batches", [](auto& r) -> auto& { return r.train.eval_batches; }, positive(),
                 "held-out micro-batches per evaluation")
        .integer("train.checkpoint_interval", [](auto& r) -> auto& { return r.train.checkpoint_interval; }, positive(),
                 "steps between checkpoints")
        .integer("train.keep_checkpoints", [](auto& r) -> auto& { return r.train.keep_checkpoints; }, positive(),
                 "newest checkpoints kept")
        .integer("train.seed", [](auto& r) -> auto& { return r.train.seed; }, non_negative(),
                 "initialisation, data order and router jitter")
        .integer("train.skip_samples", [](auto& r) -> auto& { return r.train.skip_samples; }, non_negative(),
                 "a fresh run's data starts at this sample: continue another run's data order (its steps x "
                 "micro_batch_size x grad_accum x data ranks) when starting from its checkpoint with init_from")
        .choice("train.activation_checkpointing",
                [](auto& r) -> auto& { return r.train.activation_checkpointing; }, {"none", "full", "moe"},
                "recompute in the backward instead of keeping: full = each decoder layer, moe = each MoE block")
        .number("optim.lr", [](auto& r) -> auto& { return r.optim.lr; }, positive(), "peak learning rate")
        .number("optim.min_lr", [](auto& r) -> auto& { return r.optim.min_lr; }, non_negative(),
                "learning rate at the end of the decay")
        .add({"optim.betas", "[float, float]", "AdamW beta1, beta2, each in [0, 1)",
              [](YamlMap& m, const std::string& leaf, Recipe& r) {
                auto b = m.get_double_list(leaf, {r.optim.beta1, r.optim.beta2});
                if (b.size() != 2) m.fail(leaf, "expected [beta1, beta2]");
                if (b[0] < 0 || b[0] >= 1 || b[1] < 0 || b[1] >= 1) m.fail(leaf, "each must be in [0, 1)");
                r.optim.beta1 = b[0];
                r.optim.beta2 = b[1];
              },
              [](YAML::Emitter& e, const Recipe& r) {
                e << YAML::Flow << std::vector<double>{r.optim.beta1, r.optim.beta2};
              },
              nullptr})
        .number("optim.eps", [](auto& r) -> auto& { return r.optim.eps; }, positive(), "AdamW epsilon")
        .number("optim.weight_decay", [](auto& r) -> auto& { return r.optim.weight_decay; }, non_negative(),
                "decoupled weight decay (not on norms and other 1-D parameters)")
        .number("optim.grad_clip", [](auto& r) -> auto& { return r.optim.grad_clip; }, non_negative(),
                "global gradient-norm clipping, 0 = off")
        .choice("optim.schedule", [](auto& r) -> auto& { return r.optim.schedule; }, {"cosine", "wsd", "constant"},
                "after warm-up: cosine, warmup-stable-decay, or constant")
        .integer("optim.warmup_steps", [](auto& r) -> auto& { return r.optim.warmup_steps; }, non_negative(),
                 "linear warm-up steps")
        .number("optim.decay_fraction", [](auto& r) -> auto& { return r.optim.decay_fraction; }, in_range(0, 1, true),
                "wsd: final fraction of the steps that decays to min_lr")
        .choice("runtime.device", [](auto& r) -> auto& { return r.runtime.device; }, {"auto", "cpu", "cuda"},
                "auto = CUDA when available")
        .choice("runtime.precision", [](auto& r) -> auto& { return r.runtime.precision; }, {"fp32", "bf16", "auto"},
                "bf16 = mixed: bf16 matmuls, fp32 master weights, optimizer, router, norms and loss; auto = the "
                "faster of the two in a probe of forward and backward at start-up (summary.json: precision_choice)")
        .integer("runtime.threads", [](auto& r) -> auto& { return r.runtime.threads; }, non_negative(),
                 "intra-op threads, 0 = the cores (shared among the ranks of a machine)")
        .integer("parallel.timeout_s", [](auto& r) -> auto& { return r.parallel_timeout_s; }, positive(),
                 "rendezvous and every collective of a multi-process run")
        .integer("parallel.expert", [](auto& r) -> auto& { return r.parallel_expert; }, positive(),
                 "expert-parallel ranks EP (world = DP x EP; divides the world and moe.num_experts)")
        .integer("parallel.zero", [](auto& r) -> auto& { return r.parallel_zero; }, in_range(0, 1, true),
                 "1 = ZeRO-1: optimizer state sharded over the ranks holding each parameter")
        .string("output_dir", [](auto& r) -> auto& { return r.output_dir; }, not_empty, "the run directory")
        .choice("resume", [](auto& r) -> auto& { return r.resume; }, {"never", "auto"},
                "auto = continue from the newest checkpoint of output_dir")
        .string("init_from", [](auto& r) -> auto& { return r.init_from; }, nullptr,
                "a checkpoint directory, or hf:DIR, to start from (empty = fresh init)");
    return k;
  }();
  return t;
}

std::string key_reference_markdown() {
  auto cell = [](std::string s) {  // a | inside a Markdown table cell must be escaped
    for (size_t i = 0; (i = s.find('|', i)) != std::string::npos; i += 2) s.insert(i, "\\");
    return s;
  };
  auto table = [&](const std::vector<io::KeyDoc>& keys) {
    std::string t = "| key | type | default | meaning |\n|---|---|---|---|\n";
    for (const auto& k : keys)
      t += "| `" + k.name + "` | " + cell(k.type) + " | `" + cell(k.default_value) + "` | " + cell(k.help) + " |\n";
    return t;
  };
  const ModelConfig model_defaults;
  const Recipe recipe_defaults;
  return "# Configuration keys\n\n"
         "Generated by `moeforge info --keys` from the key declarations (src/io/model_config_yaml.cpp,\n"
         "src/recipe/recipe.cpp), which parsing and the YAML writer use too; a test keeps this page equal to them.\n\n"
         "## Model config (a file under configs/, or `model:` in a recipe)\n\n" +
         table(io::model_config_keys().reference(model_defaults)) +
         "\n## Recipe\n\n`model` is a config file, an inline mapping, or absent (then init_from's config). "
         "`--set a.b=c` overrides any key.\n\n" +
         table(recipe_keys().reference(recipe_defaults));
}

namespace {

// The value of dotted `key` in an emitted recipe ("" when absent).
std::string value_at(const YAML::Node& root, const std::string& key) {
  YAML::Node n = YAML::Clone(root);
  size_t from = 0;
  for (;;) {
    const size_t dot = key.find('.', from);
    const std::string part = key.substr(from, dot == std::string::npos ? std::string::npos : dot - from);
    if (!n.IsMap() || !n[part]) return "";
    n = n[part];
    if (dot == std::string::npos) break;
    from = dot + 1;
  }
  YAML::Emitter e;
  e << YAML::Flow << n;
  return e.c_str();
}

// Every dotted leaf key under `prefix` of an emitted recipe.
void leaves(const YAML::Node& n, const std::string& prefix, std::vector<std::string>& out) {
  if (!n.IsMap()) {
    out.push_back(prefix);
    return;
  }
  for (const auto& kv : n) leaves(kv.second, (prefix.empty() ? "" : prefix + ".") + kv.first.as<std::string>(), out);
}

}  // namespace

void refuse_no_op_keys(const Recipe& r, const std::vector<std::string>& overrides, bool shared_recipe) {
  const YAML::Node now = YAML::Load(r.yaml);
  Recipe defaults;
  const YAML::Node def = YAML::Load(recipe_keys().emit(defaults));
  std::vector<std::string> keys;
  leaves(now, "", keys);
  const auto& moe = r.model.moe;
  const std::string balance = balance_name(moe.balance);
  const bool model_from_file = r.model_source != "<inline>";
  for (const auto& k : keys) {
    std::string why;
    auto under = [&](const char* p) { return k.rfind(p, 0) == 0; };
    if (under("finetune.lora.") && r.finetune.method == "full")
      why = "finetune.method is full (LoRA keys apply to lora and qlora)";
    else if (under("finetune.quant.") && r.finetune.method != "qlora")
      why = "finetune.method is " + r.finetune.method + " (quant keys apply to qlora)";
    else if (under("sft.") && r.stage != "sft")
      why = "stage is " + r.stage + " (sft keys apply to stage sft)";
    else if (under("dpo.") && k != "dpo.reference" && r.stage != "dpo")  // reference: resolved from the method
      why = "stage is " + r.stage + " (dpo keys apply to stage dpo)";
    else if ((k == "sft.aux_loss_coef" || k == "dpo.aux_loss_coef" || k == "model.moe.aux_loss_coef") &&
             moe.balance != Balance::AuxLoss)
      why = "model.moe.balance is " + balance + " (the coefficient applies under balance: aux_loss)";
    else if ((k == "model.moe.bias_update_rate" || k == "model.moe.bias_update" ||
              k == "finetune.lora.update_expert_bias") && moe.balance != Balance::AuxFreeBias)
      why = "model.moe.balance is " + balance + " (the bias update applies under balance: aux_free_bias)";
    if (why.empty() || value_at(now, k) == value_at(def, k)) continue;
    const std::string msg = "key '" + k + "' (" + io::shortest_numbers(value_at(now, k)) + "): has no effect: " + why;
    bool given = false;  // by --set (or the point's own sweep overrides)
    for (const auto& o : overrides) given = given || o.rfind(k + "=", 0) == 0;
    const bool from_shared_file = (under("model.") && model_from_file) || shared_recipe;
    if (given || !from_shared_file) throw UserError(r.path + ": " + msg + "; remove it or change what disables it");
    static std::set<std::string> warned;  // once per key and file in a process (a sweep resolves many points)
    const std::string where = under("model.") && model_from_file ? r.model_source : r.path;
    if (warned.insert(where + k).second) MF_WARN(where << ": " << msg);
  }
}

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
  recipe_keys().parse(m, r);
  // model: a path to a config file, or the config inline; absent: the init_from checkpoint's.
  const std::string source = r.model_source;  // written back by the YAML writer: a resolved recipe
  if (!m.has("model") && !r.init_from.empty()) {
    r.model_source = r.init_from;
    r.model = io::read_init_config(r.init_from);
  } else if (!m.has("model")) {
    m.fail("model", "required: a model config file or an inline mapping (or give init_from)");
  } else if (root["model"].IsScalar()) {
    r.model_source = root["model"].as<std::string>();
    YAML::Node mn = io::load_yaml_file(r.model_source);
    for (const auto& o : model_overrides) io::apply_override(mn, o);
    r.model = io::parse_model_config(mn, r.model_source);
  } else {
    if (!root["model"].IsMap()) m.fail("model", "expected a config file name or a mapping");
    r.model_source = "<inline>";
    r.model = io::parse_model_config(root["model"], path, "model.");
  }
  // A resolved recipe (model inline) keeps naming the config file it came from.
  if (r.model_source == "<inline>" && !source.empty()) r.model_source = source;

  // Keys that depend on the stage or on the model.
  io::YamlMap d(root["data"], path, "data.");
  if (r.stage == "pretrain" && r.data_dir.empty()) d.fail("dir", "required for stage pretrain: a directory made by 'moeforge prepare'");
  if (r.stage == "sft" && r.sft_train.empty()) d.fail("train", "required for stage sft: a JSONL file of examples");
  if (r.stage == "sft" && r.sft_val.empty()) d.fail("val", "required for stage sft: a JSONL file of held-out examples");
  if (r.stage == "dpo" && r.sft_train.empty()) d.fail("train", "required for stage dpo: a JSONL file of preference pairs");
  if (r.stage == "dpo" && r.sft_val.empty()) d.fail("val", "required for stage dpo: a JSONL file of held-out pairs");
  if (r.stage == "dpo" && r.init_from.empty())
    m.fail("init_from", "required for stage dpo: the checkpoint to tune (it is also the reference model)");
  // Fine-tuning method: adapters need a base, and the DPO reference follows the method.
  r.finetune.quant.type = parse_quant_type(r.quant_type);
  if (r.finetune.adapters() && r.init_from.empty())
    m.fail("init_from", "required for finetune.method " + r.finetune.method + ": the base model the adapters train on");
  if (r.finetune.quantized() && r.finetune.quant.type == QuantType::NF4 && r.finetune.quant.block_size % 2 != 0)
    io::YamlMap(root["finetune"]["quant"], path, "finetune.quant.").fail("block_size", "must be even for nf4, got " + std::to_string(r.finetune.quant.block_size));
  if (r.dpo.reference == "auto") r.dpo.reference = r.finetune.adapters() ? "adapters_off" : "frozen";
  if (r.dpo.reference == "frozen" && r.finetune.adapters())
    io::YamlMap(root["dpo"], path, "dpo.")
        .fail("reference", "frozen keeps a second, float copy of the base; with finetune.method " + r.finetune.method +
                               " the reference is the policy with its adapters off (adapters_off, the default) or "
                               "precompute");
  if (r.dpo.reference == "adapters_off" && !r.finetune.adapters())
    io::YamlMap(root["dpo"], path, "dpo.").fail("reference", "adapters_off needs finetune.method lora or qlora");
  if (r.stage == "dpo" && r.dpo.reference == "adapters_off" && r.finetune.lora.update_expert_bias &&
      r.model.moe.balance == Balance::AuxFreeBias) {
    const YAML::Node& c = root;  // const: looking does not add keys
    const bool given = c["finetune"] && c["finetune"]["lora"] && c["finetune"]["lora"]["update_expert_bias"];
    if (given)
      io::YamlMap(root["finetune"]["lora"], path, "finetune.lora.")
          .fail("update_expert_bias", "true moves the routers' biases that the adapters_off reference routes with "
                                      "too; set it false or dpo.reference: precompute");
    r.finetune.lora.update_expert_bias = false;  // the default resolved: the reference's biases stay its own
  }
  if (r.train.seq_len > r.model.max_position_embeddings)
    io::YamlMap(root["train"], path, "train.")
        .fail("seq_len", "exceeds the model's max_position_embeddings (" +
                             std::to_string(r.model.max_position_embeddings) + ")");
  if (r.model.moe.num_experts % r.parallel_expert != 0)
    io::YamlMap(root["parallel"], path, "parallel.")
        .fail("expert", std::to_string(r.parallel_expert) + " does not divide model.moe.num_experts (" +
                            std::to_string(r.model.moe.num_experts) + ")");
  r.yaml = recipe_keys().emit(r);
  return r;
}

}  // namespace moeforge::train
