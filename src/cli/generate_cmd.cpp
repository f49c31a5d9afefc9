// moeforge generate CHECKPOINT --prompt TEXT [--chat] [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S]
// Under `moeforge launch` the ranks split the experts (expert parallelism over the world); rank 0 samples and prints.
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli/cli.h"
#include "core/compat.h"
#include "core/error.h"
#include "data/tokenizer.h"
#include "model/generate.h"
#include "model/finetune.h"
#include "checkpoint/checkpoint.h"
#include "eval/inference.h"

namespace moeforge::cli {

int cmd_generate(const Args& in) {
  Args args = in;
  std::string prompt, v;
  if (!take_option(args, "--prompt", &prompt)) throw UserError("generate: --prompt TEXT is required");
  const bool chat = take_flag(args, "--chat");
  SamplingOptions o;
  if (take_option(args, "--max-new-tokens", &v)) o.max_new_tokens = parse_int("--max-new-tokens", v);
  if (take_option(args, "--temperature", &v)) o.temperature = parse_double("--temperature", v);
  if (take_option(args, "--top-p", &v)) o.top_p = parse_double("--top-p", v);
  if (take_option(args, "--seed", &v)) o.seed = static_cast<uint64_t>(parse_int("--seed", v));
  int64_t threads = 0;
  if (take_option(args, "--threads", &v)) threads = parse_int("--threads", v);
  const std::string precision = take_precision(args, "generate");
  const bool json = take_flag(args, "--json");
  reject_unknown_flags(args, "generate", {"--prompt", "--chat", "--max-new-tokens", "--temperature", "--top-p", "--seed",
                                          "--threads", "--precision", "--json"});
  if (args.size() != 1) throw UserError("generate: expected one CHECKPOINT directory");
  if (o.max_new_tokens <= 0) throw UserError("generate: --max-new-tokens must be positive");
  if (o.temperature < 0) throw UserError("generate: --temperature must be >= 0");
  if (!(o.top_p > 0 && o.top_p <= 1)) throw UserError("generate: --top-p must be in (0, 1]");
  train::InferenceJob job("generate", static_cast<int>(threads));
  const std::string ckpt = args[0];
  data::Tokenizer tok(train::require_checkpoint_tokenizer(ckpt, "generation"));
  MixtralForCausalLM model = job.load(ckpt, precision);
  if (job.world() > 1) o.agree = [&](int64_t t) { return job.agree(t); };
  // Test hook: ranks other than 0 draw from other streams, so that only the agreement keeps them together.
  if (std::getenv("MOEFORGE_TEST_RANK_SEEDS") && job.rank() > 0) o.seed += 7919ULL * static_cast<uint64_t>(job.rank());
  const bool print = job.is_main() && !json;
  // Mixtral-Instruct's format: <s>[INST] {prompt} [/INST]
  std::vector<int64_t> ids{tok.bos_id()};
  for (int t : tok.encode(chat ? "[INST] " + prompt + " [/INST]" : prompt)) ids.push_back(t);
  o.eos_id = tok.eos_id();
  o.vocab_limit = tok.vocab_size();
  // Decode prompt + everything produced so far and print what is new: SentencePiece drops the
  // leading space of a text's first piece and pieces can merge, so tokens are not decoded alone.
  std::vector<int> produced(ids.begin() + 1, ids.end());
  std::string shown = tok.decode(produced);
  if (!chat && print) std::cout << shown << std::flush;  // chat: only the answer
  generate(model, ids, o, [&](int64_t t) {
    produced.push_back(static_cast<int>(t));
    std::string text = tok.decode(produced);
    if (print && text.size() > shown.size() && text.compare(0, shown.size(), shown) == 0) {
      std::cout << text.substr(shown.size()) << std::flush;
      shown = text;
    }
  });
  if (print) std::cout << "\n";
  if (json && job.is_main())  // the prompt's ids (BOS first) and the generated ids, for comparing with other runtimes
    std::cout << nlohmann::json{{"prompt_ids", ids}, {"ids", std::vector<int>(produced.begin() + static_cast<long>(ids.size()) - 1,
                                                                             produced.end())},
                                {"text", tok.decode(produced)}}
                     .dump()
              << "\n";
  return 0;
}

}  // namespace moeforge::cli
