// Export to Hugging Face safetensors and GGUF, import back, and hostile files.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "core/error.h"
#include "corpus.h"
#include "io/gguf.h"
#include "io/gguf_export.h"
#include "io/hf_checkpoint.h"
#include "io/hf_config.h"
#include "io/hf_import.h"
#include "io/safetensors.h"
#include "model/decoder.h"
#include "test_util.h"
#include "checkpoint/checkpoint.h"
#include "objective/lm_objective.h"
#include "optim/optimizer.h"

using namespace moeforge;
namespace fs = std::filesystem;

namespace {

ModelConfig export_config() {
  ModelConfig c = test::tiny_config();  // vocab 64, hidden 32, 2 layers, 4 heads / 2 kv, 4 experts top-2
  c.name = "export-test";
  return c;
}

// A tiny model trained a few steps (so weights are not just the initialisation).
MixtralForCausalLM trained_model(const ModelConfig& c) {
  MixtralForCausalLM m(c);
  init_weights(*m, 0.1, 3);
  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (auto& p : m->named_parameters()) named.emplace_back(p.key(), p.value());
  train::AdamW opt(named, train::AdamWOptions{});
  torch::manual_seed(1);
  for (int s = 0; s < 3; ++s) {
    auto ids = torch::randint(0, c.vocab_size, {2, 9}, torch::kLong);
    data::LmBatch b{ids.narrow(1, 0, 8).contiguous(), ids.narrow(1, 1, 8).contiguous()};
    opt.zero_grad();
    train::lm_loss(m, b, torch::kCPU).total.backward();
    opt.step(1e-2);
  }
  m->eval();
  return m;
}

std::vector<std::pair<std::string, torch::Tensor>> params_of(MixtralForCausalLM& m) {
  std::vector<std::pair<std::string, torch::Tensor>> w;
  for (auto& p : m->named_parameters()) w.emplace_back(p.key(), p.value().detach());
  return w;
}

torch::Tensor logits_of(MixtralForCausalLM& m, const torch::Tensor& ids) {
  torch::NoGradGuard ng;
  return m->forward(ids).logits;
}

// The names and shapes transformers' MixtralForCausalLM has for a config, enumerated by hand.
std::map<std::string, std::vector<int64_t>> expected_hf_tensors(const ModelConfig& c) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, D = c.resolved_head_dim();
  std::map<std::string, std::vector<int64_t>> m;
  m["model.embed_tokens.weight"] = {c.vocab_size, H};
  m["model.norm.weight"] = {H};
  if (!c.tie_word_embeddings) m["lm_head.weight"] = {c.vocab_size, H};
  for (int64_t l = 0; l < c.num_layers; ++l) {
    std::string p = "model.layers." + std::to_string(l) + ".";
    m[p + "self_attn.q_proj.weight"] = {c.num_attention_heads * D, H};
    m[p + "self_attn.k_proj.weight"] = {c.num_key_value_heads * D, H};
    m[p + "self_attn.v_proj.weight"] = {c.num_key_value_heads * D, H};
    m[p + "self_attn.o_proj.weight"] = {H, c.num_attention_heads * D};
    m[p + "input_layernorm.weight"] = {H};
    m[p + "post_attention_layernorm.weight"] = {H};
    m[p + "block_sparse_moe.gate.weight"] = {c.moe.num_experts, H};
    for (int64_t e = 0; e < c.moe.num_experts; ++e) {
      std::string x = p + "block_sparse_moe.experts." + std::to_string(e) + ".";
      m[x + "w1.weight"] = {I, H};
      m[x + "w2.weight"] = {H, I};
      m[x + "w3.weight"] = {I, H};
    }
  }
  return m;
}

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// An independent safetensors header parse: 8-byte little-endian length, then JSON.
nlohmann::json header_of(const std::string& path) {
  std::string bytes = read_all(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  return nlohmann::json::parse(bytes.substr(8, n));
}

// The names and shapes a safetensors file's header lists (parsed by hand).
std::map<std::string, std::vector<int64_t>> shapes_in(const std::string& path) {
  std::map<std::string, std::vector<int64_t>> out;
  const auto header = header_of(path);
  for (auto it = header.begin(); it != header.end(); ++it)
    if (it.key() != "__metadata__") out[it.key()] = it.value()["shape"].get<std::vector<int64_t>>();
  return out;
}

// A vocabulary of n normal pieces "p0", "p1", ... for GGUF exports.
io::GgufVocab plain_vocab(int64_t n) {
  io::GgufVocab v;
  for (int64_t i = 0; i < n; ++i) {
    v.pieces.push_back("p" + std::to_string(i));
    v.scores.push_back(0.0f);
    v.types.push_back(1);
  }
  return v;
}

}  // namespace

