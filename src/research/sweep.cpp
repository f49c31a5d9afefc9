#include "research/sweep.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/atomic_file.h"
#include "core/error.h"
#include "model/load_balance.h"
#include "io/yaml_reader.h"
#include "model/param_count.h"
#include "checkpoint/checkpoint.h"

namespace moeforge::train {

namespace fs = std::filesystem;

namespace {

std::string where(const std::string& path, const YAML::Node& n) {
  return path + ":" + std::to_string(n.Mark().line + 1);
}

std::string scalar_text(const YAML::Node& n, const std::string& path, const std::string& key) {
  if (!n.IsScalar()) throw UserError(where(path, n) + ": '" + key + "': expected a scalar value");
  return n.Scalar();
}

// The point's directory name: last key segments (the full key where two axes share one) = value.
std::string point_name(const std::vector<std::pair<std::string, std::string>>& values) {
  std::map<std::string, int> seen;
  auto last = [](const std::string& k) { return k.substr(k.rfind('.') + 1); };
  for (const auto& [k, v] : values) ++seen[last(k)];
  std::string name;
  for (const auto& [k, v] : values) {
    std::string part = (seen[last(k)] > 1 ? k : last(k)) + "=" + v;
    for (char& c : part)
      if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '=' || c == '-' || c == '+' || c == '_')) c = '-';
    name += (name.empty() ? "" : "_") + part;
  }
  return name;
}

bool is_seed_key(const std::string& k) { return k == "train.seed" || k == "seed"; }

// The names in `{...}` of a text, in order of first appearance.
std::vector<std::string> placeholders(const std::string& text) {
  std::vector<std::string> out;
  for (size_t at = text.find('{'); at != std::string::npos; at = text.find('{', at + 1)) {
    const size_t end = text.find('}', at);
    if (end == std::string::npos) break;
    const std::string name = text.substr(at + 1, end - at - 1);
    if (std::find(out.begin(), out.end(), name) == out.end()) out.push_back(name);
  }
  return out;
}

// Fills `{KEY}` from vars in one pass (a value that itself holds braces is not expanded again); an unknown name is
// an error naming what (`context`) holds it.
std::string substitute(const std::string& text, const std::map<std::string, std::string>& vars,
                       const std::string& context) {
  std::string out;
  size_t from = 0;
  for (size_t at = text.find('{'); at != std::string::npos; at = text.find('{', from)) {
    const size_t end = text.find('}', at);
    if (end == std::string::npos) break;
    const std::string name = text.substr(at + 1, end - at - 1);
    auto it = vars.find(name);
    if (it == vars.end()) {
      std::string known;
      for (const auto& [k, v] : vars) known += (known.empty() ? "" : ", ") + k;
      throw UserError(context + ": unknown placeholder {" + name + "} (known: " + known + ")");
    }
    out += text.substr(from, at - from) + it->second;
    from = end + 1;
  }
  return out + text.substr(from);
}

}  // namespace

