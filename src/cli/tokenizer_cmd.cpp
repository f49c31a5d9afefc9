// moeforge tokenizer train --input FILES... --vocab-size N --out DIR
#include <cstdio>

#include "cli/cli.h"
#include "core/error.h"
#include "data/tokenizer.h"

namespace moeforge::cli {

int cmd_tokenizer(const Args& in) {
  Args args = in;
  if (args.empty() || args[0] != "train")
    throw UserError("tokenizer: expected 'train' (usage: moeforge tokenizer train --input FILES... --vocab-size N --out DIR)");
  args.erase(args.begin());
  data::TokenizerTrainOptions o;
  o.inputs = take_list(args, "--input");
  std::string v;
  if (take_option(args, "--vocab-size", &v)) o.vocab_size = static_cast<int>(parse_int("--vocab-size", v));
  if (!take_option(args, "--out", &o.out_dir)) throw UserError("tokenizer train: --out DIR is required");
  if (take_option(args, "--threads", &v)) o.threads = static_cast<int>(parse_int("--threads", v));
  reject_unknown_flags(args, "tokenizer train", {"--input", "--vocab-size", "--out", "--threads"});
  if (!args.empty()) throw UserError("tokenizer train: unexpected argument '" + args[0] + "'");
  std::string path = data::train_tokenizer(o);
  data::Tokenizer tok(path);
  std::printf("tokenizer: %s (%d pieces; unk %d, <s> %d, </s> %d)\n", path.c_str(), tok.vocab_size(), tok.unk_id(),
              tok.bos_id(), tok.eos_id());
  return 0;
}

}  // namespace moeforge::cli