TEST(ExportHf, RoundTripFp32IsExactAndBf16WithinRounding) {
  test::TempDir dir("exp");
  ModelConfig c = export_config();
  auto m = trained_model(c);
  auto ids = torch::randint(0, c.vocab_size, {2, 7}, torch::kLong);
  auto ref = logits_of(m, ids);

  io::HfExportOptions o;
  o.out_dir = dir / "fp32";
  o.dtype = "fp32";
  io::export_hf(c, params_of(m), o);
  MixtralForCausalLM back(io::HfCheckpoint(dir / "fp32").config());
  io::load_hf_weights(dir / "fp32", back);
  back->eval();
  EXPECT_TRUE(torch::equal(logits_of(back, ids), ref));

  o.out_dir = dir / "bf16";
  o.dtype = "bf16";
  io::export_hf(c, params_of(m), o);
  MixtralForCausalLM b16(c);
  io::load_hf_weights(dir / "bf16", b16);
  b16->eval();
  // Exactly the bf16-rounded weights ...
  MixtralForCausalLM rounded(c);
  {
    torch::NoGradGuard ng;
    auto src = m->named_parameters();
    for (auto& p : rounded->named_parameters()) p.value().copy_(src[p.key()].to(torch::kBFloat16).to(torch::kFloat));
  }
  rounded->eval();
  auto pb = b16->named_parameters();
  for (auto& p : rounded->named_parameters()) EXPECT_TRUE(torch::equal(p.value(), pb[p.key()])) << p.key();
  // ... so the logits are those of the rounded model, and close to the original.
  EXPECT_TRUE(torch::equal(logits_of(b16, ids), logits_of(rounded, ids)));
  EXPECT_LT(test::max_abs_diff(logits_of(b16, ids), ref), 0.05 * ref.abs().max().item<double>());
  EXPECT_EQ(header_of(dir / "bf16/model.safetensors")["model.norm.weight"]["dtype"], "BF16");
}

TEST(ExportHf, DirectoryHasExactlyTheTensorsTransformersExpects) {
  test::TempDir dir("names");
  ModelConfig c = export_config();
  auto m = trained_model(c);
  io::HfExportOptions o;
  o.out_dir = dir / "hf";
  o.dtype = "fp32";
  o.max_shard_bytes = 20000;  // forces several shards
  io::export_hf(c, params_of(m), o);
  // Index parsed by hand; every shard's header parsed by hand.
  auto index = nlohmann::json::parse(read_all(dir / "hf/model.safetensors.index.json"));
  std::map<std::string, std::vector<int64_t>> found;
  std::set<std::string> shards;
  for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) shards.insert(it.value());
  EXPECT_GT(shards.size(), 2u);
  uint64_t total = 0;
  for (const auto& s : shards) {
    EXPECT_NE(s.find("-of-"), std::string::npos);
    auto h = header_of(dir / ("hf/" + s));
    EXPECT_EQ(h["__metadata__"]["format"], "pt");
    for (auto it = h.begin(); it != h.end(); ++it) {
      if (it.key() == "__metadata__") continue;
      EXPECT_EQ(index["weight_map"][it.key()], s) << it.key();
      found[it.key()] = it.value()["shape"].get<std::vector<int64_t>>();
      auto off = it.value()["data_offsets"];
      total += off[1].get<uint64_t>() - off[0].get<uint64_t>();
    }
  }
  EXPECT_EQ(found, expected_hf_tensors(c));
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), total);
  auto cfg = nlohmann::json::parse(read_all(dir / "hf/config.json"));
  EXPECT_EQ(cfg["architectures"][0], "MixtralForCausalLM");
  EXPECT_EQ(cfg["model_type"], "mixtral");
  EXPECT_EQ(cfg["num_local_experts"], c.moe.num_experts);
  EXPECT_EQ(cfg["num_experts_per_tok"], c.moe.num_experts_per_tok);
  EXPECT_EQ(cfg["num_hidden_layers"], c.num_layers);
  EXPECT_EQ(cfg["head_dim"], c.resolved_head_dim());
  EXPECT_TRUE(cfg["sliding_window"].is_null());
  EXPECT_TRUE(fs::exists(dir / "hf/generation_config.json"));
  // Exporting over an existing directory is refused.
  EXPECT_THROW(io::export_hf(c, params_of(m), o), UserError);
}

TEST(ExportHf, ChatTemplateAndTokenizerFiles) {
  test::TempDir dir("chat");
  test::make_prepared(dir, 40);
  ModelConfig c = export_config();
  c.vocab_size = 320;
  MixtralForCausalLM m(c);
  init_weights(*m, 0.02, 1);
  io::HfExportOptions o;
  o.out_dir = dir / "hf";
  o.tokenizer_path = dir / "tok/tokenizer.model";
  io::export_hf(c, params_of(m), o);
  EXPECT_EQ(read_all(dir / "hf/tokenizer.model"), read_all(dir / "tok/tokenizer.model"));
  auto tc = nlohmann::json::parse(read_all(dir / "hf/tokenizer_config.json"));
  EXPECT_EQ(tc["bos_token"], "<s>");
  EXPECT_NE(tc["chat_template"].get<std::string>().find("[INST]"), std::string::npos);
}

