// The keys of a training recipe, each declared once (name, type, check, help); defaults in recipe/recipe.h.
#pragma once
#include <string>

#include "io/key_table.h"
#include "recipe/recipe.h"

namespace moeforge::train {

// Every recipe key except `model`, whose value is a config file, an inline config or absent (init_from's).
const io::KeyTable<Recipe>& recipe_keys();

// The key reference of model configs and recipes as Markdown (`moeforge info --keys`, docs/keys.md).
std::string key_reference_markdown();

}  // namespace moeforge::train
