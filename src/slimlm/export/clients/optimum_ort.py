"""Runs slimlm ONNX exports in Optimum's ORTModelForCausalLM, in Optimum's own environment (no slimlm there).

Usage: python optimum_ort.py JOBS.json, where JOBS.json is a list of {dir, prompt_ids, steps, score_ids}.
Prints one JSON line: a list with, per job, {"greedy": [new token ids], "top1": [argmax at each position of
score_ids]} or {"error": "..."}.
"""

import json
import sys
import warnings

import torch
from optimum.onnxruntime import ORTModelForCausalLM

warnings.simplefilter("ignore")


def run(job):
    model = ORTModelForCausalLM.from_pretrained(job["dir"], use_cache=True, use_io_binding=False)
    output = {}
    if job.get("prompt_ids"):
        ids = torch.tensor([job["prompt_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=job["steps"], do_sample=False)
        output["greedy"] = out[0, ids.shape[1] :].tolist()
    if job.get("score_ids"):
        ids = torch.tensor([job["score_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        output["top1"] = logits[0].argmax(-1).tolist()
    return output


results = []
for job in json.loads(open(sys.argv[1]).read()):
    try:
        results.append(run(job))
    except Exception as e:  # the client's own failure is the finding
        results.append({"error": f"optimum: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"})
print(json.dumps(results))