TEST(ImportHf, FusedLayoutGivesTheSameModel) {
  test::TempDir dir("fused");
  ModelConfig c = export_config();
  auto m = trained_model(c);
  io::HfExportOptions o;
  o.out_dir = dir / "perexpert";
  o.dtype = "fp32";
  io::export_hf(c, params_of(m), o);
  // transformers v5 layout, written here: mlp.experts.gate_up_proj [E, 2I, H] (w1 rows first), down_proj [E, H, I].
  auto p = m->named_parameters();
  std::vector<std::pair<std::string, torch::Tensor>> fused;
  for (auto& kv : params_of(m)) {
    const std::string& n = kv.first;
    if (n.find(".block_sparse_moe.experts.") != std::string::npos) continue;
    std::string f = n;
    auto pos = f.find(".block_sparse_moe.");
    if (pos != std::string::npos) f.replace(pos, 18, ".mlp.");
    fused.emplace_back(f, kv.second);
  }
  for (int64_t l = 0; l < c.num_layers; ++l) {
    std::string pre = "model.layers." + std::to_string(l) + ".";
    std::vector<torch::Tensor> gu, down;
    for (int64_t e = 0; e < c.moe.num_experts; ++e) {
      std::string x = pre + "block_sparse_moe.experts." + std::to_string(e) + ".";
      gu.push_back(torch::cat({p[x + "w1.weight"], p[x + "w3.weight"]}, 0));
      down.push_back(p[x + "w2.weight"]);
    }
    fused.emplace_back(pre + "mlp.experts.gate_up_proj", torch::stack(gu).detach().to(torch::kBFloat16));
    fused.emplace_back(pre + "mlp.experts.down_proj", torch::stack(down).detach().to(torch::kBFloat16));
  }
  fs::create_directories(dir / "fused");
  fs::copy_file(dir / "perexpert/config.json", dir / "fused/config.json");
  io::write_safetensors(dir / "fused/model.safetensors", fused, {{"format", "pt"}});
  io::HfCheckpoint fck(dir / "fused");
  EXPECT_EQ(fck.layout(), "fused");
  MixtralForCausalLM a(c), b(c);
  io::load_hf_weights(dir / "fused", a);
  // The same weights through the per-expert layout (rounded to bf16 like the fused file).
  {
    torch::NoGradGuard ng;
    for (auto& q : b->named_parameters()) {
      bool expert = q.key().find(".experts.") != std::string::npos;
      auto src = p[q.key()].detach();
      q.value().copy_(expert ? src.to(torch::kBFloat16).to(torch::kFloat) : src);
    }
  }
  auto pa = a->named_parameters();
  for (auto& q : b->named_parameters()) EXPECT_TRUE(torch::equal(q.value(), pa[q.key()])) << q.key();
  // A stray tensor is reported.
  fused.emplace_back("model.layers.0.mlp.shared_expert.weight", torch::zeros({2, 2}));
  io::write_safetensors(dir / "fused/model.safetensors", fused, {{"format", "pt"}});
  MixtralForCausalLM d(c);
  EXPECT_THROW(io::load_hf_weights(dir / "fused", d), UserError);
}

TEST(ImportHf, BadConfigsAreUserErrors) {
  test::TempDir dir("badcfg");
  fs::create_directories(dir / "m");
  std::ofstream(dir / "m/config.json") << R"({"model_type": "llama", "vocab_size": 10})";
  EXPECT_THROW(io::HfCheckpoint(dir / "m"), UserError);
  std::ofstream(dir / "m/config.json") << R"({"model_type": "mixtral", "vocab_size": "ten"})";
  EXPECT_THROW(io::HfCheckpoint(dir / "m"), UserError);
  std::ofstream(dir / "m/config.json") << "{not json";
  EXPECT_THROW(io::HfCheckpoint(dir / "m"), UserError);
  EXPECT_THROW(io::HfCheckpoint(dir / "nothing"), UserError);
  EXPECT_EQ(io::parse_size("5GB", "x"), 5000000000ull);
  EXPECT_EQ(io::parse_size("2MiB", "x"), 2097152ull);
  EXPECT_THROW(io::parse_size("5XB", "x"), UserError);
}

