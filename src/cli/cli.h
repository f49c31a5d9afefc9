// Subcommands of the `moeforge` binary: one file each, one entry point each.
#pragma once
#include <string>
#include <vector>

namespace moeforge::cli {

using Args = std::vector<std::string>;

int run(const Args& args);  // dispatch; returns the exit status
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
void reject_unknown_flags(const Args& args, const std::string& command, const std::vector<std::string>& known);
int64_t parse_int(const std::string& flag, const std::string& v);
// --precision fp32|bf16 ("" when absent: the precision the checkpoint was trained in).
std::string take_precision(Args& args, const std::string& command);
double parse_double(const std::string& flag, const std::string& v);

}  // namespace moeforge::cli
