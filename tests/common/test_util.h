#pragma once
#include <torch/torch.h>

#include <fstream>
#include <functional>
#include <string>

#include "core/error.h"
#include "model/config.h"

namespace moeforge::test {

inline std::string source_path(const std::string& rel) { return std::string(MOEFORGE_SOURCE_DIR) + "/" + rel; }

// A small config for fast tests.
inline ModelConfig tiny_config() {
  ModelConfig c;
  c.name = "test-tiny";
  c.vocab_size = 64;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.max_position_embeddings = 128;
  c.rope_theta = 10000.0;
  c.rms_norm_eps = 1e-6;
  c.moe.num_experts = 4;
  c.moe.num_experts_per_tok = 2;
  return c;
}

// The message of the UserError `f` throws ("" when it throws none).
inline std::string user_error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}

inline std::string write_temp(const std::string& name, const std::string& text) {
  std::string path = "/tmp/moeforge_test_" + std::to_string(::getpid()) + "_" + name;
  std::ofstream(path) << text;
  return path;
}

inline double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

}  // namespace moeforge::test