TEST(ExportGguf, FileParsesBackWithEveryTensorAndThePermutation) {
  test::TempDir dir("gguf");
  ModelConfig c = export_config();
  auto m = trained_model(c);
  io::GgufVocab v;
  for (int i = 0; i < c.vocab_size; ++i) {
    v.pieces.push_back(i == 0 ? "<unk>" : i == 1 ? "<s>" : i == 2 ? "</s>" : "p" + std::to_string(i));
    v.scores.push_back(-static_cast<float>(i));
    v.types.push_back(i == 0 ? 2 : i < 3 ? 3 : 1);
  }
  auto params = params_of(m);
  std::map<std::string, torch::Tensor> wm(params.begin(), params.end());
  io::export_gguf(c, wm, v, dir / "m.gguf", "f32");
  auto g = io::GgufFile::open(dir / "m.gguf");
  EXPECT_EQ(g.version(), 3u);
  EXPECT_EQ(g.alignment(), 32u);
  EXPECT_EQ(g.data_offset() % 32, 0u);
  EXPECT_EQ(g.kv().at("general.architecture").s, "llama");
  EXPECT_EQ(g.kv().at("llama.expert_count").u, 4u);
  EXPECT_EQ(g.kv().at("llama.expert_used_count").u, 2u);
  EXPECT_EQ(g.kv().at("llama.block_count").u, 2u);
  EXPECT_EQ(g.kv().at("llama.attention.head_count_kv").u, 2u);
  EXPECT_EQ(g.kv().at("tokenizer.ggml.tokens").array.size(), 64u);
  EXPECT_EQ(g.kv().at("tokenizer.ggml.tokens").array[1].s, "<s>");
  EXPECT_EQ(g.kv().at("tokenizer.ggml.token_type").array[0].i, 2);
  EXPECT_EQ(g.tensors().size(), 1 + 2 * 10 + 2u);  // embd, 10 per layer, norm, output
  for (const auto& t : g.tensors()) EXPECT_EQ(t.offset % 32, 0u) << t.name;
  // ggml order: token_embd [V, H] row-major is ne = [H, V].
  EXPECT_EQ(g.tensor("token_embd.weight").ne, (std::vector<uint64_t>{32, 64}));
  EXPECT_TRUE(torch::equal(g.get("token_embd.weight"), wm["model.embed_tokens.weight"]));
  EXPECT_TRUE(torch::equal(g.get("output.weight"), wm["lm_head.weight"]));
  const int64_t D = c.resolved_head_dim();
  for (int64_t l = 0; l < c.num_layers; ++l) {
    std::string hf = "model.layers." + std::to_string(l) + ".", gg = "blk." + std::to_string(l) + ".";
    // q/k: row (h, half b, i) of HF sits at row (h, i, b) in GGUF.
    for (auto [name, heads] : {std::pair<std::string, int64_t>{"q", c.num_attention_heads}, {"k", c.num_key_value_heads}}) {
      auto orig = wm[hf + "self_attn." + name + "_proj.weight"];
      auto perm = g.get(gg + "attn_" + name + ".weight");
      ASSERT_EQ(perm.sizes(), orig.sizes());
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < D / 2; ++i)
          for (int64_t b = 0; b < 2; ++b)
            EXPECT_TRUE(torch::equal(perm[h * D + 2 * i + b], orig[h * D + b * (D / 2) + i]));
    }
    EXPECT_TRUE(torch::equal(g.get(gg + "attn_v.weight"), wm[hf + "self_attn.v_proj.weight"]));
    EXPECT_TRUE(torch::equal(g.get(gg + "attn_output.weight"), wm[hf + "self_attn.o_proj.weight"]));
    EXPECT_TRUE(torch::equal(g.get(gg + "ffn_gate_inp.weight"), wm[hf + "block_sparse_moe.gate.weight"]));
    EXPECT_TRUE(torch::equal(g.get(gg + "attn_norm.weight"), wm[hf + "input_layernorm.weight"]));
    auto gate = g.get(gg + "ffn_gate_exps.weight"), up = g.get(gg + "ffn_up_exps.weight"),
         down = g.get(gg + "ffn_down_exps.weight");
    EXPECT_EQ(g.tensor(gg + "ffn_gate_exps.weight").ne, (std::vector<uint64_t>{32, 48, 4}));  // [H, I, E]
    for (int64_t e = 0; e < c.moe.num_experts; ++e) {
      std::string x = hf + "block_sparse_moe.experts." + std::to_string(e) + ".";
      EXPECT_TRUE(torch::equal(gate[e], wm[x + "w1.weight"]));
      EXPECT_TRUE(torch::equal(up[e], wm[x + "w3.weight"]));
      EXPECT_TRUE(torch::equal(down[e], wm[x + "w2.weight"]));
    }
  }
  // f16: the same tensors at half precision.
  io::export_gguf(c, wm, v, dir / "h.gguf", "f16");
  auto h = io::GgufFile::open(dir / "h.gguf");
  EXPECT_TRUE(torch::equal(h.get("token_embd.weight"), wm["model.embed_tokens.weight"].to(torch::kHalf).to(torch::kFloat)));
  EXPECT_EQ(h.tensor("blk.0.attn_norm.weight").type, io::GgmlType::F32);  // norms stay f32
  // Streamed: the tensors handed over in reverse order, each expert on its own (as an export by expert shares
  // does), give the same file byte for byte.
  io::export_gguf(
      c,
      [&](const std::function<void(const std::string&, const at::Tensor&)>& put) {
        for (auto it = params.rbegin(); it != params.rend(); ++it) put(it->first, it->second);
      },
      v, dir / "r.gguf", "f16");
  EXPECT_EQ(read_all(dir / "r.gguf"), read_all(dir / "h.gguf"));
  // A tensor never handed over: a UserError naming it, and no file.
  EXPECT_NE(test::user_error_of([&] {
              io::export_gguf(
                  c,
                  [&](const std::function<void(const std::string&, const at::Tensor&)>& put) {
                    for (const auto& [n, t] : params)
                      if (n != "model.layers.1.block_sparse_moe.experts.2.w3.weight") put(n, t);
                  },
                  v, dir / "x.gguf", "f16");
            }).find("'blk.1.ffn_up_exps.weight' was not written in full (row 2)"),
            std::string::npos);
  EXPECT_FALSE(fs::exists(dir / "x.gguf"));
  for (const auto& e : fs::directory_iterator(dir.path))
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
}

// The sink writes rows of declared tensors in any order into the file write() makes from whole tensors.
TEST(ExportGguf, SinkRowsInAnyOrderGiveTheWholeWrittenFile) {
  test::TempDir dir("ggufsink");
  auto a = torch::randn({5, 3}), b = torch::randn({4});
  io::GgufWriter whole, pieces;
  for (auto* w : {&whole, &pieces}) w->add_string("general.architecture", "llama");
  whole.add_tensor("a", a, io::GgmlType::F16);
  whole.add_tensor("b", b, io::GgmlType::F32);
  whole.write(dir / "whole.gguf");
  pieces.declare_tensor("a", {5, 3}, io::GgmlType::F16);
  pieces.declare_tensor("b", {4}, io::GgmlType::F32);
  {
    auto sink = pieces.start(dir / "pieces.gguf");
    sink.put("a", 3, a.narrow(0, 3, 2));
    sink.put("b", 0, b);
    sink.put("a", 0, a.narrow(0, 0, 3));
    sink.close();
  }
  EXPECT_EQ(read_all(dir / "pieces.gguf"), read_all(dir / "whole.gguf"));
  auto g = io::GgufFile::open(dir / "pieces.gguf");
  EXPECT_TRUE(torch::equal(g.get("a"), a.to(torch::kHalf).to(torch::kFloat)));
  EXPECT_TRUE(torch::equal(g.get("b"), b));
  // Rows missing: close names the tensor and the first missing row, and removes the file.
  {
    auto sink = pieces.start(dir / "partial.gguf");
    sink.put("a", 0, a.narrow(0, 0, 4));
    sink.put("b", 0, b);
    EXPECT_NE(test::user_error_of([&] { sink.close(); }).find("partial.gguf: tensor 'a' was not written in full (row 4)"),
              std::string::npos);
  }
  EXPECT_FALSE(fs::exists(dir / "partial.gguf"));
  // An unclosed sink (an export that failed half-way) leaves no file.
  { auto sink = pieces.start(dir / "dropped.gguf"); }
  EXPECT_FALSE(fs::exists(dir / "dropped.gguf"));
}