SweepSpec load_sweep(const std::string& path) {
  YAML::Node root = io::load_yaml_file(path);
  if (!root.IsMap()) throw UserError(path + ": a sweep file is a mapping (recipe, output_dir, grid, ...)");
  SweepSpec s;
  s.path = path;
  const std::set<std::string> known{"recipe", "output_dir", "set", "variants", "grid", "match_active_params", "prepare"};
  for (const auto& kv : root) {
    const std::string k = kv.first.as<std::string>();
    if (!known.count(k))
      throw UserError(where(path, kv.first) + ": unknown key '" + k +
                      "' (a sweep file has recipe, output_dir, set, variants, grid, match_active_params, prepare)");
  }
  if (!root["recipe"]) throw UserError(path + ": key 'recipe' (the base recipe) is required");
  s.recipe = scalar_text(root["recipe"], path, "recipe");
  if (!root["output_dir"]) throw UserError(path + ": key 'output_dir' (where the points' runs go) is required");
  s.output_dir = scalar_text(root["output_dir"], path, "output_dir");
  if (s.output_dir.empty()) throw UserError(path + ": key 'output_dir' must not be empty");
  if (auto set = root["set"]) {
    if (!set.IsMap()) throw UserError(where(path, set) + ": 'set' is a mapping of recipe keys to values");
    for (const auto& kv : set)
      s.fixed.push_back(kv.first.as<std::string>() + "=" + scalar_text(kv.second, path, "set." + kv.first.as<std::string>()));
  }
  if (auto m = root["match_active_params"]) {
    const std::string v = scalar_text(m, path, "match_active_params");
    if (v != "true" && v != "false") throw UserError(where(path, m) + ": 'match_active_params' must be true or false");
    s.match_active_params = v == "true";
  }
  if (auto pr = root["prepare"]) {
    if (!pr.IsSequence())
      throw UserError(where(path, pr) + ": 'prepare' is a list of {run: \"moeforge command line\", creates: PATH}");
    for (const auto& step : pr) {
      if (!step.IsMap() || !step["run"] || !step["creates"] || step.size() != 2)
        throw UserError(where(path, step) + ": a prepare step is {run: \"moeforge command line\", creates: PATH} (the "
                        "path it makes, which marks it done)");
      SweepPrepare p{scalar_text(step["run"], path, "prepare.run"), scalar_text(step["creates"], path, "prepare.creates")};
      std::istringstream words(p.run);
      std::string first;
      words >> first;
      if (first.empty() || first == "sweep")
        throw UserError(where(path, step["run"]) + ": a prepare step runs a moeforge command other than sweep");
      if (p.creates.empty()) throw UserError(where(path, step["creates"]) + ": 'creates' must not be empty");
      s.prepare.push_back(p);
    }
  }
  if (auto vs = root["variants"]) {
    if (!vs.IsMap() || vs.size() == 0)
      throw UserError(where(path, vs) + ": 'variants' maps each arm's name to a mapping of recipe keys to values");
    SweepAxis names;
    names.key = "variant";
    for (const auto& kv : vs) {
      const std::string name = kv.first.as<std::string>();
      if (!kv.second.IsMap())
        throw UserError(where(path, kv.second) + ": variant '" + name + "' must be a mapping of recipe keys to values");
      std::vector<std::string> sets;
      for (const auto& o : kv.second)
        sets.push_back(o.first.as<std::string>() + "=" +
                       scalar_text(o.second, path, "variants." + name + "." + o.first.as<std::string>()));
      for (const auto& [other, unused] : s.variants)
        if (point_name({{"variant", other}}) == point_name({{"variant", name}}))
          throw UserError(where(path, kv.first) + ": variants '" + other + "' and '" + name +
                          "' would share a run directory; name them apart (letters, digits, . - + _)");
      s.variants.emplace_back(name, sets);
      names.values.push_back(name);
    }
    s.grid.push_back(names);
  }
  auto grid = root["grid"];
  if (grid && (!grid.IsMap() || grid.size() == 0))
    throw UserError(where(path, grid) + ": key 'grid' must map at least one recipe key to a list of values");
  if (!grid && s.variants.empty())
    throw UserError(path + ": key 'grid' (recipe keys to lists of values) or 'variants' (named arms) is required");
  if (grid) {
    for (const auto& kv : grid) {
      SweepAxis a;
      a.key = kv.first.as<std::string>();
      if (a.key == "variant")
        throw UserError(where(path, kv.first) + ": 'variant' is not a recipe key; name the arms under 'variants:'");
      if (!kv.second.IsSequence() || kv.second.size() == 0)
        throw UserError(where(path, kv.second) + ": grid key '" + a.key + "' needs a non-empty list of values");
      for (const auto& v : kv.second) a.values.push_back(scalar_text(v, path, "grid." + a.key));
      s.grid.push_back(a);
    }
  }
  return s;
}

