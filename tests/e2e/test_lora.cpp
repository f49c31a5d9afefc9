// End to end, LoRA and QLoRA: SFT with adapters on a Hugging Face base resumes bit for bit; its checkpoint
// holds adapters and a base pointer; its PEFT export, applied by hand to the base's HF export in an
// independent Python forward, reproduces the checkpoint's logits; merged exports compute what the checkpoint
// computes; QLoRA trains, evaluates, exports; a changed base is refused; DPO on adapters (reference: the
// same network with its adapters off) trains from an adapter checkpoint.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <torch/torch.h>

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "corpus.h"
#include "io/gguf.h"
#include "io/gguf_export.h"
#include "io/hf_import.h"
#include "io/safetensors.h"
#include "model/finetune.h"
#include "run_util.h"
#include "test_util.h"
#include "checkpoint/checkpoint.h"

using namespace moeforge;
namespace fs = std::filesystem;

namespace {
using test::kBin;
const std::string kLoraModelYaml = test::small_model_yaml("lora-e2e", ", router_jitter: 0.0");

// The exit status of `cmd` (128 + signal when killed); its stderr goes to the test's log when it fails.
int status_of(const std::string& cmd) {
  const std::string err = fs::temp_directory_path() / ("moeforge_lora_err_" + std::to_string(::getpid()));
  const int rc = std::system((cmd + " >/dev/null 2>" + err).c_str());
  const int status = WIFEXITED(rc) ? WEXITSTATUS(rc) : (WIFSIGNALED(rc) ? 128 + WTERMSIG(rc) : -1);
  std::ifstream in(err);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (status != 0) std::fprintf(stderr, "[%s] exit %d:\n%s\n", cmd.c_str(), status, text.substr(text.size() > 2000 ? text.size() - 2000 : 0).c_str());
  fs::remove(err);
  return status;
}

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

void write_lora_pairs(const std::string& path, int n, int offset) {
  static const char* subj[] = {"the cat", "a dog", "the old man", "my sister", "the river", "a small bird"};
  static const char* obj[] = {"the moon.", "a red apple.", "the long road.", "the quiet town.", "a green boat.",
                              "the winter sky."};
  std::ofstream out(path);
  for (int i = 0; i < n; ++i) {
    const int k = (i + offset) % 6;
    out << nlohmann::json{{"prompt", std::string(subj[k]) + " sees"}, {"completion", obj[k]}}.dump() << "\n";
  }
}

// A pretrained tiny base (moeforge checkpoint), shared by the tests of this file.
std::string pretrain(const test::TempDir& dir, const std::string& data, const std::string& name, int steps = 10) {
  std::ofstream(dir / (name + ".yaml")) << "stage: pretrain\n" << kLoraModelYaml << "data: {dir: " << data << "}\n"
                                        << "train: {micro_batch_size: 4, seq_len: 32, max_steps: " << steps
                                        << ", eval_batches: 2}\nruntime: {threads: 1}\noutput_dir: " << (dir / name) << "\n";
  EXPECT_EQ(status_of(kBin + " train " + (dir / (name + ".yaml"))), 0);
  return *train::latest_checkpoint(dir / name);
}

torch::Tensor lora_logits(MixtralForCausalLM& m, const torch::Tensor& ids) {
  torch::NoGradGuard ng;
  m->eval();
  return m->forward(ids).logits.contiguous();
}

// The merged export built one expert share at a time (2 shares of the 4 experts, small shards) holds exactly the
// tensors of the export built in one piece.
void expect_same_merged_export_by_shares(const std::string& ckpt, const std::string& whole, const std::string& out) {
  ASSERT_EQ(status_of(kBin + " export " + ckpt + " --format hf --dtype fp32 --expert-shares 2 --max-shard-size 40KB --out " +
                      out),
            0);
  ASSERT_TRUE(fs::exists(out + "/model.safetensors.index.json"));
  MixtralForCausalLM a(train::read_checkpoint_config(ckpt)), b(train::read_checkpoint_config(ckpt));
  io::load_hf_weights(whole, a);
  io::load_hf_weights(out, b);
  auto pb = b->named_parameters();
  for (auto& p : a->named_parameters()) EXPECT_TRUE(torch::equal(p.value(), pb[p.key()])) << p.key();
  EXPECT_EQ(status_of(kBin + " export " + ckpt + " --format hf --expert-shares 3 --out " + out + "-bad"), 2);
  // GGUF streams the same way: byte for byte the same file from 1 and from 2 shares, and its stacked experts and
  // q projection are the merged HF tensors (q's rows in llama.cpp's interleaved RoPE order).
  ASSERT_EQ(status_of(kBin + " export " + ckpt + " --format gguf --dtype fp32 --expert-shares 1 --out " + out + "-1.gguf"), 0);
  ASSERT_EQ(status_of(kBin + " export " + ckpt + " --format gguf --dtype fp32 --expert-shares 2 --out " + out + "-2.gguf"), 0);
  EXPECT_EQ(read_all(out + "-1.gguf"), read_all(out + "-2.gguf"));
  auto g = io::GgufFile::open(out + "-2.gguf");
  const auto& cfg = a->config();
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    const std::string pre = "model.layers." + std::to_string(l) + ".";
    std::vector<torch::Tensor> w1, w2;
    for (int64_t e = 0; e < cfg.moe.num_experts; ++e) {
      w1.push_back(pb[pre + "block_sparse_moe.experts." + std::to_string(e) + ".w1.weight"]);
      w2.push_back(pb[pre + "block_sparse_moe.experts." + std::to_string(e) + ".w2.weight"]);
    }
    const std::string gg = "blk." + std::to_string(l) + ".";
    EXPECT_TRUE(torch::equal(g.get(gg + "ffn_gate_exps.weight"), torch::stack(w1))) << l;
    EXPECT_TRUE(torch::equal(g.get(gg + "ffn_down_exps.weight"), torch::stack(w2))) << l;
    EXPECT_TRUE(torch::equal(g.get(gg + "attn_q.weight"),
                             io::permute_rope_rows(pb[pre + "self_attn.q_proj.weight"], cfg.num_attention_heads)))
        << l;
  }
}