// A few hundred random byte mutations and truncations of valid files: every one either opens or
// is a UserError; never a crash or an out-of-bounds read.
// Q8_0 / Q4_0 against the block layout written out by hand: one block of 32 known values, the scale and every
// integer computed here from ggml's formulas (d = amax / 127, q = round(x / d); d = max / -8,
// q = min(15, trunc(x / d + 8.5)), low nibbles first); then rows of random blocks, through a GGUF file, within
// half a step (Q8_0) or a step (Q4_0: the largest magnitude maps to level 0, its opposite is clamped at 15).
// (llama.cpp itself reading these files: tests/interop.)
TEST(ExportGguf, QuantizedBlocksAreGgmlsLayout) {
  std::vector<float> x(32);
  for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(j - 10) * 0.25f;  // -2.5 .. 5.25: max 5.25
  auto t = torch::from_blob(x.data(), {1, 32}, torch::kFloat).clone();
  auto q8 = io::ggml_quantize(io::GgmlType::Q8_0, t);
  ASSERT_EQ(q8.size(), 34u);
  const float d8 = 5.25f / 127;
  uint16_t bits;
  std::memcpy(&bits, q8.data(), 2);
  EXPECT_EQ(bits, c10::Half(d8).x);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(static_cast<int8_t>(q8[2 + j]), static_cast<int8_t>(std::round(x[j] * (1 / d8)))) << j;
  auto q4 = io::ggml_quantize(io::GgmlType::Q4_0, t);
  ASSERT_EQ(q4.size(), 18u);
  const float d4 = 5.25f / -8;
  std::memcpy(&bits, q4.data(), 2);
  EXPECT_EQ(bits, c10::Half(d4).x);
  for (int j = 0; j < 16; ++j) {
    auto level = [&](float v) { return std::min(15, static_cast<int>(static_cast<int8_t>(v * (1 / d4) + 8.5f))); };
    EXPECT_EQ(q4[2 + j] & 0x0F, level(x[j])) << j;
    EXPECT_EQ(q4[2 + j] >> 4, level(x[16 + j])) << j;
  }
  test::TempDir dir("ggufquant");
  torch::manual_seed(3);
  auto w = torch::randn({6, 64}) * 0.05;
  io::GgufWriter g;
  g.add_string("general.architecture", "llama");
  g.add_tensor("q8", w, io::GgmlType::Q8_0);
  g.add_tensor("q4", w, io::GgmlType::Q4_0);
  g.write(dir / "q.gguf");
  auto f = io::GgufFile::open(dir / "q.gguf");
  EXPECT_EQ(f.tensor("q8").bytes, 6u * 2 * 34);
  EXPECT_EQ(f.tensor("q4").bytes, 6u * 2 * 18);
  auto blocks = w.reshape({-1, 32});
  auto amax = std::get<0>(blocks.abs().max(1, true));
  auto err8 = (f.get("q8").reshape({-1, 32}) - blocks).abs(), err4 = (f.get("q4").reshape({-1, 32}) - blocks).abs();
  // Half a step, plus the scale's own fp16 rounding (2^-11 relative) times up to 127 steps (Q8_0) or 8 (Q4_0).
  EXPECT_TRUE((err8 <= amax / 127 * (0.5 + 127.0 / 2048) + 1e-7).all().item<bool>()) << err8.max();
  EXPECT_TRUE((err4 <= amax / 8 * (1 + 8.0 / 2048) + 1e-7).all().item<bool>()) << err4.max();
  EXPECT_THROW(g.add_tensor("odd", torch::ones({2, 40}), io::GgmlType::Q8_0), std::exception);  // not whole blocks
}

TEST(HostileFiles, RandomMutationsOfSafetensorsAndGguf) {
  test::TempDir dir("fuzz");
  ModelConfig c = export_config();
  c.num_layers = 1;
  MixtralForCausalLM m(c);
  init_weights(*m, 0.02, 1);
  auto params = params_of(m);
  io::write_safetensors(dir / "ok.safetensors", params);
  const io::GgufVocab v = plain_vocab(c.vocab_size);
  std::map<std::string, torch::Tensor> wm(params.begin(), params.end());
  io::export_gguf(c, wm, v, dir / "ok.gguf", "f16");
  std::mt19937_64 rng(42);
  int opened = 0, rejected = 0;
  for (std::string base : {"ok.safetensors", "ok.gguf"}) {
    const std::string good = read_all(dir / base);
    // Mutations concentrate on the header, where the parsing happens.
    const size_t header = base == "ok.gguf" ? std::min<size_t>(good.size(), 4096) : std::min<size_t>(good.size(), 8 + 3000);
    for (int k = 0; k < 300; ++k) {
      std::string bad = good;
      int kind = static_cast<int>(rng() % 3);
      if (kind == 0) {
        bad.resize(rng() % good.size());
      } else {
        int flips = 1 + static_cast<int>(rng() % 4);
        for (int f = 0; f < flips; ++f) bad[rng() % header] = static_cast<char>(rng() & 0xff);
      }
      std::string path = dir / ("m_" + std::to_string(k) + "_" + base);
      std::ofstream(path, std::ios::binary) << bad;
      try {
        if (base == "ok.gguf") {
          auto g = io::GgufFile::open(path);
          for (const auto& t : g.tensors()) (void)g.get(t.name).sum().item<double>();
        } else {
          auto s = io::SafetensorsFile::open(path);
          for (const auto& n : s.names()) (void)s.get(n);
        }
        ++opened;
      } catch (const UserError& e) {
        EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
        ++rejected;
      }
      fs::remove(path);
    }
  }
  EXPECT_GT(rejected, 300);
  EXPECT_EQ(opened + rejected, 600);
}

