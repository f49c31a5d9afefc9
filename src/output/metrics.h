// Where a run's numbers go: metrics.jsonl (one object per line) and TensorBoard scalars.
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

namespace moeforge::train {

class TensorBoardWriter;

class MetricsLog {
 public:
  // `resume_step` >= 0: keep only the lines with step <= resume_step (a resumed run rewrites what followed).
  MetricsLog(const std::string& run_dir, int64_t resume_step);
  ~MetricsLog();
  // Appends `record` (must hold "step") to metrics.jsonl; its numeric fields become TensorBoard
  // scalars under `prefix` (e.g. "train/loss").
  void write(const nlohmann::json& record, const std::string& prefix);

 private:
  std::string path_;
  std::unique_ptr<TensorBoardWriter> tb_;
};

}  // namespace moeforge::train