// `eval --json` of `ckpt` under `moeforge launch` with 2 ranks (each holding half of every layer's experts and,
// for an adapter checkpoint, their adapters, its base checked by the fingerprint over both) equals one process.
void expect_same_eval_under_expert_parallelism(const std::string& ckpt, const std::string& data, const std::string& tmp) {
  const std::string eval = " eval " + ckpt + " --data " + data + " --seq-len 32 --batches 2 --json --threads 1";
  ASSERT_EQ(std::system((kBin + eval + " > " + tmp + "-one 2>/dev/null").c_str()), 0);
  ASSERT_EQ(std::system((kBin + " launch --nproc-per-node 2 --master-port " + std::to_string(test::free_port()) + " --" +
                         eval + " > /dev/null 2> " + tmp + "-ep")
                            .c_str()),
            0);
  const auto one = read_json(tmp + "-one");
  const std::string text = read_all(tmp + "-ep"), head = "[rank 0] {";
  const auto at = text.find(head);
  ASSERT_NE(at, std::string::npos) << text;
  const auto ep = nlohmann::json::parse(text.substr(at + head.size() - 1, text.find('\n', at) - at - head.size() + 1));
  EXPECT_EQ(ep["tokens"], one["tokens"]);
  EXPECT_NEAR(ep["loss"].get<double>(), one["loss"].get<double>(), 1e-5 * one["loss"].get<double>());
}

}  // namespace

