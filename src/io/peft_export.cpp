#include "io/peft_export.h"

#include <ATen/ATen.h>

#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"
#include "io/safetensors.h"

namespace moeforge::io {

void export_peft(const PeftAdapterConfig& c, const std::vector<std::pair<std::string, at::Tensor>>& adapters,
                 const std::string& out_dir, const std::string& dtype) {
  const at::ScalarType t = dtype == "bf16" ? at::kBFloat16 : dtype == "fp16" ? at::kHalf : dtype == "fp32" ? at::kFloat
                                                                                                            : at::kByte;
  if (t == at::kByte) throw UserError("export: --dtype must be bf16, fp16 or fp32, got '" + dtype + "'");
  write_dir_atomic(out_dir, [&](const std::string& tmp) {
    nlohmann::json j = {{"peft_type", "LORA"},
                        {"task_type", "CAUSAL_LM"},
                        {"r", c.r},
                        {"lora_alpha", c.lora_alpha},
                        {"lora_dropout", c.lora_dropout},
                        {"target_modules", c.target_modules},
                        {"rank_pattern", c.rank_pattern},
                        {"alpha_pattern", nlohmann::json::object()},
                        {"use_rslora", c.use_rslora},
                        {"use_dora", false},
                        {"bias", "none"},
                        {"fan_in_fan_out", false},
                        {"init_lora_weights", true},
                        {"inference_mode", true},
                        {"modules_to_save", nullptr},
                        {"base_model_name_or_path", c.base_model_name_or_path.empty()
                                                        ? nlohmann::json(nullptr)
                                                        : nlohmann::json(c.base_model_name_or_path)},
                        {"revision", nullptr}};
    write_file_atomic(tmp + "/adapter_config.json", j.dump(2) + "\n");
    std::vector<std::pair<std::string, at::Tensor>> named;
    for (const auto& [n, v] : adapters)
      named.emplace_back("base_model.model." + n, v.detach().to(at::kCPU).to(t).contiguous());
    write_safetensors(tmp + "/adapter_model.safetensors", named, {{"format", "pt"}});
  });
}

}  // namespace moeforge::io