namespace {

// Two points whose resolved recipes are the same run but for their directories: an axis that changes nothing.
void refuse_identical_points(const SweepSpec& spec, const std::vector<SweepPoint>& points) {
  auto run_of = [](const SweepPoint& p) {
    std::string y = p.recipe.yaml, out;
    std::istringstream in(y);
    for (std::string line; std::getline(in, line);)
      if (line.rfind("output_dir:", 0) != 0) out += line + "\n";
    return out;
  };
  std::map<std::string, const SweepPoint*> seen;
  for (const auto& p : points) {
    auto [it, fresh] = seen.emplace(run_of(p), &p);
    if (fresh) continue;
    std::string differ;
    for (size_t i = 0; i < p.values.size(); ++i)
      if (p.values[i].second != it->second->values[i].second)
        differ += (differ.empty() ? "" : ", ") + p.values[i].first;
    throw UserError(spec.path + ": points " + it->second->name + " and " + p.name + " resolve to the same run: " +
                    (differ.empty() ? std::string("they are the same point") : differ) +
                    " changes nothing in the resolved recipe");
  }
}

}  // namespace

std::vector<SweepPoint> expand_sweep(const SweepSpec& spec) {
  std::vector<SweepPoint> points;
  std::vector<size_t> at(spec.grid.size(), 0);
  const Recipe base = load_recipe(spec.recipe, spec.fixed);
  const int64_t base_active = count_params(base.model).active;
  for (;;) {
    SweepPoint p;
    for (size_t i = 0; i < spec.grid.size(); ++i) p.values.emplace_back(spec.grid[i].key, spec.grid[i].values[at[i]]);
    p.name = point_name(p.values);
    p.run_dir = spec.output_dir + "/" + p.name;
    p.overrides = spec.fixed;
    std::vector<std::string> own;  // what this point sets itself: its axes' values and its variant's overrides
    for (const auto& [k, v] : p.values) {
      if (k != "variant") {
        p.overrides.push_back(k + "=" + v);
        own.push_back(k + "=" + v);
        continue;
      }
      for (const auto& [name, sets] : spec.variants)
        if (name == v) {
          p.overrides.insert(p.overrides.end(), sets.begin(), sets.end());
          own.insert(own.end(), sets.begin(), sets.end());
        }
    }
    std::map<std::string, std::string> vars{{"output_dir", spec.output_dir}};
    for (const auto& [k, v] : p.values) vars[k] = v;
    p.overrides.push_back("output_dir=" + p.run_dir);
    try {
      for (auto& o : p.overrides) {  // the values only: key=value
        const auto eq = o.find('=');
        if (eq != std::string::npos) o = o.substr(0, eq + 1) + substitute(o.substr(eq + 1), vars, "override " + o);
      }
      p.recipe = load_recipe(spec.recipe, p.overrides);
      refuse_no_op_keys(p.recipe, own, /*shared_recipe=*/true);
      if (spec.match_active_params) {
        // Active parameters are affine in intermediate_size: solve for the base recipe's count.
        ModelConfig c = p.recipe.model;
        c.intermediate_size = 1;
        const int64_t a1 = count_params(c).active;
        c.intermediate_size = 2;
        const int64_t slope = count_params(c).active - a1;
        const int64_t size = std::max<int64_t>(1, std::llround(static_cast<double>(base_active - a1) / slope) + 1);
        p.overrides.insert(p.overrides.end() - 1, "model.intermediate_size=" + std::to_string(size));
        p.recipe = load_recipe(spec.recipe, p.overrides);
      }
      // A probe per point would let timing noise choose each arm's arithmetic: the arms must compute alike.
      if (p.recipe.runtime.precision == "auto")
        throw UserError("key 'runtime.precision': auto lets each point's start-up probe pick its precision; a sweep "
                        "compares arms computed alike: set fp32 or bf16 (for every point: set: {runtime.precision: bf16})");
    } catch (const UserError& e) {
      throw UserError(spec.path + ": point " + p.name + ": " + e.what());
    }
    points.push_back(std::move(p));
    size_t i = spec.grid.size();
    while (i > 0) {
      --i;
      if (++at[i] < spec.grid[i].values.size()) break;
      at[i] = 0;
      if (i == 0) {
        refuse_identical_points(spec, points);
        return points;
      }
    }
  }
}

