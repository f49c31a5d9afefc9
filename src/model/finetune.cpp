#include "model/finetune.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <functional>

#include "core/error.h"

namespace moeforge {

namespace {

// One base linear layer of a decoder layer: its HF name, target name, weight, quantised slot and adapter.
struct BaseLinear {
  std::string name, target;
  torch::Tensor weight;
  std::shared_ptr<const QuantizedWeight>* quant;
  LoraAdapter lora;
};

std::vector<BaseLinear> base_linears(DecoderLayerImpl& l, const std::string& prefix) {
  std::vector<BaseLinear> out;
  auto& a = *l.self_attn;
  std::pair<const char*, std::pair<torch::nn::Linear*, LinearExtras*>> attn[] = {
      {"q_proj", {&a.q_proj, &a.q_extras}}, {"k_proj", {&a.k_proj, &a.k_extras}},
      {"v_proj", {&a.v_proj, &a.v_extras}}, {"o_proj", {&a.o_proj, &a.o_extras}}};
  for (auto& [t, p] : attn)
    out.push_back({prefix + "self_attn." + t + ".weight", t, (*p.first)->weight, &p.second->quant, p.second->lora});
  auto& bank = *l.block_sparse_moe->experts;
  const char* proj[3] = {"w1", "w2", "w3"};
  for (int64_t i = 0; i < bank.count(); ++i) {
    auto& ex = *bank.expert(bank.first() + i);
    torch::nn::Linear* lin[3] = {&ex.w1, &ex.w2, &ex.w3};
    for (size_t j = 0; j < 3; ++j) {
      LoraAdapter ad;
      if (bank.lora_A[j].defined()) ad = {bank.lora_A[j].select(0, i), bank.lora_B[j].select(0, i), bank.lora_scale};
      out.push_back({prefix + "block_sparse_moe.experts." + std::to_string(bank.first() + i) + "." + proj[j] + ".weight",
                     proj[j], (*lin[j])->weight, &ex.quant[j], ad});
    }
  }
  auto& g = *l.block_sparse_moe->gate;
  out.push_back({prefix + "block_sparse_moe.gate.weight", "gate", g.weight, nullptr, g.extras.lora});
  return out;
}

std::string layer_prefix(size_t i) { return "model.layers." + std::to_string(i) + "."; }

uint64_t mix64(uint64_t h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
  return h * 0xff51afd7ed558ccdULL;
}

uint64_t name_hash(const std::string& s) {
  uint64_t h = 1469598103934665603ULL;
  for (char c : s) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ULL;
  return h;
}

// U(-1/sqrt(in), 1/sqrt(in)) for an adapter's A, from its own seeded stream.
torch::Tensor init_A(int64_t r, int64_t in, uint64_t seed, const std::string& name) {
  auto gen = at::detail::createCPUGenerator(mix64(seed, name_hash(name)));
  const double b = 1.0 / std::sqrt(static_cast<double>(in));
  return torch::empty({r, in}, torch::kFloat).uniform_(-b, b, gen);
}

// A trainable adapter registered as `host`.lora_A.weight / lora_B.weight (PEFT's names).
LoraAdapter dense_adapter(torch::nn::Module& host, const std::string& name_prefix, int64_t in, int64_t out, int64_t r,
                          double scale, uint64_t seed, const torch::Device& d) {
  LoraAdapter a;
  a.A = init_A(r, in, seed, name_prefix + "lora_A.weight").to(d).set_requires_grad(true);
  a.B = torch::zeros({out, r}, torch::TensorOptions().device(d)).set_requires_grad(true);
  a.scale = scale;
  auto ha = std::make_shared<torch::nn::Module>(), hb = std::make_shared<torch::nn::Module>();
  a.A = ha->register_parameter("weight", a.A);
  a.B = hb->register_parameter("weight", a.B);
  host.register_module("lora_A", ha);
  host.register_module("lora_B", hb);
  return a;
}

}  // namespace

void freeze_base(MixtralForCausalLM& m) {
  for (auto& p : m->parameters()) p.requires_grad_(false);
}

void attach_lora(MixtralForCausalLM& m, const LoraSpec& s, uint64_t seed) {
  MF_CHECK(!m->lora_rt, "adapters are attached once");
  torch::NoGradGuard ng;
  auto rt = std::make_shared<LoraRuntime>();
  rt->dropout = s.dropout;
  rt->gen = at::detail::createCPUGenerator(mix64(seed, name_hash("lora.dropout")));
  m->lora_rt = rt;
  const auto& cfg = m->config();
  if (s.targets_module("lm_head")) {
    if (cfg.tie_word_embeddings)
      throw UserError("finetune.lora.targets: lm_head is tied to the embedding in this model; leave it out");
    m->lm_head_extras.lora = dense_adapter(*m->lm_head, "lm_head.", cfg.hidden_size, cfg.vocab_size, s.rank_of("lm_head"),
                                           s.scale_of("lm_head"), seed, m->lm_head->weight.device());
  }
  for (size_t li = 0; li < m->model->layers.size(); ++li) {
    auto& l = *m->model->layers[li];
    const std::string pre = layer_prefix(li);
    auto& a = *l.self_attn;
    a.lora_rt = rt;
    struct AttnTarget {
      const char* name;
      torch::nn::Linear* lin;
      LinearExtras* ex;
    } attn[] = {{"q_proj", &a.q_proj, &a.q_extras},
                {"k_proj", &a.k_proj, &a.k_extras},
                {"v_proj", &a.v_proj, &a.v_extras},
                {"o_proj", &a.o_proj, &a.o_extras}};
    for (auto& t : attn) {
      if (!s.targets_module(t.name)) continue;
      auto& w = (*t.lin)->weight;
      // A quantised weight's float storage is empty: the shape comes from the quantised copy.
      const int64_t out = t.ex->quant ? t.ex->quant->shape[0] : w.size(0);
      const int64_t in = t.ex->quant ? t.ex->quant->shape[1] : w.size(1);
      t.ex->lora = dense_adapter(**t.lin, pre + "self_attn." + t.name + ".", in, out, s.rank_of(t.name),
                                 s.scale_of(t.name), seed, w.device());
    }
    auto& g = *l.block_sparse_moe->gate;
    g.lora_rt = rt;
    if (s.targets_module("gate"))
      g.extras.lora = dense_adapter(g, pre + "block_sparse_moe.gate.", g.weight.size(1), g.weight.size(0),
                                    s.rank_of("gate"), s.scale_of("gate"), seed, g.weight.device());
    auto& bank = *l.block_sparse_moe->experts;
    std::array<at::Tensor, 3> A, B;
    const char* proj[3] = {"w1", "w2", "w3"};
    const int64_t H = cfg.hidden_size, I = cfg.intermediate_size;
    const int64_t ins[3] = {H, I, H}, outs[3] = {I, H, I};
    bool any = false;
    for (size_t j = 0; j < 3; ++j) {
      if (!s.targets_module(proj[j])) continue;
      any = true;
      const int64_t r = s.rank_of(proj[j]);
      std::vector<torch::Tensor> rows;
      for (int64_t i = 0; i < bank.count(); ++i)
        rows.push_back(init_A(r, ins[j], seed,
                              pre + "block_sparse_moe.experts." + std::to_string(bank.first() + i) + "." + proj[j] +
                                  ".lora_A.weight"));
      auto dev = bank.expert(bank.first())->w1->weight.device();
      A[j] = torch::stack(rows).to(dev).set_requires_grad(true);
      B[j] = torch::zeros({bank.count(), outs[j], r}, torch::TensorOptions().device(dev)).set_requires_grad(true);
    }
    if (any) bank.set_lora(A, B, s.scale_of("w1"), rt);
    else bank.lora_rt = rt;
  }
}

void quantize_layer(DecoderLayerImpl& layer, const QuantSpec& q) {
  torch::NoGradGuard ng;
  for (auto& b : base_linears(layer, "")) {
    if (!b.quant || *b.quant || b.weight.numel() == 0) continue;
    *b.quant = std::make_shared<const QuantizedWeight>(quantize(b.weight, q));
    b.weight.set_data(torch::empty({0}, b.weight.options()));  // the float copy goes
  }
}

void store_linear_weights(DecoderLayerImpl& layer, at::ScalarType dtype) {
  torch::NoGradGuard ng;
  for (auto& b : base_linears(layer, ""))
    if (b.quant && b.weight.numel() > 0) b.weight.set_data(b.weight.to(dtype));
}

void quantize_base(MixtralForCausalLM& m, const QuantSpec& q) {
  for (auto& l : m->model->layers) quantize_layer(*l, q);
}

int64_t quantized_bytes(MixtralForCausalLM& m) {
  int64_t n = 0;
  for (auto& l : m->model->layers)
    for (auto& b : base_linears(*l, ""))
      if (b.quant && *b.quant) n += (*b.quant)->bytes();
  return n;
}

void move_to(MixtralForCausalLM& m, const at::Device& d) {
  m->to(d);
  for (auto& l : m->model->layers)
    for (auto& b : base_linears(*l, ""))
      if (b.quant && *b.quant && (*b.quant)->device() != d)
        *b.quant = std::make_shared<const QuantizedWeight>((*b.quant)->to(d));
}

AdaptersOffGuard::AdaptersOffGuard(MixtralForCausalLM& m) : m_(m) {
  if (m_->lora_rt) {
    was_ = m_->lora_rt->enabled;
    m_->lora_rt->enabled = false;
  }
}

AdaptersOffGuard::~AdaptersOffGuard() {
  if (m_->lora_rt) m_->lora_rt->enabled = was_;
}

bool has_adapters(const MixtralForCausalLM& m) { return m->lora_rt != nullptr; }

std::string StackedAdapter::row_name(int64_t i) const {
  return layer + "block_sparse_moe.experts." + std::to_string(first + i) + "." + proj + ".lora_" + ab + ".weight";
}

std::vector<StackedAdapter> stacked_adapters(MixtralForCausalLM& m) {
  std::vector<StackedAdapter> out;
  const char* proj[3] = {"w1", "w2", "w3"};
  for (size_t li = 0; li < m->model->layers.size(); ++li) {
    auto& bank = *m->model->layers[li]->block_sparse_moe->experts;
    for (size_t j = 0; j < 3; ++j) {
      if (!bank.lora_A[j].defined()) continue;
      for (const char* ab : {"A", "B"})
        out.push_back({layer_prefix(li) + "block_sparse_moe.experts." + proj[j] + "_lora_" + ab, layer_prefix(li),
                       proj[j], ab, bank.first(), bank.count()});
    }
  }
  return out;
}

NamedTensors adapter_tensors(MixtralForCausalLM& m) {
  NamedTensors out;
  if (m->lm_head_extras.lora.defined()) {
    out.emplace_back("lm_head.lora_A.weight", m->lm_head_extras.lora.A);
    out.emplace_back("lm_head.lora_B.weight", m->lm_head_extras.lora.B);
  }
  for (size_t li = 0; li < m->model->layers.size(); ++li) {
    for (auto& b : base_linears(*m->model->layers[li], layer_prefix(li))) {
      if (!b.lora.defined()) continue;
      const std::string stem = b.name.substr(0, b.name.size() - std::strlen("weight"));
      out.emplace_back(stem + "lora_A.weight", b.lora.A);
      out.emplace_back(stem + "lora_B.weight", b.lora.B);
    }
  }
  return out;
}

NamedTensors merged_weights(MixtralForCausalLM& m) {
  torch::NoGradGuard ng;
  std::map<std::string, torch::Tensor> merged;
  for (size_t li = 0; li < m->model->layers.size(); ++li)
    for (auto& b : base_linears(*m->model->layers[li], layer_prefix(li))) {
      const bool q = b.quant && *b.quant;
      if (!q && !b.lora.defined()) continue;
      auto w = q ? dequantize(**b.quant, torch::kFloat) : b.weight.detach().to(torch::kFloat);
      if (b.lora.defined())
        w = w + b.lora.scale * torch::matmul(b.lora.B.detach().to(w.device(), torch::kFloat),
                                             b.lora.A.detach().to(w.device(), torch::kFloat));
      merged[b.name] = w;
    }
  if (const auto& l = m->lm_head_extras.lora; l.defined())
    merged["lm_head.weight"] = m->lm_head->weight.detach().to(torch::kFloat) +
                               l.scale * torch::matmul(l.B.detach().to(torch::kFloat), l.A.detach().to(torch::kFloat));
  NamedTensors out;
  for (auto& p : m->named_parameters()) {
    if (p.key().find("lora_") != std::string::npos) continue;
    auto it = merged.find(p.key());
    out.emplace_back(p.key(), it != merged.end() ? it->second : p.value().detach());
  }
  return out;
}

uint64_t tensor_fingerprint(const std::string& name, const at::Tensor& t) {
  auto c = t.detach().to(torch::kCPU, torch::kFloat).contiguous();
  uint64_t h = name_hash(name);
  h = mix64(h, static_cast<uint64_t>(c.numel()));
  const auto* p = static_cast<const uint8_t*>(c.data_ptr());
  const size_t n = static_cast<size_t>(c.numel()) * sizeof(float);
  size_t i = 0;
  uint64_t acc[4] = {h, h ^ 1, h ^ 2, h ^ 3};  // four lanes: the multiply chains run side by side
  for (; i + 32 <= n; i += 32)
    for (int k = 0; k < 4; ++k) {
      uint64_t w;
      std::memcpy(&w, p + i + 8 * k, 8);
      acc[k] = (acc[k] ^ w) * 0x100000001b3ULL;
      acc[k] ^= acc[k] >> 29;
    }
  for (; i < n; ++i) acc[0] = (acc[0] ^ p[i]) * 1099511628211ULL;
  for (int k = 0; k < 4; ++k) h = mix64(h, acc[k]);
  return h;
}

}  // namespace moeforge
