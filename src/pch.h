// Precompiled header: LibTorch's headers take ~20 s per translation unit on
// two cores; compiled once here they cost almost nothing afterwards.
#pragma once
#include <torch/torch.h>
#include <yaml-cpp/yaml.h>
#include <nlohmann/json.hpp>