TEST(LoraE2e, SftOnAnHfBaseResumesBitwiseAndItsPeftAdapterReproducesIt) {
  test::TempDir dir("lorae2e");
  const std::string data = test::make_prepared(dir, 80);
  const std::string pre = pretrain(dir, data, "pre");
  ASSERT_EQ(status_of(kBin + " export " + pre + " --format hf --dtype fp32 --out " + (dir / "hfbase")), 0);
  write_lora_pairs(dir / "train.jsonl", 48, 0);
  write_lora_pairs(dir / "val.jsonl", 12, 3);
  const std::string recipe = dir / "sft.yaml";
  std::ofstream(recipe) << "stage: sft\ninit_from: hf:" << (dir / "hfbase") << "\ndata: {train: " << (dir / "train.jsonl")
                        << ", val: " << (dir / "val.jsonl") << "}\n"
                        << "finetune: {method: lora, lora: {rank: 4, alpha: 8, dropout: 0.1, targets: [all, lm_head], expert_rank: 2}}\n"
                        << "train: {micro_batch_size: 4, seq_len: 32, max_steps: 6, log_interval: 1, eval_interval: 6, "
                           "eval_batches: 2, checkpoint_interval: 3, keep_checkpoints: 3}\n"
                        << "optim: {lr: 1.0e-2, warmup_steps: 1}\nruntime: {threads: 1}\n";
  ASSERT_EQ(status_of(kBin + " train " + recipe + " --set output_dir=" + (dir / "a")), 0);
  // Interrupted after the checkpoint of step 3 (SIGKILL), resumed: every logged number and the final
  // adapters, optimizer state and dropout stream are the uninterrupted run's, bit for bit.
  EXPECT_EQ(status_of("MOEFORGE_TEST_KILL_AFTER_CHECKPOINT=3 " + kBin + " train " + recipe + " --set output_dir=" + (dir / "b")),
            128 + SIGKILL);
  ASSERT_EQ(status_of(kBin + " train " + recipe + " --set output_dir=" + (dir / "b") + " --resume"), 0);
  auto la = test::metric_records(dir / "a", "loss"), lb = test::metric_records(dir / "b", "loss");
  ASSERT_EQ(la.size(), 6u);
  ASSERT_EQ(lb.size(), 6u);
  for (size_t i = 0; i < 6; ++i) {
    EXPECT_EQ(la[i]["loss"].get<double>(), lb[i]["loss"].get<double>()) << "step " << i + 1;
    EXPECT_EQ(la[i]["grad_norm"].get<double>(), lb[i]["grad_norm"].get<double>()) << "step " << i + 1;
  }
  const std::string ca = *train::latest_checkpoint(dir / "a"), cb = *train::latest_checkpoint(dir / "b");
  EXPECT_EQ(read_all(ca + "/model.safetensors"), read_all(cb + "/model.safetensors"));
  EXPECT_EQ(read_all(ca + "/optimizer.safetensors"), read_all(cb + "/optimizer.safetensors"));
  EXPECT_LT(la[5]["loss"].get<double>(), la[0]["loss"].get<double>());
  // Recomputing every layer in the backward replays the same dropout masks: the same training.
  ASSERT_EQ(status_of(kBin + " train " + recipe + " --set output_dir=" + (dir / "rc") +
                      " --set train.activation_checkpointing=full --set train.max_steps=3"),
            0);
  auto lr = test::metric_records(dir / "rc", "loss");
  ASSERT_EQ(lr.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_NEAR(lr[i]["loss"].get<double>(), la[i]["loss"].get<double>(), 1e-6 * la[i]["loss"].get<double>()) << "step " << i + 1;
    EXPECT_NEAR(lr[i]["grad_norm"].get<double>(), la[i]["grad_norm"].get<double>(), 1e-5 * la[i]["grad_norm"].get<double>())
        << "step " << i + 1;
  }

  // The checkpoint: adapters (per-expert names) and the expert biases, a pointer to the base.
  ASSERT_TRUE(fs::exists(ca + "/base.json"));
  auto bj = read_json(ca + "/base.json");
  EXPECT_EQ(bj["method"], "lora");
  EXPECT_EQ(bj["init_from"], "hf:" + fs::absolute(dir / "hfbase").string());
  auto f = io::SafetensorsFile::open(ca + "/model.safetensors");
  bool has_expert_adapter = false;
  for (const auto& n : f.names()) {
    EXPECT_TRUE(n.find("lora_") != std::string::npos || n.find("expert_bias") != std::string::npos) << n;
    has_expert_adapter = has_expert_adapter || n == "model.layers.1.block_sparse_moe.experts.3.w2.lora_B.weight";
  }
  EXPECT_TRUE(has_expert_adapter);
  EXPECT_EQ(f.entry("model.layers.1.block_sparse_moe.experts.3.w2.lora_B.weight").shape, (std::vector<int64_t>{32, 2}));

  // eval, generate and routing take the adapter checkpoint as they take any other.
  EXPECT_EQ(status_of(kBin + " eval " + ca + " --data " + data), 0);
  expect_same_eval_under_expert_parallelism(ca, data, dir / "eval");
  EXPECT_EQ(status_of(kBin + " generate " + ca + " --prompt 'the cat' --max-new-tokens 4"), 0);
  EXPECT_EQ(status_of(kBin + " routing " + ca + " --data " + data + " --seq-len 32 --max-tokens 256"), 0);

  // PEFT export: config and key names as PEFT writes them for transformers' per-expert Mixtral.
  ASSERT_EQ(status_of(kBin + " export " + ca + " --format peft --out " + (dir / "adapter")), 0);
  auto cfg = read_json(dir / "adapter/adapter_config.json");
  EXPECT_EQ(cfg["peft_type"], "LORA");
  EXPECT_EQ(cfg["r"], 4);
  EXPECT_EQ(cfg["lora_alpha"].get<double>(), 8.0);
  EXPECT_EQ(cfg["use_rslora"], false);
  EXPECT_EQ(cfg["target_modules"].size(), 9u);
  EXPECT_EQ(cfg["rank_pattern"]["w1"], 2);
  auto af = io::SafetensorsFile::open(dir / "adapter/adapter_model.safetensors");
  EXPECT_TRUE(af.contains("base_model.model.model.layers.0.block_sparse_moe.experts.3.w1.lora_A.weight"));
  EXPECT_TRUE(af.contains("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"));
  EXPECT_TRUE(af.contains("base_model.model.model.layers.0.block_sparse_moe.gate.lora_A.weight"));
  EXPECT_TRUE(af.contains("base_model.model.lm_head.lora_B.weight"));

  // The checkpoint's logits, for the independent reference and for the merged export.
  auto model = train::load_checkpoint_model(ca);
  auto ids = torch::randint(0, 320, {2, 9}, torch::kLong);
  auto lg = lora_logits(model, ids);
  {
    std::ofstream out(dir / "blob.bin", std::ios::binary);
    int64_t dims[3] = {2, 9, 320};
    out.write(reinterpret_cast<const char*>(dims), sizeof dims);
    out.write(static_cast<const char*>(ids.data_ptr()), ids.numel() * 8);
    out.write(static_cast<const char*>(lg.data_ptr()), lg.numel() * 4);
  }
  if (std::system("/usr/bin/python3 -c 'import torch, numpy' >/dev/null 2>&1") == 0) {
    const std::string cmd = "/usr/bin/python3 " + test::source_path("tests/python/peft_reference.py") + " " +
                            (dir / "hfbase") + " " + (dir / "adapter") + " " + (dir / "blob.bin");
    EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  } else {
    ADD_FAILURE() << "python3-torch / python3-numpy missing (scripts/setup.sh installs them)";
  }
  // --format hf writes the merged model: a plain Mixtral that computes the same logits.
  ASSERT_EQ(status_of(kBin + " export " + ca + " --format hf --dtype fp32 --out " + (dir / "merged")), 0);
  MixtralForCausalLM plain(train::read_checkpoint_config(ca));
  io::load_hf_weights(dir / "merged", plain);
  EXPECT_LT((lora_logits(plain, ids) - lg).abs().max().item<double>(), 1e-5);
  expect_same_merged_export_by_shares(ca, dir / "merged", dir / "merged2");
  // The adapters moved the model away from its base.
  MixtralForCausalLM b(train::read_checkpoint_config(ca));
  io::load_hf_weights(dir / "hfbase", b);
  EXPECT_GT((lora_logits(b, ids) - lg).abs().max().item<double>(), 1e-3);
}

