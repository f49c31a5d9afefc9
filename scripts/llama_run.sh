#!/usr/bin/env bash
# Runs a GGUF file in llama.cpp (node-llama-cpp, installed by scripts/setup.sh): a greedy continuation of PROMPT
# and the loss (nats per token) of TEXT, as a user of llama.cpp would see the model.
# usage: scripts/llama_run.sh MODEL.gguf [PROMPT] [TEXT]
set -euo pipefail
ROOT=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
model=$(readlink -f "$1")
prompt=${2:-The jury said}
text=${3:-The jury further said in term-end presentments that the City Executive Committee, which had over-all charge of the election, deserves the praise and thanks of the City of Atlanta for the manner in which the election was conducted.}
if [ ! -f "$ROOT/third_party/node-llama-cpp/node_modules/node-llama-cpp/package.json" ] || ! command -v node >/dev/null; then
  echo "llama.cpp: skipped (node-llama-cpp is not installed; scripts/setup.sh installs it with npm)"
  exit 0
fi
job=$(mktemp --suffix=.json)
trap 'rm -f "$job"' EXIT
python3 -c 'import json, sys; json.dump({"model": sys.argv[1], "prompt": sys.argv[2], "max_new_tokens": 32, "text": sys.argv[3]}, open(sys.argv[4], "w"))' \
  "$model" "$prompt" "$text" "$job"
node "$ROOT/tests/interop/llama_check.mjs" "$job" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read().strip().splitlines()[-1])
print("llama.cpp generates: " + sys.argv[1] + r["text"].replace("\n", " "))
lp = r["logprobs"]
print("llama.cpp loss: %.4f nats/token over %d tokens of the sample text" % (-sum(lp) / len(lp), len(lp)))' "$prompt"
