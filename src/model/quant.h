// Block-wise weight quantisation for QLoRA (Dettmers et al. 2023): a frozen base weight is stored as 4-bit
// NF4 (or 8-bit int8) codes with one absmax per block of consecutive elements, and is dequantised on the fly
// in each matmul. Only the LoRA adapters train; the quantised weight gets no gradient.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moeforge {

enum class QuantType { NF4, Int8 };

struct QuantSpec {
  QuantType type = QuantType::NF4;
  int64_t block_size = 64;
  bool double_quant = true;
};

// "nf4" | "int8"; anything else is a UserError naming finetune.quant.type.
QuantType parse_quant_type(const std::string& s);
std::string quant_type_name(QuantType t);

// The 16 NF4 levels of the QLoRA paper, ascending, -1 .. 1 with an exact 0 (the bitsandbytes table, which is
// the normal quantile construction with offset 0.9677083, normalised by its max).
const std::array<float, 16>& nf4_levels();

// Double quantisation groups this many blocks' absmax under one fp32 scale.
constexpr int64_t kAbsmaxGroup = 256;

// A frozen weight stored block-wise quantised. The flattened (row-major) weight is cut into blocks of
// block_size consecutive elements, the last block zero-padded; each block keeps its absmax (the largest |w|).
//  - NF4: the index of the level nearest to w/absmax, two 4-bit codes per byte, the earlier element in the
//    high nibble (as bitsandbytes packs them). An all-zero block stores the index of level 0.
//  - int8: round(127 w/absmax) as int8.
// Double quantisation (QLoRA): the fp32 absmax values are themselves stored in 8 bits: their mean (one fp32) is
// subtracted, then symmetric int8 with one fp32 scale (group max |absmax - mean| / 127) per group of 256 blocks.
// The codes are taken against the true absmax; only its stored copy is quantised.
struct QuantizedWeight {
  QuantSpec spec;
  std::vector<int64_t> shape;  // the original weight's shape
  int64_t numel = 0;
  at::Tensor codes;         // NF4: uint8 [nblocks*bs/2]; int8: int8 [nblocks*bs]
  at::Tensor absmax;        // fp32 [nblocks], or int8 [nblocks] with double quant
  at::Tensor absmax_scale;  // double quant: fp32 [ceil(nblocks/256)]; undefined otherwise
  at::Tensor absmax_mean;   // double quant: fp32 scalar; undefined otherwise

  int64_t num_blocks() const;
  int64_t bytes() const;  // storage of all the tensors above
  at::Device device() const;
  QuantizedWeight to(const at::Device& d) const;
};

// w: any floating dtype and device (read in fp32); the result lives on w's device. w's autograd history is
// not followed: the result holds no tensor that requires grad. A block size that is not positive (or odd, for
// NF4) is a UserError naming finetune.quant.block_size.
QuantizedWeight quantize(const at::Tensor& w, const QuantSpec& spec);

// fp32 [nblocks]: the absmax dequantize scales by (with double quant, the dequantised one, clamped at 0).
at::Tensor block_absmax(const QuantizedWeight& q);

// The weight in `shape`, computed in fp32 and then cast to dtype.
at::Tensor dequantize(const QuantizedWeight& q, at::ScalarType dtype);

// y = x W^T for a frozen quantised W [out, in] and x [..., in] (fp32, bf16, fp64, ...). W is dequantised to x's
// dtype in the forward and again in the backward, so no dequantised copy stays alive between them; the
// gradient goes to x only. First-order gradients only are promised.
at::Tensor quantized_linear(const at::Tensor& x, std::shared_ptr<const QuantizedWeight> q);

}  // namespace moeforge
