#include "output/metrics.h"

#include <filesystem>
#include <fstream>
#include <vector>

#include "core/atomic_file.h"
#include "core/error.h"
#include "output/tensorboard.h"

namespace moeforge::train {

namespace fs = std::filesystem;

MetricsLog::MetricsLog(const std::string& run_dir, int64_t resume_step) : path_(run_dir + "/metrics.jsonl") {
  if (resume_step >= 0 && fs::exists(path_)) {
    std::vector<std::string> keep;
    std::ifstream in(path_);
    for (std::string line; std::getline(in, line);) {
      try {
        auto j = nlohmann::json::parse(line);
        if (j.contains("step") && j["step"].get<int64_t>() <= resume_step) keep.push_back(line);
      } catch (const std::exception&) {
        // a torn last line from a killed run: drop it
      }
    }
    std::string text;
    for (auto& l : keep) text += l + "\n";
    write_file_atomic(path_, text);
  }
  tb_ = std::make_unique<TensorBoardWriter>(run_dir + "/tensorboard");
}

MetricsLog::~MetricsLog() = default;

void MetricsLog::write(const nlohmann::json& record, const std::string& prefix) {
  std::ofstream out(path_, std::ios::app);
  if (!out) throw UserError(path_ + ": cannot append");
  out << record.dump() << "\n";
  const int64_t step = record.at("step").get<int64_t>();
  for (auto it = record.begin(); it != record.end(); ++it) {
    if (it.key() == "step" || !it.value().is_number()) continue;
    tb_->add_scalar(prefix + it.key(), it.value().get<double>(), step);
  }
  tb_->flush();
}

}  // namespace moeforge::train