std::vector<PrepareStep> expand_prepare(const SweepSpec& spec) {
  std::vector<PrepareStep> out;
  for (size_t i = 0; i < spec.prepare.size(); ++i) {
    const auto& step = spec.prepare[i];
    const std::string context = spec.path + ": prepare step " + std::to_string(i + 1);
    // The axes this step names, in grid order; it runs once per combination of their values.
    std::vector<const SweepAxis*> axes;
    auto named = placeholders(step.run + " " + step.creates);
    std::string known = "output_dir";
    for (const auto& a : spec.grid) known += ", " + a.key;
    for (const auto& n : named)
      if (n != "output_dir" && std::none_of(spec.grid.begin(), spec.grid.end(), [&](const SweepAxis& a) { return a.key == n; }))
        throw UserError(context + ": unknown placeholder {" + n + "} (known: " + known + ")");
    for (const auto& a : spec.grid)
      if (std::find(named.begin(), named.end(), a.key) != named.end()) axes.push_back(&a);
    std::vector<size_t> at(axes.size(), 0);
    for (bool more = true; more;) {
      std::map<std::string, std::string> vars{{"output_dir", spec.output_dir}};
      std::string which;
      for (size_t a = 0; a < axes.size(); ++a) {
        vars[axes[a]->key] = axes[a]->values[at[a]];
        which += (which.empty() ? "" : ", ") + axes[a]->key.substr(axes[a]->key.rfind('.') + 1) + "=" + axes[a]->values[at[a]];
      }
      PrepareStep ps;
      std::istringstream words(substitute(step.run, vars, context));
      for (std::string w; words >> w;) ps.args.push_back(w);
      ps.creates = substitute(step.creates, vars, context);
      ps.label = "prepare " + std::to_string(i + 1) + (which.empty() ? "" : " (" + which + ")");
      out.push_back(std::move(ps));
      more = false;
      for (size_t k = axes.size(); k-- > 0 && !more;) {
        more = ++at[k] < axes[k]->values.size();
        if (!more) at[k] = 0;
      }
    }
  }
  return out;
}

PointStatus point_status(const SweepPoint& p) {
  if (fs::exists(p.run_dir + "/summary.json")) return PointStatus::Finished;
  if (latest_checkpoint(p.run_dir)) return PointStatus::Interrupted;
  return PointStatus::Fresh;
}

namespace {

struct PointResult {
  bool done = false;
  nlohmann::json summary;
  double load_max_over_mean = NAN, load_cv = NAN, router_entropy = NAN, z_loss = NAN;
  int64_t dead_experts = -1;
  // Over training: means over the logged steps, and the first logged step from which the worst layer's
  // max/mean stays under kSettled (NAN: it does not).
  double mean_max_over_mean = NAN, mean_cv = NAN, settled_step = NAN;
  nlohmann::json val_curve = nlohmann::json::array(), layer_load = nlohmann::json::array();
  nlohmann::json balance_curve = nlohmann::json::array();  // [step, worst max/mean, mean CV]
};
constexpr double kSettled = 1.5;

double mean_of(const nlohmann::json& a) {
  double s = 0;
  for (const auto& x : a) s += x.get<double>();
  return a.empty() ? NAN : s / static_cast<double>(a.size());
}

PointResult read_point(const SweepPoint& p) {
  PointResult r;
  std::ifstream s(p.run_dir + "/summary.json");
  if (!s) return r;
  try {
    r.summary = nlohmann::json::parse(s);
    r.done = true;
    nlohmann::json last;
    std::ifstream m(p.run_dir + "/metrics.jsonl");
    for (std::string line; std::getline(m, line);) {
      auto j = nlohmann::json::parse(line);
      if (j.contains("val_loss")) r.val_curve.push_back({j["step"], j["val_loss"]});
      if (j.contains("expert_load")) {
        last = j;
        r.balance_curve.push_back({j["step"], j["load_max_over_mean"], mean_of(j["layer_load_cv"])});
      }
    }
    if (!r.balance_curve.empty()) {
      double mm = 0, cv = 0;
      for (const auto& b : r.balance_curve) {
        mm += b[1].get<double>();
        cv += b[2].get<double>();
      }
      r.mean_max_over_mean = mm / static_cast<double>(r.balance_curve.size());
      r.mean_cv = cv / static_cast<double>(r.balance_curve.size());
      for (size_t i = r.balance_curve.size(); i > 0 && r.balance_curve[i - 1][1].get<double>() < kSettled; --i)
        r.settled_step = r.balance_curve[i - 1][0].get<double>();
    }
    if (!last.is_null()) {
      r.layer_load = last["expert_load"];
      r.load_max_over_mean = last["load_max_over_mean"].get<double>();
      r.z_loss = last["z_loss"].get<double>();
      r.load_cv = mean_of(last["layer_load_cv"]);
      r.router_entropy = mean_of(last["layer_router_entropy"]);
      r.dead_experts = 0;
      for (const auto& layer : last["expert_load"]) r.dead_experts += balance_stats(layer.get<std::vector<int64_t>>()).dead_experts;
    }
  } catch (const nlohmann::json::exception& e) {
    throw UserError(p.run_dir + ": unreadable summary or metrics (" + std::string(e.what()).substr(0, 100) + ")");
  }
  return r;
}

std::string fmt(double v, int prec = 4) {
  if (std::isnan(v)) return "";
  std::ostringstream o;
  o.precision(prec);
  o << std::fixed << v;
  return o.str();
}

struct MeanSd {
  double mean = NAN, sd = NAN;
  int n = 0;
};
MeanSd mean_sd(const std::vector<double>& v) {
  MeanSd m;
  m.n = static_cast<int>(v.size());
  if (v.empty()) return m;
  double s = 0;
  for (double x : v) s += x;
  m.mean = s / m.n;
  if (m.n > 1) {
    double q = 0;
    for (double x : v) q += (x - m.mean) * (x - m.mean);
    m.sd = std::sqrt(q / (m.n - 1));
  }
  return m;
}

}  // namespace

