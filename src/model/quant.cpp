#include "model/quant.h"

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <torch/autograd.h>
#include <torch/torch.h>

#include <mutex>
#include <unordered_map>

#include "core/error.h"

namespace moeforge {

QuantType parse_quant_type(const std::string& s) {
  if (s == "nf4") return QuantType::NF4;
  if (s == "int8") return QuantType::Int8;
  throw UserError("finetune.quant.type must be nf4 or int8, got '" + s + "'");
}

std::string quant_type_name(QuantType t) { return t == QuantType::Int8 ? "int8" : "nf4"; }

const std::array<float, 16>& nf4_levels() {
  // bitsandbytes' table (create_normal_map(0.9677083, use_extra_value=True)), kept as literals so the codes
  // mean the same as theirs bit for bit; the unit test recomputes it from the normal quantile function.
  static const std::array<float, 16> levels = {
      -1.0f,
      -0.6961928009986877f,
      -0.5250730514526367f,
      -0.39491748809814453f,
      -0.28444138169288635f,
      -0.18477343022823334f,
      -0.09105003625154495f,
      0.0f,
      0.07958029955625534f,
      0.16093020141124725f,
      0.24611230194568634f,
      0.33791524171829224f,
      0.44070982933044434f,
      0.5626170039176941f,
      0.7229568362236023f,
      1.0f,
  };
  return levels;
}

namespace {

constexpr int64_t kNf4Zero = 7;  // index of the exact 0 level

at::Tensor nf4_levels_cpu() {
  const auto& l = nf4_levels();
  return at::tensor(at::ArrayRef<float>(l.data(), l.size()), at::kFloat);
}

// [256, 2] fp32: the two levels a packed NF4 byte stands for (high nibble first). One gather of this table
// unpacks and looks up both codes of a byte at once. Cached per device so that each forward does not copy it
// to the accelerator again; leaked on purpose (no destructor racing the CUDA runtime at exit).
at::Tensor nf4_pair_table(const at::Device& device) {
  static std::mutex mu;
  static auto* cache = new std::unordered_map<at::Device, at::Tensor>();
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(device);
  if (it != cache->end()) return it->second;
  const auto& l = nf4_levels();
  std::vector<float> pairs(256 * 2);
  for (int b = 0; b < 256; ++b) {
    pairs[2 * b] = l[b >> 4];
    pairs[2 * b + 1] = l[b & 15];
  }
  at::Tensor t = at::tensor(pairs, at::kFloat).view({256, 2}).to(device);
  cache->emplace(device, t);
  return t;
}

int64_t nbytes_of(const at::Tensor& t) { return t.defined() ? t.numel() * static_cast<int64_t>(t.element_size()) : 0; }

void check_block_size(const QuantSpec& spec) {
  const int64_t bs = spec.block_size;
  if (bs <= 0 || (spec.type == QuantType::NF4 && bs % 2 != 0))
    throw UserError("finetune.quant.block_size must be a positive" +
                    std::string(spec.type == QuantType::NF4 ? " even" : "") + " number for " +
                    quant_type_name(spec.type) + ", got " + std::to_string(bs));
}

// Double quantisation of the fp32 absmax [nblocks]: mean removed, then int8 with one scale per group of 256.
void quantize_absmax(const at::Tensor& absmax_B, QuantizedWeight& q) {
  const int64_t nb = absmax_B.size(0);
  const int64_t ngroups = (nb + kAbsmaxGroup - 1) / kAbsmaxGroup;
  // The mean of no blocks (an empty weight) would be NaN.
  q.absmax_mean = nb > 0 ? absmax_B.mean() : at::zeros({}, absmax_B.options());
  at::Tensor centered_GS =
      at::constant_pad_nd(absmax_B - q.absmax_mean, {0, ngroups * kAbsmaxGroup - nb}).view({ngroups, kAbsmaxGroup});
  q.absmax_scale = centered_GS.abs().amax(1) / 127.0;
  // A group whose absmax all equal the mean has scale 0: its codes are 0 and it dequantises to the mean.
  at::Tensor safe_G = at::where(q.absmax_scale > 0, q.absmax_scale, at::ones_like(q.absmax_scale));
  q.absmax = at::round(centered_GS / safe_G.unsqueeze(1))
                 .clamp(-127, 127)
                 .to(at::kChar)
                 .view({-1})
                 .narrow(0, 0, nb)
                 .clone();  // drops the padding's storage
}

}  // namespace

int64_t QuantizedWeight::num_blocks() const {
  return spec.block_size > 0 ? (numel + spec.block_size - 1) / spec.block_size : 0;
}

int64_t QuantizedWeight::bytes() const {
  return nbytes_of(codes) + nbytes_of(absmax) + nbytes_of(absmax_scale) + nbytes_of(absmax_mean);
}

at::Device QuantizedWeight::device() const { return codes.device(); }

QuantizedWeight QuantizedWeight::to(const at::Device& d) const {
  QuantizedWeight r = *this;
  for (at::Tensor* t : {&r.codes, &r.absmax, &r.absmax_scale, &r.absmax_mean})
    if (t->defined()) *t = t->to(d);
  return r;
}

QuantizedWeight quantize(const at::Tensor& w, const QuantSpec& spec) {
  check_block_size(spec);
  MF_CHECK(w.defined() && at::isFloatingType(w.scalar_type()), "quantize needs a floating-point weight");
  at::NoGradGuard no_grad;
  QuantizedWeight q;
  q.spec = spec;
  q.shape = w.sizes().vec();
  q.numel = w.numel();
  const int64_t bs = spec.block_size;
  const int64_t nb = q.num_blocks();

  at::Tensor flat = w.detach().to(at::kFloat).reshape({-1});
  at::Tensor blocks_BS = at::constant_pad_nd(flat, {0, nb * bs - q.numel}).view({nb, bs});
  at::Tensor absmax_B = blocks_BS.abs().amax(1);
  // An all-zero block has absmax 0: divide by 1 instead, so its elements map to 0 (code of level 0), not NaN.
  at::Tensor safe_B = at::where(absmax_B > 0, absmax_B, at::ones_like(absmax_B));
  at::Tensor unit_BS = blocks_BS / safe_B.unsqueeze(1);  // in [-1, 1]

  if (spec.type == QuantType::NF4) {
    // Nearest level via the 15 midpoints between adjacent levels (no [n, 16] distance matrix). bucketize with
    // right=false puts a value exactly on a midpoint in the lower level: deterministic ties.
    at::Tensor lv = nf4_levels_cpu().to(w.device());
    at::Tensor mids = (lv.narrow(0, 0, 15) + lv.narrow(0, 1, 15)) / 2;
    at::Tensor idx = at::bucketize(unit_BS.reshape({-1}), mids, /*out_int32=*/true, /*right=*/false)
                         .view({nb * bs / 2, 2});
    q.codes = (idx.select(1, 0) * 16 + idx.select(1, 1)).to(at::kByte);  // earlier element in the high nibble
  } else {
    q.codes = at::round(unit_BS * 127.0).clamp(-127, 127).to(at::kChar).reshape({-1});
  }

  if (spec.double_quant)
    quantize_absmax(absmax_B, q);
  else
    q.absmax = absmax_B;
  return q;
}

at::Tensor block_absmax(const QuantizedWeight& q) {
  if (!q.spec.double_quant) return q.absmax.to(at::kFloat);
  const int64_t nb = q.absmax.size(0);
  at::Tensor scale_B = q.absmax_scale.repeat_interleave(kAbsmaxGroup).narrow(0, 0, nb);
  // Clamped at 0: a true absmax is never negative, so the clamp can only bring the value closer to it.
  return (q.absmax.to(at::kFloat) * scale_B + q.absmax_mean).clamp_min(0);
}

at::Tensor dequantize(const QuantizedWeight& q, at::ScalarType dtype) {
  const int64_t nb = q.num_blocks(), bs = q.spec.block_size;
  at::Tensor unit_BS;
  if (q.spec.type == QuantType::NF4)
    unit_BS = nf4_pair_table(q.codes.device()).index_select(0, q.codes.to(at::kInt)).view({nb, bs});
  else
    unit_BS = q.codes.to(at::kFloat).view({nb, bs}) / 127.0;
  at::Tensor w = (unit_BS * block_absmax(q).unsqueeze(1)).view({-1}).narrow(0, 0, q.numel).view(q.shape);
  return w.to(dtype);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct QuantHolder : torch::CustomClassHolder {
  std::shared_ptr<const QuantizedWeight> q;
};

class QuantLinearFunction : public torch::autograd::Function<QuantLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, c10::intrusive_ptr<QuantHolder> h) {
    ctx->set_materialize_grads(false);
    // Only the codes are kept (through the holder); the dequantised weight dies with this scope.
    ctx->saved_data["q"] = c10::IValue::make_capsule(h);
    return at::linear(x, dequantize(*h->q, x.scalar_type()));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_y = grads[0];  // [..., out], x's dtype
    if (!grad_y.defined()) return {at::Tensor(), at::Tensor()};
    auto h = c10::static_intrusive_pointer_cast<QuantHolder>(ctx->saved_data["q"].toCapsule());
    at::Tensor w_OI = dequantize(*h->q, grad_y.scalar_type());
    return {at::matmul(grad_y, w_OI), at::Tensor()};  // nothing for the frozen weight
  }
};

}  // namespace

at::Tensor quantized_linear(const at::Tensor& x, std::shared_ptr<const QuantizedWeight> q) {
  MF_CHECK(q != nullptr, "quantized_linear without a weight");
  MF_CHECK(q->shape.size() == 2, "quantized_linear needs a 2-D [out, in] weight");
  MF_CHECK(x.dim() >= 1 && x.size(-1) == q->shape[1],
           "input's last dimension " + std::to_string(x.dim() >= 1 ? x.size(-1) : -1) + " is not the weight's " +
               std::to_string(q->shape[1]));
  MF_CHECK(at::isFloatingType(x.scalar_type()), "quantized_linear needs a floating-point input");
  MF_CHECK(x.device() == q->device(), "input and quantised weight are on different devices");
  auto h = c10::make_intrusive<QuantHolder>();
  h->q = std::move(q);
  return QuantLinearFunction::apply(x, h);
}

}  // namespace moeforge
