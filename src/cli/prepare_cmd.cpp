// moeforge prepare --tokenizer MODEL --input FILES/GLOBS... --out DIR [...]
#include <cstdio>

#include "cli/cli.h"
#include "core/error.h"
#include "data/prepare.h"

namespace moeforge::cli {

int cmd_prepare(const Args& in) {
  Args args = in;
  data::PrepareOptions o;
  std::string v;
  if (!take_option(args, "--tokenizer", &o.tokenizer)) throw UserError("prepare: --tokenizer MODEL is required");
  o.inputs = take_list(args, "--input");
  if (o.inputs.empty()) throw UserError("prepare: --input FILES/GLOBS is required");
  if (!take_option(args, "--out", &o.out_dir)) throw UserError("prepare: --out DIR is required");
  if (take_option(args, "--val-fraction", &v)) o.val_fraction = parse_double("--val-fraction", v);
  if (take_option(args, "--seed", &v)) o.seed = static_cast<uint64_t>(parse_int("--seed", v));
  take_option(args, "--domain-field", &o.domain_field);
  o.split_blank_lines = take_flag(args, "--split-blank-lines");
  o.overwrite = take_flag(args, "--overwrite");
  reject_unknown_flags(args, "prepare",
                       {"--tokenizer", "--input", "--out", "--val-fraction", "--seed", "--domain-field",
                        "--split-blank-lines", "--overwrite"});
  if (!args.empty()) throw UserError("prepare: unexpected argument '" + args[0] + "'");
  auto r = data::prepare_corpus(o);
  std::printf("prepared %s: train %ld documents / %ld tokens, validation %ld documents / %ld tokens, %zu domains\n",
              o.out_dir.c_str(), (long)r.train_docs, (long)r.train_tokens, (long)r.val_docs, (long)r.val_tokens,
              r.domains.size());
  return 0;
}

}  // namespace moeforge::cli