TEST(HostileFiles, GgufStructuralCorruptions) {
  test::TempDir dir("ggufbad");
  io::GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_tensor("a", torch::ones({4, 8}), io::GgmlType::F32);
  w.add_tensor("b", torch::ones({2, 8}), io::GgmlType::F32);
  w.write(dir / "ok.gguf");
  const std::string good = read_all(dir / "ok.gguf");
  auto expect_bad = [&](const std::string& bytes, const std::string& needle) {
    std::ofstream(dir / "bad.gguf", std::ios::binary) << bytes;
    try {
      io::GgufFile::open(dir / "bad.gguf");
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_bad(good.substr(0, good.size() - 10), "beyond the end");
  std::string bad = good;
  bad[0] = 'X';
  expect_bad(bad, "bad magic");
  bad = good;
  uint64_t huge = ~0ull;
  std::memcpy(&bad[16], &huge, 8);  // kv count
  expect_bad(bad, "counts larger");
  // Tensor b's offset moved onto tensor a.
  size_t pos = good.find(std::string("\x01\x00\x00\x00\x00\x00\x00\x00" "b", 9));
  ASSERT_NE(pos, std::string::npos);
  size_t off_pos = pos + 9 + 4 + 2 * 8 + 4;  // name, n_dims, 2 dims, type
  bad = good;
  uint64_t zero = 0;
  std::memcpy(&bad[off_pos], &zero, 8);
  expect_bad(bad, "overlaps");
}

namespace {
bool have_python_torch() { return std::system("/usr/bin/python3 -c 'import torch, numpy' >/dev/null 2>&1") == 0; }

// Exports `m` (fp32, small shards) and has the independent Python forward reproduce its logits.
void expect_python_reference_agrees(const ModelConfig& c, MixtralForCausalLM& m, const std::string& name) {
  test::TempDir dir(name);
  io::HfExportOptions o;
  o.out_dir = dir / "hf";
  o.dtype = "fp32";
  o.max_shard_bytes = 50000;
  io::export_hf(c, params_of(m), o);
  auto ids = torch::randint(0, c.vocab_size, {2, 9}, torch::kLong);
  auto logits = logits_of(m, ids).contiguous();
  {
    std::ofstream out(dir / "blob.bin", std::ios::binary);
    int64_t dims[3] = {2, 9, c.vocab_size};
    out.write(reinterpret_cast<const char*>(dims), sizeof dims);
    out.write(static_cast<const char*>(ids.data_ptr()), ids.numel() * 8);
    out.write(static_cast<const char*>(logits.data_ptr()), logits.numel() * 4);
  }
  std::string cmd = "/usr/bin/python3 " + test::source_path("tests/python/mixtral_reference.py") + " " + (dir / "hf") +
                    " " + (dir / "blob.bin");
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
}
}  // namespace

// transformers is not installable here; instead a small independent Mixtral forward in Python
// (Debian's python3-torch + numpy, no project code) loads the exported directory.
TEST(ExportHf, IndependentPythonReferenceReproducesLogits) {
  if (!have_python_torch()) GTEST_SKIP() << "python3-torch / python3-numpy are not installed (scripts/setup.sh installs them)";
  ModelConfig c = export_config();
  c.sliding_window = 5;
  auto m = trained_model(c);
  expect_python_reference_agrees(c, m, "pyref");
}

namespace {
ModelConfig dense_config() {
  ModelConfig c = export_config();
  c.name = "dense-test";
  c.moe.num_experts = 1;
  c.moe.num_experts_per_tok = 1;
  c.moe.balance = Balance::None;
  return c;
}
}  // namespace

// A dense config (one expert, top-1) is a Mistral: exported as MistralForCausalLM with the MLP under mlp.* and no
// router (names and shapes enumerated by hand), the independent Python forward of a Mistral reproduces its
// logits, and importing the directory gives back every weight but the router, which reads as zeros and changes
// nothing (a single expert's weight is 1 whatever its logit): the same logits.
TEST(ExportHf, DenseConfigIsAMistral) {
  test::TempDir dir("dense");
  const ModelConfig c = dense_config();
  auto m = trained_model(c);
  io::HfExportOptions o;
  o.out_dir = dir / "hf";
  o.dtype = "fp32";
  io::export_hf(c, params_of(m), o);
  std::ifstream cin(dir / "hf/config.json");
  auto j = nlohmann::json::parse(cin);
  EXPECT_EQ(j["architectures"][0], "MistralForCausalLM");
  EXPECT_EQ(j["model_type"], "mistral");
  EXPECT_FALSE(j.contains("num_local_experts"));
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  std::map<std::string, std::vector<int64_t>> want;
  for (const auto& [n, shape] : expected_hf_tensors(c))
    if (n.find("block_sparse_moe") == std::string::npos) want[n] = shape;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".mlp.";
    want[p + "gate_proj.weight"] = {I, H};
    want[p + "up_proj.weight"] = {I, H};
    want[p + "down_proj.weight"] = {H, I};
  }
  EXPECT_EQ(shapes_in(dir / "hf/model.safetensors"), want);
  auto st = io::SafetensorsFile::open(dir / "hf/model.safetensors");
  EXPECT_TRUE(torch::equal(st.get("model.layers.1.mlp.down_proj.weight"),
                           m->named_parameters()["model.layers.1.block_sparse_moe.experts.0.w2.weight"]));

  io::HfCheckpoint hf(dir / "hf");
  EXPECT_EQ(hf.layout(), "dense");
  EXPECT_TRUE(hf.config().dense());
  EXPECT_EQ(hf.config().moe.num_experts_per_tok, 1);
  MixtralForCausalLM back(hf.config());
  io::load_hf_weights(dir / "hf", back);
  auto pm = m->named_parameters();
  for (auto& p : back->named_parameters()) {
    if (p.key().find(".block_sparse_moe.gate.") != std::string::npos) {
      EXPECT_EQ(p.value().abs().max().item<double>(), 0.0) << p.key();
      EXPECT_GT(pm[p.key()].abs().max().item<double>(), 0.0) << p.key();  // the original's was not zero
    } else {
      EXPECT_TRUE(torch::equal(p.value(), pm[p.key()])) << p.key();
    }
  }
  back->eval();
  auto ids = torch::randint(0, c.vocab_size, {2, 7}, torch::kLong);
  EXPECT_TRUE(torch::equal(logits_of(back, ids), logits_of(m, ids)));
  if (have_python_torch()) expect_python_reference_agrees(c, m, "pyref-dense");

  // A Mixtral of one expert (model_type mixtral, num_local_experts 1, the block_sparse_moe names, as exports made
  // before dense configs became Mistrals) still reads in the Mixtral layout, router included.
  auto mj = io::to_hf_config(c, "float32");
  mj["model_type"] = "mixtral";
  mj["architectures"] = {"MixtralForCausalLM"};
  mj["num_local_experts"] = 1;
  mj["num_experts_per_tok"] = 1;
  fs::create_directories(dir / "mixtral1");
  std::ofstream(dir / "mixtral1/config.json") << mj.dump();
  io::write_safetensors(dir / "mixtral1/model.safetensors", params_of(m), {{"format", "pt"}});
  io::HfCheckpoint one(dir / "mixtral1");
  EXPECT_EQ(one.layout(), "per-expert");
  MixtralForCausalLM back1(one.config());
  io::load_hf_weights(dir / "mixtral1", back1);
  for (auto& p : back1->named_parameters()) EXPECT_TRUE(torch::equal(p.value(), pm[p.key()])) << p.key();
}

// GGUF of a dense config: llama.cpp's plain llama (no expert keys), the MLP as ffn_gate / ffn_down / ffn_up.
TEST(ExportGguf, DenseConfigIsAPlainLlama) {
  test::TempDir dir("gguf-dense");
  const ModelConfig c = dense_config();
  auto m = trained_model(c);
  const io::GgufVocab v = plain_vocab(c.vocab_size);
  auto params = params_of(m);
  std::map<std::string, torch::Tensor> wm(params.begin(), params.end());
  io::export_gguf(c, wm, v, dir / "m.gguf", "f32");
  auto g = io::GgufFile::open(dir / "m.gguf");
  EXPECT_FALSE(g.kv().count("llama.expert_count"));
  EXPECT_FALSE(g.kv().count("llama.expert_used_count"));
  EXPECT_EQ(g.tensors().size(), 1 + 2 * 9 + 2u);  // embd, 9 per layer, norm, output
  std::set<std::string> names;
  for (const auto& t : g.tensors()) names.insert(t.name);
  for (const char* n : {"blk.0.ffn_gate.weight", "blk.0.ffn_down.weight", "blk.1.ffn_up.weight"}) EXPECT_TRUE(names.count(n)) << n;
  EXPECT_FALSE(names.count("blk.0.ffn_gate_inp.weight"));
  EXPECT_FALSE(names.count("blk.0.ffn_gate_exps.weight"));
  EXPECT_TRUE(torch::equal(g.get("blk.1.ffn_down.weight"), wm.at("model.layers.1.block_sparse_moe.experts.0.w2.weight")));
}

// Dense Hugging Face configs: Mistral and Llama read as one expert with transformers' defaults (rope_theta 1e4),
// biases and other model types refused with the key named.
TEST(ImportHf, DenseConfigsAndTheirRefusals) {
  nlohmann::json j = {{"model_type", "llama"}, {"vocab_size", 64}, {"hidden_size", 32}, {"intermediate_size", 48},
                      {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"num_key_value_heads", 2}};
  ModelConfig c = io::from_hf_config(j, "config.json");
  EXPECT_TRUE(c.dense());
  EXPECT_EQ(c.moe.num_experts_per_tok, 1);
  EXPECT_EQ(c.rope_theta, 1e4);
  EXPECT_FALSE(c.sliding_window.has_value());
  j["model_type"] = "mistral";
  j["sliding_window"] = 16;
  EXPECT_EQ(io::from_hf_config(j, "config.json").sliding_window.value(), 16);
  j["mlp_bias"] = true;
  EXPECT_THROW(io::from_hf_config(j, "config.json"), UserError);
  j.erase("mlp_bias");
  j["model_type"] = "qwen2_moe";
  try {
    io::from_hf_config(j, "config.json");
    ADD_FAILURE() << "qwen2_moe accepted";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("model_type"), std::string::npos) << e.what();
  }
}

