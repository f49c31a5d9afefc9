// Runs a GGUF file in llama.cpp (the node-llama-cpp package's prebuilt CPU build) and prints what the interop test
// compares with moeforge: the tokenizer's ids, each next token's log-probability, and a greedy continuation.
// usage: node llama_check.mjs JOB.json   with JOB = {"model": "m.gguf", "lora": "a.gguf" (optional),
//        "text": "...", "prompt": "...", "max_new_tokens": N, "threads": T}
// prints one JSON line: {"bos": id, "ids": [BOS, ...tokenize(text)], "logprobs": [log p(ids[i+1] | ids[..i])],
//        "prompt_ids": [BOS, ...], "generated": [...], "text": "..."}
import {readFileSync} from "node:fs";
import {dirname, join} from "node:path";
import {fileURLToPath, pathToFileURL} from "node:url";

// The package scripts/setup.sh installs (ES modules do not search NODE_PATH): third_party/node-llama-cpp.
const packageDir = process.env.MOEFORGE_NODE_LLAMA_CPP ??
    join(dirname(fileURLToPath(import.meta.url)), "..", "..", "third_party", "node-llama-cpp", "node_modules", "node-llama-cpp");
const {getLlama} = await import(pathToFileURL(join(packageDir, "dist", "index.js")).href);

const job = JSON.parse(readFileSync(process.argv[2], "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: "error", progressLogs: false});
const model = await llama.loadModel({modelPath: job.model});
// The KV cache in f32 (llama.cpp's default is f16, which rounds every cached key and value to 11 bits) and no flash
// attention: the f32 comparison is then of the arithmetic alone.
const contextOptions = {contextSize: 512, batchSize: 512, threads: job.threads ?? 2, flashAttention: false,
                        experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32"};
if (job.lora) contextOptions.lora = {adapters: [{filePath: job.lora, scale: 1}]};  // scale 1: the file's Bs hold theirs
const context = await model.createContext(contextOptions);
const bos = model.tokens.bos;

// Feeds tokens[0], then for i = 1.. the token pick(output after the tokens so far, i) returns (null: stop).
async function walk(sequence, tokens, steps, pick) {
  await sequence.clearHistory();
  const it = sequence.evaluateWithMetadata([tokens[0]], {probabilities: true}, {temperature: 0});
  let r = await it.next();
  for (let i = 1; i < steps; i++) {
    const next = pick(r.value, i);
    if (next === null) break;
    r = await it.next(next);
  }
  await it.return();
}

const out = {bos};
const sequence = context.getSequence();
if (job.text !== undefined) {
  const ids = [bos, ...model.tokenize(job.text)];
  const logprobs = [];
  await walk(sequence, ids, ids.length, (v, i) => {
    logprobs.push(Math.log(v.probabilities.get(ids[i]) ?? 0));
    return ids[i];
  });
  out.ids = ids;
  out.logprobs = logprobs;
}
if (job.prompt !== undefined) {
  const prompt = [bos, ...model.tokenize(job.prompt)];
  const generated = [];
  await walk(sequence, prompt, prompt.length + job.max_new_tokens, (v, i) => {
    if (i < prompt.length) return prompt[i];
    generated.push(v.token);
    return v.token === model.tokens.eos ? null : v.token;
  });
  out.prompt_ids = prompt;
  out.generated = generated;
  out.text = model.detokenize(generated);
}
console.log(JSON.stringify(out));
await context.dispose();
await model.dispose();
