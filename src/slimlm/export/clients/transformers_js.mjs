// Runs slimlm ONNX exports in transformers.js (Node), as a web or Node user would load them.
// Usage: node transformers_js.mjs JOBS.json, where JOBS.json is a list of {dir, prompt_ids, steps, score_ids}.
// Prints one JSON line: a list with, per job, {greedy: [new token ids], top1: [argmax at each position of
// score_ids]} or {error: "..."}.
// slimlm's export folder holds model.onnx beside config.json and the tokenizer, so `subfolder: ""` points
// transformers.js at it (its default is onnx/model.onnx); dtype "fp32" names the file model.onnx whatever the
// weights' precision, and onnxruntime-node reads the external data beside it.
import fs from "node:fs";
import path from "node:path";
import { AutoModelForCausalLM, Tensor, env } from "@huggingface/transformers";

env.allowRemoteModels = false;
const ids = (list) => new Tensor("int64", BigInt64Array.from(list.map(BigInt)), [1, list.length]);

async function run(job) {
  env.localModelPath = path.dirname(path.resolve(job.dir));
  const model = await AutoModelForCausalLM.from_pretrained(path.basename(path.resolve(job.dir)), {
    subfolder: "",
    dtype: "fp32",
    device: "cpu",
  });
  const output = {};
  if (job.prompt_ids) {
    const out = await model.generate({
      input_ids: ids(job.prompt_ids),
      attention_mask: ids(job.prompt_ids.map(() => 1)),
      max_new_tokens: job.steps,
      do_sample: false,
    });
    output.greedy = Array.from(out.data, Number).slice(job.prompt_ids.length);
  }
  if (job.score_ids) {
    const mask = ids(job.score_ids.map(() => 1));
    const { logits } = await model({ input_ids: ids(job.score_ids), attention_mask: mask });
    const [, seq, vocab] = logits.dims;
    output.top1 = [];
    for (let t = 0; t < seq; t++) {
      let best = 0;
      for (let v = 1; v < vocab; v++) if (logits.data[t * vocab + v] > logits.data[t * vocab + best]) best = v;
      output.top1.push(best);
    }
  }
  await model.dispose();
  return output;
}

const results = [];
for (const job of JSON.parse(fs.readFileSync(process.argv[2], "utf8"))) {
  try {
    results.push(await run(job));
  } catch (e) {
    results.push({ error: `transformers.js: ${String(e.message ?? e).split("\n")[0].slice(0, 300)}` });
  }
}
process.stdout.write(JSON.stringify(results) + "\n");
