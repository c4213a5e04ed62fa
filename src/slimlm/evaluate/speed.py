"""Prefill and decode throughput and peak memory of a model artifact, measured in a fresh process.

A fresh process (`python -m slimlm.evaluate.speed`) makes the peak-memory figure the model's own,
not the pipeline's, and keeps a teacher's timing from warming caches for a student's. Prefill is
one forward pass over a prompt; decode is one cached forward per new token (greedy); each figure is
the median of `repeats` after one warm-up. On CUDA the memory figure is torch's peak allocation;
on CPU it is the process's peak resident set (VmHWM), interpreter and libraries included.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from slimlm.errors import StageFailed, last_line
from slimlm.evaluate.spec import SpeedEval
from slimlm.export.config import llama_cpp_installed
from slimlm.export.gguf_runtime import GGUF_FILE


def measure_speed(
    path: Path, spec: SpeedEval, *, dtype: str, device: str, trust_remote_code: bool
) -> dict[str, Any] | None:
    """Run the measurement in a child process and return its figures (None: a GGUF without llama.cpp to run it)."""
    if (path / GGUF_FILE).is_file() and not llama_cpp_installed():
        return None
    args = {"path": str(path), "spec": spec.model_dump(), "dtype": dtype, "device": device, "trust": trust_remote_code}
    proc = subprocess.run(
        [sys.executable, "-m", "slimlm.evaluate.speed", json.dumps(args)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise StageFailed(f"speed measurement of {path} failed: {last_line(proc)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run(path: Path, spec: SpeedEval, dtype: str, device: str, trust: bool) -> dict[str, Any]:
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    batches = sorted({1, spec.batch_size})
    if (path / "model.onnx").is_file():
        from slimlm.edge import EdgeModel

        step_fn, vocab = _onnx_steps(EdgeModel(path, threads=spec.threads), spec.prompt_tokens + spec.new_tokens)
    elif (path / GGUF_FILE).is_file():
        from slimlm.export.gguf_runtime import LlamaCppModel

        model = LlamaCppModel(
            path, context=spec.prompt_tokens + spec.new_tokens, threads=spec.threads, logits_all=False
        )
        step_fn, vocab, batches = _llama_cpp_steps(model), model.vocab_size, [1]  # one sequence per llama.cpp context
    else:
        from slimlm.sources.models import load_model

        model = load_model(path, dtype=dtype, device=device, trust_remote_code=trust)
        step_fn, vocab = _torch_steps(model), model.config.vocab_size
    figures: dict[str, Any] = {}
    for batch in batches:
        suffix = "" if batch == 1 else f"_b{batch}"
        prefill, decode = _timed_generation(step_fn, vocab, batch, spec)
        figures[f"prefill_tokens_per_s{suffix}"] = prefill
        figures[f"decode_tokens_per_s{suffix}"] = decode
    figures["peak_memory_bytes"] = _peak_memory(device)
    figures["settings"] = f"prompt {spec.prompt_tokens}, {spec.new_tokens} new tokens, median of {spec.repeats}"
    return figures


def _timed_generation(step_fn, vocab: int, batch: int, spec: SpeedEval) -> tuple[float, float]:
    import numpy as np

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, vocab, (batch, spec.prompt_tokens))
    prefills, decodes = [], []
    for attempt in range(spec.repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        token, state = step_fn(prompt, None, 0)
        t1 = time.perf_counter()
        length = spec.prompt_tokens
        for _ in range(spec.new_tokens - 1):
            token, state = step_fn(token, state, length)
            length += 1
        t2 = time.perf_counter()
        if attempt:
            prefills.append(batch * spec.prompt_tokens / (t1 - t0))
            decodes.append(batch * (spec.new_tokens - 1) / (t2 - t1))
    return statistics.median(prefills), statistics.median(decodes)


def _torch_steps(model):
    import torch

    @torch.inference_mode()
    def step(ids, cache, length):
        ids = torch.as_tensor(ids, device=model.device)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        if token.device.type == "cuda":
            torch.cuda.synchronize()
        return token, out.past_key_values

    return step


def _llama_cpp_steps(model):
    import numpy as np

    def step(ids, state, length):
        if state is None:
            model.llm.reset()
        model.llm.eval([int(t) for t in ids[0]])
        return np.array([[int(np.argmax(model.last_logits()))]]), True

    return step


def _onnx_steps(edge, max_length: int):
    def step(ids, cache, length):
        cache = cache or edge.new_cache(ids.shape[0], max_length)
        logits = edge.step(ids, cache)
        return logits[:, -1].argmax(-1)[:, None], cache

    return step, int(edge.config["vocab_size"])


def _peak_memory(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource  # not Linux: ru_maxrss (bytes on macOS)

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


if __name__ == "__main__":
    a = json.loads(sys.argv[1])
    result = _run(Path(a["path"]), SpeedEval.model_validate(a["spec"]), a["dtype"], a["device"], a["trust"])
    print(json.dumps(result))