// Shared experts export as Qwen2MoeForCausalLM: names and shapes enumerated by hand (the router and experts under
// mlp.*, gate_proj / up_proj / down_proj, one shared expert of S x I with its [1, H] gate, zero q/k/v biases), the
// config's keys, and the independent Python forward of a Qwen2-MoE reproduces the logits. What it cannot hold is
// refused before anything is written: an ungated shared expert, a sliding window; GGUF refuses shared experts.
TEST(ExportHf, SharedExpertsAreAQwen2Moe) {
  test::TempDir dir("qwen");
  ModelConfig c = export_config();
  c.moe.num_shared_experts = 2;
  auto m = trained_model(c);
  EXPECT_GT(m->named_parameters()["model.layers.0.block_sparse_moe.shared_expert_gate.weight"].abs().max().item<double>(), 0);
  io::HfExportOptions o;
  o.out_dir = dir / "hf";
  o.dtype = "fp32";
  io::export_hf(c, params_of(m), o);
  auto j = nlohmann::json::parse(std::ifstream(dir / "hf/config.json"));
  const int64_t H = c.hidden_size, I = c.intermediate_size, D = c.resolved_head_dim();
  EXPECT_EQ(j["architectures"][0], "Qwen2MoeForCausalLM");
  EXPECT_EQ(j["model_type"], "qwen2_moe");
  EXPECT_EQ(j["moe_intermediate_size"], I);
  EXPECT_EQ(j["shared_expert_intermediate_size"], 2 * I);
  EXPECT_EQ(j["num_experts"], c.moe.num_experts);
  EXPECT_EQ(j["num_experts_per_tok"], c.moe.num_experts_per_tok);
  EXPECT_EQ(j["norm_topk_prob"], true);
  EXPECT_EQ(j["decoder_sparse_step"], 1);
  std::map<std::string, std::vector<int64_t>> want;
  want["model.embed_tokens.weight"] = {c.vocab_size, H};
  want["model.norm.weight"] = {H};
  want["lm_head.weight"] = {c.vocab_size, H};
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    want[p + "self_attn.q_proj.weight"] = {c.num_attention_heads * D, H};
    want[p + "self_attn.q_proj.bias"] = {c.num_attention_heads * D};
    want[p + "self_attn.k_proj.weight"] = {c.num_key_value_heads * D, H};
    want[p + "self_attn.k_proj.bias"] = {c.num_key_value_heads * D};
    want[p + "self_attn.v_proj.weight"] = {c.num_key_value_heads * D, H};
    want[p + "self_attn.v_proj.bias"] = {c.num_key_value_heads * D};
    want[p + "self_attn.o_proj.weight"] = {H, c.num_attention_heads * D};
    want[p + "input_layernorm.weight"] = {H};
    want[p + "post_attention_layernorm.weight"] = {H};
    want[p + "mlp.gate.weight"] = {c.moe.num_experts, H};
    for (int64_t e = 0; e < c.moe.num_experts; ++e) {
      const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
      want[x + "gate_proj.weight"] = {I, H};
      want[x + "up_proj.weight"] = {I, H};
      want[x + "down_proj.weight"] = {H, I};
    }
    want[p + "mlp.shared_expert.gate_proj.weight"] = {2 * I, H};
    want[p + "mlp.shared_expert.up_proj.weight"] = {2 * I, H};
    want[p + "mlp.shared_expert.down_proj.weight"] = {H, 2 * I};
    want[p + "mlp.shared_expert_gate.weight"] = {1, H};
  }
  EXPECT_EQ(shapes_in(dir / "hf/model.safetensors"), want);
  auto st = io::SafetensorsFile::open(dir / "hf/model.safetensors");
  auto pm = m->named_parameters();
  EXPECT_TRUE(torch::equal(st.get("model.layers.1.mlp.experts.3.up_proj.weight"),
                           pm["model.layers.1.block_sparse_moe.experts.3.w3.weight"]));
  EXPECT_TRUE(torch::equal(st.get("model.layers.0.mlp.shared_expert.down_proj.weight"),
                           pm["model.layers.0.block_sparse_moe.shared_expert.w2.weight"]));
  EXPECT_EQ(st.get("model.layers.0.self_attn.k_proj.bias").abs().max().item<double>(), 0.0);
  if (have_python_torch()) expect_python_reference_agrees(c, m, "pyref-qwen");

  auto refused = [&](ModelConfig bad, const std::string& what) {
    EXPECT_THROW(io::hf_architecture(bad), UserError) << what;
    o.out_dir = dir / ("no-" + what);
    MixtralForCausalLM mb(bad);
    try {
      io::export_hf(bad, params_of(mb), o);
      ADD_FAILURE() << what << " exported";
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find("Qwen2MoeForCausalLM"), std::string::npos) << e.what();
    }
    EXPECT_FALSE(fs::exists(o.out_dir)) << what;
  };
  ModelConfig ungated = c;
  ungated.moe.shared_expert_gate = false;
  refused(ungated, "ungated");
  ModelConfig windowed = c;
  windowed.sliding_window = 4;
  refused(windowed, "window");
  const io::GgufVocab v = plain_vocab(c.vocab_size);
  auto params = params_of(m);
  std::map<std::string, torch::Tensor> wm(params.begin(), params.end());
  EXPECT_THROW(io::export_gguf(c, wm, v, dir / "m.gguf", "f32"), UserError);
  EXPECT_FALSE(fs::exists(dir / "m.gguf"));
}
