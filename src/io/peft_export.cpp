#include "io/peft_export.h"

#include <unistd.h>

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"
#include "io/safetensors.h"

namespace moeforge::io {

namespace fs = std::filesystem;

void export_peft(const PeftAdapterConfig& c, const std::vector<std::pair<std::string, at::Tensor>>& adapters,
                 const std::string& out_dir, const std::string& dtype) {
  const at::ScalarType t = dtype == "bf16" ? at::kBFloat16 : dtype == "fp16" ? at::kHalf : dtype == "fp32" ? at::kFloat
                                                                                                            : at::kByte;
  if (t == at::kByte) throw UserError("export: --dtype must be bf16, fp16 or fp32, got '" + dtype + "'");
  std::string out = out_dir;
  while (out.size() > 1 && out.back() == '/') out.pop_back();
  if (fs::exists(out) && !(fs::is_directory(out) && fs::is_empty(out)))
    throw UserError(out + ": already exists; choose a new --out directory");
  const std::string tmp = out + ".tmp-" + std::to_string(::getpid());
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  try {
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
    fsync_path(tmp);
    fs::remove_all(out);
    fs::rename(tmp, out);
  } catch (...) {
    fs::remove_all(tmp);
    throw;
  }
}

}  // namespace moeforge::io