void write_sweep_report(const SweepSpec& spec, const std::vector<SweepPoint>& points) {
  fs::create_directories(spec.output_dir);
  std::vector<std::string> axes, shown;  // shown: the axes other than the seed
  for (const auto& a : spec.grid) {
    axes.push_back(a.key);
    if (!is_seed_key(a.key)) shown.push_back(a.key);
  }
  // Rows: the points with equal non-seed values, in grid order.
  std::vector<std::string> order;
  std::map<std::string, std::vector<size_t>> rows;
  std::vector<PointResult> res;
  nlohmann::json report = {{"sweep", spec.path}, {"axes", axes}, {"points", nlohmann::json::array()}};
  for (size_t i = 0; i < points.size(); ++i) {
    res.push_back(read_point(points[i]));
    std::string key;
    for (const auto& [k, v] : points[i].values)
      if (!is_seed_key(k)) key += k + "=" + v + ";";
    if (!rows.count(key)) order.push_back(key);
    rows[key].push_back(i);
    nlohmann::json pj = {{"name", points[i].name}, {"run_dir", points[i].run_dir}, {"finished", res[i].done}};
    for (const auto& [k, v] : points[i].values) pj["values"][k] = v;
    if (res[i].done) {
      pj["final_val_loss"] = res[i].summary["final_val_loss"];
      pj["val_curve"] = res[i].val_curve;
      pj["layer_load"] = res[i].layer_load;
      pj["balance_curve"] = res[i].balance_curve;
    }
    report["points"].push_back(pj);
  }
  std::ostringstream csv, md;
  csv << "";
  for (const auto& k : shown) csv << k << ",";
  csv << "runs,finished,total_params,active_params,final_train_loss_mean,final_train_loss_sd,final_val_loss_mean,"
         "final_val_loss_sd,tokens_per_second,load_max_over_mean,load_cv,dead_experts,router_entropy,z_loss,"
         "training_load_max_over_mean,training_load_cv,settled_step_mean,settled_runs\n";
  md << "| ";
  for (const auto& k : shown) md << "`" << k << "` | ";
  md << "runs | total params | active params | train loss | val loss | tokens/s | max/mean load | load CV | dead "
        "experts | router entropy | z-loss | max/mean over training | CV over training | max/mean < 1.5 from step |\n|";
  for (size_t i = 0; i < shown.size() + 14; ++i) md << "---|";
  md << "\n";
  for (const auto& key : order) {
    const auto& idx = rows[key];
    const SweepPoint& first = points[idx.front()];
    std::vector<double> tr, va, tps, mm, cv, dead, ent, z, tmm, tcv, settled;
    int finished = 0;
    for (size_t i : idx) {
      if (!res[i].done) continue;
      ++finished;
      const auto& s = res[i].summary;
      if (s["final_train_loss"].is_number()) tr.push_back(s["final_train_loss"].get<double>());
      va.push_back(s["final_val_loss"].get<double>());
      tps.push_back(s["tokens_per_second"].get<double>());
      mm.push_back(res[i].load_max_over_mean);
      cv.push_back(res[i].load_cv);
      dead.push_back(static_cast<double>(res[i].dead_experts));
      ent.push_back(res[i].router_entropy);
      z.push_back(res[i].z_loss);
      tmm.push_back(res[i].mean_max_over_mean);
      tcv.push_back(res[i].mean_cv);
      if (!std::isnan(res[i].settled_step)) settled.push_back(res[i].settled_step);
    }
    // The settling step: its mean over the runs that settle, and how many of the row's runs do.
    const std::string settled_md =
        (settled.empty() ? std::string("never") : fmt(mean_sd(settled).mean, 0)) + " (" + std::to_string(settled.size()) +
        "/" + std::to_string(finished) + ")";
    const ParamCounts pc = count_params(first.recipe.model);
    const MeanSd T = mean_sd(tr), V = mean_sd(va);
    std::vector<std::string> vals;
    for (const auto& [k, v] : first.values)
      if (!is_seed_key(k)) vals.push_back(v);
    for (const auto& v : vals) csv << v << ",";
    csv << idx.size() << "," << finished << "," << pc.total << "," << pc.active << "," << fmt(T.mean) << ","
        << fmt(T.sd) << "," << fmt(V.mean) << "," << fmt(V.sd) << "," << fmt(mean_sd(tps).mean, 0) << ","
        << fmt(mean_sd(mm).mean, 3) << "," << fmt(mean_sd(cv).mean, 3) << "," << fmt(mean_sd(dead).mean, 1) << ","
        << fmt(mean_sd(ent).mean, 3) << "," << fmt(mean_sd(z).mean, 3) << "," << fmt(mean_sd(tmm).mean, 3) << ","
        << fmt(mean_sd(tcv).mean, 3) << "," << fmt(mean_sd(settled).mean, 0) << "," << settled.size() << "\n";
    md << "| ";
    for (const auto& v : vals) md << v << " | ";
    auto pm = [&](const MeanSd& m) { return fmt(m.mean) + (std::isnan(m.sd) ? "" : " ± " + fmt(m.sd)); };
    md << finished << "/" << idx.size() << " | " << pc.total << " | " << pc.active << " | " << pm(T) << " | " << pm(V)
       << " | " << fmt(mean_sd(tps).mean, 0) << " | " << fmt(mean_sd(mm).mean, 2) << " | " << fmt(mean_sd(cv).mean, 3)
       << " | " << fmt(mean_sd(dead).mean, 1) << " | " << fmt(mean_sd(ent).mean, 3) << " | " << fmt(mean_sd(z).mean, 3)
       << " | " << fmt(mean_sd(tmm).mean, 2) << " | " << fmt(mean_sd(tcv).mean, 3) << " | " << settled_md << " |\n";
  }
  md << "\nLosses: mean ± sample standard deviation over the seeds of a row. Balance columns: the last logged\n"
        "training step's expert loads (max/mean: worst layer; CV, router entropy: mean over layers; dead experts:\n"
        "(layer, expert) pairs under 10% of the fair share, summed over layers). Over training: the mean over every\n"
        "logged training step of the worst layer's max/mean and of the layers' mean CV; the first logged step from\n"
        "which the worst layer's max/mean stays under 1.5 to the end (mean over the runs that get there; in\n"
        "brackets how many of the row's runs do).\n";
  write_file_atomic(spec.output_dir + "/summary.csv", csv.str());
  write_file_atomic(spec.output_dir + "/summary.md", md.str());
  write_file_atomic(spec.output_dir + "/report.json", report.dump(1) + "\n");
}

}  // namespace moeforge::train