TEST(QloraE2e, TrainsOnAQuantisedBaseExportsMergedRefusesAChangedBaseAndDpoFollows) {
  test::TempDir dir("qlorae2e");
  const std::string data = test::make_prepared(dir, 80);
  const std::string pre = pretrain(dir, data, "pre");
  write_lora_pairs(dir / "train.jsonl", 48, 0);
  write_lora_pairs(dir / "val.jsonl", 12, 3);
  const std::string recipe = dir / "sft.yaml";
  std::ofstream(recipe) << "stage: sft\ninit_from: " << pre << "\ndata: {train: " << (dir / "train.jsonl")
                        << ", val: " << (dir / "val.jsonl") << "}\n"
                        << "finetune: {method: qlora, lora: {rank: 4, alpha: 8, dropout: 0.0}, quant: {block_size: 32}}\n"
                        << "train: {micro_batch_size: 4, seq_len: 32, max_steps: 8, log_interval: 1, eval_interval: 8, "
                           "eval_batches: 2, checkpoint_interval: 8}\n"
                        << "optim: {lr: 1.0e-2, warmup_steps: 1}\nruntime: {threads: 1, precision: bf16}\n"
                        << "output_dir: " << (dir / "q") << "\n";
  ASSERT_EQ(status_of(kBin + " train " + recipe), 0);
  auto l = test::metric_records(dir / "q", "loss");
  ASSERT_EQ(l.size(), 8u);
  EXPECT_LT(l[7]["loss"].get<double>(), l[0]["loss"].get<double>());
  const std::string ck = *train::latest_checkpoint(dir / "q");
  EXPECT_EQ(read_json(ck + "/base.json")["method"], "qlora");
  EXPECT_EQ(status_of(kBin + " eval " + ck + " --data " + data), 0);
  // Merged export: the NF4 base dequantised plus the adapters, in a plain model, computes the checkpoint.
  ASSERT_EQ(status_of(kBin + " export " + ck + " --format hf --dtype fp32 --out " + (dir / "merged")), 0);
  expect_same_merged_export_by_shares(ck, dir / "merged", dir / "merged2");
  auto model = train::load_checkpoint_model(ck, "fp32");
  auto ids = torch::randint(0, 320, {2, 9}, torch::kLong);
  MixtralForCausalLM plain(train::read_checkpoint_config(ck));
  io::load_hf_weights(dir / "merged", plain);
  EXPECT_LT((lora_logits(plain, ids) - lora_logits(model, ids)).abs().max().item<double>(), 1e-5);

  // DPO with adapters on the QLoRA checkpoint (its merged model is the base); reference: adapters_off.
  {
    std::ofstream p(dir / "pairs.jsonl");
    const char* obj[] = {"the moon.", "a red apple.", "the long road.", "the quiet town."};
    for (int i = 0; i < 16; ++i)
      p << nlohmann::json{{"prompt", "the cat sees " + std::to_string(i % 5)}, {"chosen", obj[i % 4]},
                          {"rejected", obj[(i + 1) % 4]}}.dump()
        << "\n";
  }
  std::ofstream(dir / "dpo.yaml") << "stage: dpo\ninit_from: " << ck << "\ndata: {train: " << (dir / "pairs.jsonl")
                                  << ", val: " << (dir / "pairs.jsonl") << "}\nfinetune: {method: lora}\n"
                                  << "train: {micro_batch_size: 4, seq_len: 48, max_steps: 4, log_interval: 1, "
                                     "eval_interval: 4, eval_batches: 1, checkpoint_interval: 4}\n"
                                  << "optim: {lr: 1.0e-2, warmup_steps: 0}\nruntime: {threads: 1}\noutput_dir: "
                                  << (dir / "dpo") << "\n";
  ASSERT_EQ(status_of(kBin + " train " + (dir / "dpo.yaml")), 0);
  auto s = read_json(dir / "dpo/summary.json");
  EXPECT_TRUE(s.contains("final_val_rewards/accuracies"));
  EXPECT_NE(read_all(dir / "dpo/config.yaml").find("reference: adapters_off"), std::string::npos);
  // At step 0 the policy is its reference: margins 0 (the first logged eval).
  auto ev = test::metric_records(dir / "dpo", "val_loss");
  ASSERT_FALSE(ev.empty());
  EXPECT_NEAR(ev[0]["val_loss"].get<double>(), std::log(2.0), 1e-6);

  // Full fine-tuning can start from an adapter checkpoint too (its merged model). The recipe without its LoRA and
  // quant keys, which would have no effect with method full (refused: issue 31).
  std::string full_text = read_all(recipe);
  const std::string ft_line = "finetune: {method: qlora, lora: {rank: 4, alpha: 8, dropout: 0.0}, quant: {block_size: 32}}\n";
  ASSERT_NE(full_text.find(ft_line), std::string::npos);
  full_text.replace(full_text.find(ft_line), ft_line.size(), "finetune: {method: full}\n");
  const std::string full_recipe = dir / "full.yaml";
  std::ofstream(full_recipe) << full_text;
  ASSERT_EQ(status_of(kBin + " train " + full_recipe + " --set init_from=" + ck +
                      " --set train.max_steps=1 --set output_dir=" + (dir / "full_from_q")),
            0);

  // The chained base under expert parallelism: each of 2 ranks merges its half of the experts of the QLoRA
  // checkpoint into its share of the base (the base's fingerprint checked over both ranks). DPO with adapters on
  // it trains as one process accumulating the same pairs in 2 micro-batches, and a full fine-tune from it starts
  // from the same model (its held-out loss before any update).
  const std::string dpo_same = " --set train.micro_batch_size=2 --set finetune.lora.dropout=0.0";
  ASSERT_EQ(status_of(kBin + " train " + (dir / "dpo.yaml") + dpo_same + " --set train.grad_accum=2 --set output_dir=" +
                      (dir / "dpo1")),
            0);
  ASSERT_EQ(status_of(kBin + " launch --nproc-per-node 2 --master-port " + std::to_string(test::free_port()) +
                      " -- train " + (dir / "dpo.yaml") + dpo_same + " --set parallel.expert=2 --set output_dir=" +
                      (dir / "dpo2")),
            0);
  auto d1 = test::metric_records(dir / "dpo1", "loss"), d2 = test::metric_records(dir / "dpo2", "loss");
  ASSERT_EQ(d1.size(), 4u);
  ASSERT_EQ(d2.size(), 4u);
  for (size_t i = 0; i < 4; ++i)
    EXPECT_NEAR(d2[i]["loss"].get<double>(), d1[i]["loss"].get<double>(), 1e-5 * d1[i]["loss"].get<double>()) << i;
  // Its merged export by expert shares (each share's chained base merged on its own, the whole base checked over
  // the shares by the outer fingerprint) equals the one-piece export.
  const std::string chained = *train::latest_checkpoint(dir / "dpo1");
  ASSERT_EQ(status_of(kBin + " export " + chained + " --format hf --dtype fp32 --out " + (dir / "chained")), 0);
  expect_same_merged_export_by_shares(chained, dir / "chained", dir / "chained2");
  const std::string full_same = " --set init_from=" + ck +
                                " --set train.max_steps=1 --set runtime.precision=fp32 --set train.micro_batch_size=2";
  ASSERT_EQ(status_of(kBin + " train " + full_recipe + full_same + " --set train.grad_accum=2 --set output_dir=" + (dir / "full1")), 0);
  ASSERT_EQ(status_of(kBin + " launch --nproc-per-node 2 --master-port " + std::to_string(test::free_port()) + " -- train " +
                      full_recipe + full_same + " --set parallel.expert=2 --set output_dir=" + (dir / "full2")),
            0);
  auto f1 = test::metric_records(dir / "full1", "val_loss"), f2 = test::metric_records(dir / "full2", "val_loss");
  ASSERT_FALSE(f1.empty());
  ASSERT_FALSE(f2.empty());
  EXPECT_EQ(f1[0]["step"], 0);
  EXPECT_NEAR(f2[0]["val_loss"].get<double>(), f1[0]["val_loss"].get<double>(), 1e-5 * f1[0]["val_loss"].get<double>());

  // A base that changed under the adapters is refused with a one-line error naming base.json.
  const std::string other = pretrain(dir, data, "other", 3);
  fs::remove_all(pre);
  fs::copy(other, pre);
  const std::string err = dir / "err.txt";
  const int rc = std::system((kBin + " eval " + ck + " --data " + data + " >/dev/null 2>" + err).c_str());
  EXPECT_EQ(WEXITSTATUS(rc), 2);
  EXPECT_NE(read_all(err).find("base.json"), std::string::npos) << read_all(err);
}

