// Sweeps: a base recipe and a grid over any of its keys. Each point of the grid is an ordinary training
// run in its own directory (named from its values); the report reads the runs' summaries and metrics.
#pragma once
#include <string>
#include <vector>

#include "recipe/recipe.h"

namespace moeforge::train {

struct SweepAxis {
  std::string key;                  // dotted recipe key, e.g. model.moe.aux_loss_coef
  std::vector<std::string> values;  // YAML scalars as written
};

// A command run before the points (e.g. the dense model an upcycling sweep starts from): a moeforge command
// line (words split on blanks) and the path it creates, which marks it done. `{KEY}` in either is a grid axis's
// value (train.seed, variant, ...) or output_dir; a step naming axes runs once per combination of their values.
struct SweepPrepare {
  std::string run;
  std::string creates;
};

struct PrepareStep {
  std::vector<std::string> args;  // after `moeforge`
  std::string creates;
  std::string label;              // e.g. "prepare 1 (seed=2)"
};

struct SweepSpec {
  std::string path;                       // the sweep file
  std::string recipe;                     // the base recipe
  std::string output_dir;                 // root of the point directories
  std::vector<std::string> fixed;         // overrides applied to every point ("key=value")
  std::vector<SweepAxis> grid;            // cartesian product, first axis slowest
  // Named arms, each a set of overrides ("key=value"): the first axis of the grid, called "variant", when given
  // (arms that differ in several keys at once, e.g. a balancing method and its coefficient).
  std::vector<std::pair<std::string, std::vector<std::string>>> variants;
  bool match_active_params = false;       // scale model.intermediate_size to the base's active parameters
  std::vector<SweepPrepare> prepare;      // run in order before the points
};

struct SweepPoint {
  std::string name;                                      // directory name, e.g. aux_loss_coef=0.01_seed=1
  std::vector<std::pair<std::string, std::string>> values;  // (key, value) per axis
  std::vector<std::string> overrides;                    // everything passed to `train` as --set
  std::string run_dir;
  Recipe recipe;                                         // the point's resolved recipe (validated)
};

// Reads a sweep file (strict: unknown keys, neither a grid nor variants, or an empty axis are UserErrors naming
// it).
SweepSpec load_sweep(const std::string& path);

// Expands the grid and resolves every point's recipe, so a key that does not exist or a value of the
// wrong type is an error before anything runs. `{KEY}` in an override's value is the point's value of that axis
// (or output_dir): arms can name what a prepare step made for their seed.
std::vector<SweepPoint> expand_sweep(const SweepSpec& spec);

// The prepare commands with their placeholders filled in, in order (each step for every combination of the
// axes it names, first axis slowest). An unknown placeholder is a UserError naming the step.
std::vector<PrepareStep> expand_prepare(const SweepSpec& spec);

enum class PointStatus { Fresh, Interrupted, Finished };
PointStatus point_status(const SweepPoint& p);

// Writes output_dir/summary.csv and summary.md (one row per point; seeds folded into mean and spread)
// and output_dir/report.json (per point: the values, the curves and the per-layer loads the plots need). Balance
// is reported at the last logged step and over training: the mean of the worst layer's max/mean load and of the
// layers' mean CV over every logged step, and the first logged step from which max/mean stays under 1.5.
void write_sweep_report(const SweepSpec& spec, const std::vector<SweepPoint>& points);

}  // namespace moeforge::train
