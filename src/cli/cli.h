// Subcommands of the `moeforge` binary: one file each, one entry point each.
#pragma once
#include <string>
#include <vector>

namespace moeforge::cli {

using Args = std::vector<std::string>;

int run(const Args& args);       // dispatch; returns the exit status
int dispatch(const Args& args);  // run() without the MOEFORGE_ARGS_ONLY catch (launch checks its COMMAND with it)
// The usage text of a command ("eval", "bench moe"): the lines `moeforge --help` prints for it.
const std::string& command_usage(const std::string& command);
// MOEFORGE_ARGS_ONLY=1 (a developer and test hook: tests check every command line of the docs with it): each
// command stops once its flags are parsed and checked, before it reads a file; the process exits 0.
bool args_only();
struct ArgsChecked {};
int cmd_info(const Args& args);
int cmd_bench(const Args& args);
int cmd_tokenizer(const Args& args);
int cmd_prepare(const Args& args);
int cmd_train(const Args& args);
int cmd_eval(const Args& args);
int cmd_export(const Args& args);
int cmd_import(const Args& args);
int cmd_upcycle(const Args& args);
int cmd_init(const Args& args);
int cmd_plan(const Args& args);
int cmd_generate(const Args& args);
int cmd_launch(const Args& args);
int cmd_routing(const Args& args);
int cmd_sweep(const Args& args);

// Small flag helpers shared by the subcommands.
bool take_flag(Args& args, const std::string& flag);                           // --json
bool take_option(Args& args, const std::string& flag, std::string* value);     // --x V / --x=V
std::vector<std::string> take_repeated(Args& args, const std::string& flag);   // --set a=b --set c=d
std::vector<std::string> take_list(Args& args, const std::string& flag);       // --input a b c / --input=a
// An unknown --flag is a UserError with a did-you-mean. Under MOEFORGE_ARGS_ONLY it then checks that every flag
// in `known` is in the command's usage text (else a logic_error) and, where `last`, throws ArgsChecked.
void reject_unknown_flags(const Args& args, const std::string& command, const std::vector<std::string>& known,
                          bool last = true);
int64_t parse_int(const std::string& flag, const std::string& v);
// --precision fp32|bf16 ("" when absent: the precision the checkpoint was trained in).
std::string take_precision(Args& args, const std::string& command);
double parse_double(const std::string& flag, const std::string& v);

}  // namespace moeforge::cli