// Aux-loss-free selection biases under adapters (model.moe.balance: aux_free_bias). With
// finetune.lora.update_expert_bias: false they stay the base's: the adapter checkpoint holds them unchanged. By
// default they go on balancing as in full fine-tuning; the reference is the sign rule replayed from the run's own logged loads, in double:
// b += rate * sign(mean(load) - load), then b -= mean(b), every step from the base's b. Tolerance: the float run
// rounds at most E + 2 times a step (add, the E-term mean, subtract), each within 2^-24 of max|b|, so after S
// steps the two differ by at most S (E + 2) 2^-24 max|b|. DPO with the adapters_off reference (which routes with
// the same biases) keeps them by default and refuses the key set true; method full and a model without the biases
// refuse it too (exit 2), and so does a resume that flips the run's choice.
TEST(LoraE2e, ExpertBiasesBalanceUnderAdaptersUnlessFrozen) {
  test::TempDir dir("lorabias");
  const std::string data = test::make_prepared(dir, 80);
  std::string model = test::small_model_yaml("lora-bias", ", router_jitter: 0.0, balance: aux_free_bias, bias_update_rate: 0.01");
  const std::string coef = "aux_loss_coef: 0.01";  // no effect under aux_free_bias: refused; the default instead
  ASSERT_NE(model.find(coef), std::string::npos);
  model.replace(model.find(coef), coef.size(), "aux_loss_coef: 0.02");
  std::ofstream(dir / "pre.yaml") << "stage: pretrain\n" << model << "data: {dir: " << data << "}\n"
                                  << "train: {micro_batch_size: 4, seq_len: 32, max_steps: 10, eval_batches: 2}\n"
                                  << "runtime: {threads: 1}\noutput_dir: " << (dir / "pre") << "\n";
  ASSERT_EQ(status_of(kBin + " train " + (dir / "pre.yaml")), 0);
  const std::string pre = *train::latest_checkpoint(dir / "pre");
  const int64_t L = 2, E = 4, S = 6;
  auto biases = [&](const std::string& ck) {
    auto f = io::SafetensorsFile::open(ck + "/model.safetensors");
    std::vector<torch::Tensor> out;
    for (int64_t l = 0; l < L; ++l)
      out.push_back(f.get("model.layers." + std::to_string(l) + ".block_sparse_moe.gate.expert_bias").to(torch::kDouble));
    return out;
  };
  const auto base = biases(pre);
  double extent = 0;
  for (auto& b : base) extent = std::max(extent, b.abs().max().item<double>());
  ASSERT_GT(extent, 0.0) << "the base's biases never moved: nothing to tell apart";

  const std::string recipe = dir / "lora.yaml";
  std::ofstream(recipe) << "stage: pretrain\ninit_from: " << pre << "\ndata: {dir: " << data << "}\n"
                        << "finetune: {method: lora, lora: {rank: 4, alpha: 8}}\n"
                        << "train: {micro_batch_size: 4, seq_len: 32, max_steps: " << S
                        << ", log_interval: 1, eval_interval: " << S << ", eval_batches: 2, checkpoint_interval: " << S << "}\n"
                        << "optim: {lr: 1.0e-2, warmup_steps: 1}\nruntime: {threads: 1}\n";
  ASSERT_EQ(status_of(kBin + " train " + recipe + " --set finetune.lora.update_expert_bias=false --set output_dir=" +
                      (dir / "frozen")),
            0);
  auto frozen = biases(*train::latest_checkpoint(dir / "frozen"));
  for (int64_t l = 0; l < L; ++l) EXPECT_TRUE(torch::equal(frozen[l], base[l])) << "layer " << l;
  // A resume keeps the run's choice: with the key now at its default (true) it is refused, exit 2, and the
  // checkpoint stays the only one; set as the run had it, the run goes on.
  {
    const std::string more = " --set finetune.lora.update_expert_bias=false --set output_dir=" + (dir / "frozen") +
                             " --set train.max_steps=" + std::to_string(2 * S) + " --resume";
    const std::string flipped = more.substr(more.find(" --set output_dir"));
    const std::string err = dir / "flip.err";
    const int rc = std::system((kBin + " train " + recipe + flipped + " >/dev/null 2>" + err).c_str());
    EXPECT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 2) << read_all(err);
    EXPECT_NE(read_all(err).find(train::checkpoint_dir(dir / "frozen", S) + "/recipe.yaml: the run was trained with "
                                 "finetune.lora.update_expert_bias false; the recipe now says true"),
              std::string::npos) << read_all(err);
    EXPECT_EQ(*train::latest_checkpoint(dir / "frozen"), train::checkpoint_dir(dir / "frozen", S));
    ASSERT_EQ(status_of(kBin + " train " + recipe + more), 0);
    EXPECT_EQ(*train::latest_checkpoint(dir / "frozen"), train::checkpoint_dir(dir / "frozen", 2 * S));
    auto still = biases(*train::latest_checkpoint(dir / "frozen"));
    for (int64_t l = 0; l < L; ++l) EXPECT_TRUE(torch::equal(still[l], base[l])) << "layer " << l;
  }

  ASSERT_EQ(status_of(kBin + " train " + recipe + " --set output_dir=" + (dir / "moving")), 0);
  const std::string moving = *train::latest_checkpoint(dir / "moving");
  auto moved = biases(moving);
  auto records = test::metric_records(dir / "moving", "loss");
  ASSERT_EQ(records.size(), static_cast<size_t>(S));
  std::vector<torch::Tensor> want;
  for (auto& b : base) want.push_back(b.clone());
  double most = extent;
  for (const auto& rec : records)
    for (int64_t l = 0; l < L; ++l) {
      auto load = torch::tensor(rec["expert_load"][l].get<std::vector<int64_t>>()).to(torch::kDouble);
      ASSERT_EQ(load.numel(), E);
      want[l] += 0.01 * torch::sign(load.mean() - load);
      want[l] -= want[l].mean();
      most = std::max(most, want[l].abs().max().item<double>());
    }
  const double tol = S * (E + 2) * std::ldexp(1.0, -24) * most;
  for (int64_t l = 0; l < L; ++l) {
    EXPECT_LE((moved[l] - want[l]).abs().max().item<double>(), tol) << "layer " << l << ": " << moved[l] << want[l];
    EXPECT_FALSE(torch::equal(moved[l], base[l])) << "layer " << l;
  }

  // Refused where it cannot be meant, each with its one-line reason.
  auto refused = [&](const std::string& sets, const std::string& out, const std::string& why) {
    const std::string err = dir / (out + ".err");
    const int rc = std::system((kBin + " train " + recipe + sets + " --set output_dir=" +
                                (dir / out) + " >/dev/null 2>" + err).c_str());
    EXPECT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 2) << sets;
    const std::string text = read_all(err);
    EXPECT_NE(text.find(why), std::string::npos) << text;
    EXPECT_NE(text.find("update_expert_bias"), std::string::npos) << text;
    EXPECT_FALSE(fs::exists(dir / out)) << sets;
  };
  refused(" --set finetune.method=full --set finetune.lora.rank=16 --set finetune.lora.alpha=32 --set finetune.lora.update_expert_bias=false", "r1", "LoRA keys apply to lora and qlora");
  {
    std::ofstream p(dir / "p.jsonl");
    for (int i = 0; i < 8; ++i)
      p << nlohmann::json{{"prompt", "the cat sees " + std::to_string(i)}, {"chosen", "the moon."}, {"rejected", "a dog."}}.dump() << "\n";
  }
  const std::string dpo = " --set stage=dpo --set data.dir= --set data.train=" + (dir / "p.jsonl") + " --set data.val=" +
                          (dir / "p.jsonl") + " --set init_from=" + moving;
  refused(dpo + " --set finetune.lora.update_expert_bias=true", "r2", "adapters_off reference routes with too");
  refused(" --set model.moe.balance=aux_loss --set finetune.lora.update_expert_bias=false", "r3",
          "the bias update applies under balance: aux_free_bias");
  // DPO on the moved adapters, key unset: its reference's biases (the SFT's) are the policy's throughout.
  ASSERT_EQ(status_of(kBin + " train " + recipe + dpo + " --set train.seq_len=48 --set output_dir=" + (dir / "dpo")), 0);
  EXPECT_NE(read_all(dir / "dpo/config.yaml").find("update_expert_bias: false"), std::string::npos);
  auto after = biases(*train::latest_checkpoint(dir / "dpo"));
  for (int64_t l = 0; l < L; ++l) EXPECT_TRUE(torch::equal(after[l], moved[l])) << "layer " << l;
}
