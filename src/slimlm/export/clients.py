"""Run an ONNX export in the clients edge users load it in, and compare their tokens with slimlm's edge runtime.

Clients, each in its own runtime, with no slimlm code in the loop:

- transformers.js 4 in Node (`node` on PATH, `@huggingface/transformers` under $SLIMLM_CLIENTS/node);
- Optimum's ORTModelForCausalLM (a Python with optimum-onnx at $SLIMLM_CLIENTS/optimum/bin/python; optimum-onnx
  pins transformers < 4.58, so it cannot share slimlm's environment);
- onnxruntime-genai's own runtime (`og.Model`), for `format: onnx-genai` exports (it needs genai_config.json).

$SLIMLM_CLIENTS defaults to ~/.cache/slimlm-clients; `.ci/clients.sh` installs both there. A client that is
not installed is reported as not checked, with the reason, never as passed.

Each client decodes `steps` greedy tokens after a prompt and scores a held-out block in one forward pass
(its argmax at every position); the caller compares both with slimlm's edge runtime and with PyTorch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from slimlm.errors import last_line

CLIENTS = ("transformers.js", "optimum", "onnxruntime-genai")
SCRIPTS = Path(__file__).with_name("clients")


def clients_home() -> Path:
    return Path(os.environ.get("SLIMLM_CLIENTS", Path.home() / ".cache" / "slimlm-clients")).expanduser()


def unavailable(client: str, export_dir: Path | None = None) -> str | None:
    """Why `client` cannot run here (or cannot take this export), or None."""
    home = clients_home()
    if client == "transformers.js":
        if shutil.which("node") is None:
            return "node is not on PATH"
        if not (home / "node" / "node_modules" / "@huggingface" / "transformers").is_dir():
            return f"@huggingface/transformers is not installed under {home / 'node'} (run .ci/clients.sh)"
    elif client == "optimum":
        if not (home / "optimum" / "bin" / "python").is_file():
            return f"no Optimum environment at {home / 'optimum'} (run .ci/clients.sh)"
    elif client == "onnxruntime-genai":
        if export_dir is not None and not (Path(export_dir) / "genai_config.json").is_file():
            return "its runtime needs genai_config.json, which only format: onnx-genai writes"
    else:
        raise ValueError(f"unknown client {client!r}; known: {', '.join(CLIENTS)}")
    return None


def known_limitation(client: str, export_dir: Path) -> str | None:
    """Why `client` cannot take this export, where its own code shows it (read from the client's source, and
    confirmed by running it: tests/quantize/test_clients.py asserts each one fails). None if it should work."""
    config = json.loads((Path(export_dir) / "config.json").read_text())
    kind, heads = config.get("model_type"), config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    genai = (Path(export_dir) / "genai_config.json").is_file()
    if client == "optimum":
        # ORTModelForCausalLM (optimum-onnx 0.1.0) sizes the empty first cache from the config
        if kind in ("phi3", "gemma2") and kv_heads != heads:
            return (
                f"Optimum sizes a {kind} cache with num_attention_heads ({heads}), not num_key_value_heads ({kv_heads})"
            )
        if kind not in ("gemma", "gemma3_text") and head_dim * heads != config["hidden_size"]:
            return (
                f"Optimum sizes a {kind} cache with hidden_size / num_attention_heads "
                f"({config['hidden_size'] // heads}), not head_dim ({head_dim}), as a pruned model may have"
            )
    if client in ("optimum", "transformers.js") and genai and isinstance(config.get("sliding_window"), int):
        return (
            f"onnxruntime-genai's sliding-window attention needs a cache buffer of at least {config['sliding_window']} "
            f"tokens and {client} starts from an empty one; use format: onnx for this model"
        )
    return None


def run_client(client: str, jobs: list[dict[str, Any]], timeout: float = 600) -> list[dict[str, Any]]:
    """Run every job ({dir, prompt_ids, steps, score_ids}) in one process of `client`; one result per job,
    {"greedy": [...], "top1": [...]} or {"error": "..."}."""
    if client == "onnxruntime-genai":
        return [_genai(job) for job in jobs]
    home = clients_home()
    if client == "transformers.js":
        # Node resolves `import` from the importing file's folder upwards, so the script runs from beside node_modules
        script = home / "node" / "transformers_js.mjs"
        shutil.copy(SCRIPTS / "transformers_js.mjs", script)
        command = ["node", str(script)]
    else:
        command = [str(home / "optimum" / "bin" / "python"), str(SCRIPTS / "optimum_ort.py")]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    with tempfile.TemporaryDirectory() as tmp:
        jobs_file = Path(tmp) / "jobs.json"
        jobs_file.write_text(json.dumps(jobs))
        try:
            proc = subprocess.run([*command, str(jobs_file)], capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return [{"error": f"{client} did not finish in {timeout:.0f} s"} for _ in jobs]
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return [{"error": f"{client} exited with {proc.returncode}: {last_line(proc)}"} for _ in jobs]
    return json.loads(lines[-1])


def _genai(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import onnxruntime_genai as og

    try:
        model = og.Model(str(job["dir"]))
        out: dict[str, Any] = {}
        if job.get("prompt_ids"):
            params = og.GeneratorParams(model)
            params.set_search_options(do_sample=False, max_length=len(job["prompt_ids"]) + job["steps"])
            generator = og.Generator(model, params)
            generator.append_tokens(job["prompt_ids"])
            out["greedy"] = []
            while not generator.is_done():
                generator.generate_next_token()
                out["greedy"].append(int(generator.get_next_tokens()[0]))
        if job.get("score_ids"):  # teacher-forced: one token at a time, the logits after each
            params = og.GeneratorParams(model)
            params.set_search_options(do_sample=False, max_length=len(job["score_ids"]) + 1)
            generator = og.Generator(model, params)
            out["top1"] = []
            for token in job["score_ids"]:
                generator.append_tokens([token])
                out["top1"].append(int(np.argmax(generator.get_logits()[0, -1])))
        return out
    except Exception as e:  # noqa: BLE001 - the client's own failure is the finding
        return {"error": f"onnxruntime-genai: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def compare(result: dict[str, Any], greedy: list[int], top1: list[int] | None) -> dict[str, Any]:
    """A client's result against the reference: whether the greedy tokens are the same, and top-1 agreement."""
    if "error" in result:
        return {"checked": False, "reason": result["error"]}
    same = result.get("greedy") == greedy
    verdict: dict[str, Any] = {"checked": True, "same_greedy_tokens": same, "greedy_steps": len(greedy)}
    if not same:
        verdict["greedy"] = result.get("greedy")
    if top1 is not None and result.get("top1") is not None:
        pairs = list(zip(result["top1"], top1, strict=False))
        verdict["top1_agreement"] = sum(a == b for a, b in pairs) / max(len(pairs), 1)
    return verdict


def check_clients(edge, prompt_ids: list[int], steps: int, score_ids: list[int]) -> dict[str, Any]:
    """Every client on one export, against slimlm's edge runtime (`edge`, an EdgeModel of the export) on the
    same export: greedy tokens and the argmax at each position of `score_ids`. A client that cannot run is
    recorded with the reason."""
    import numpy as np

    export_dir = edge.path
    greedy = list(edge.generate_ids(prompt_ids, steps))
    edge_top1 = np.argmax(edge.logits(np.array([score_ids]))[0], -1).tolist()
    job = {"dir": str(export_dir), "prompt_ids": prompt_ids, "steps": steps, "score_ids": score_ids}
    verdicts: dict[str, Any] = {}
    for client in CLIENTS:
        reason = unavailable(client, export_dir)
        if reason:
            verdicts[client] = {"checked": False, "reason": reason}
            continue
        verdicts[client] = verdict = compare(run_client(client, [job])[0], greedy, edge_top1)
        limitation = known_limitation(client, export_dir)
        if limitation and not verdict["checked"]:
            verdict["reason"] = f"{limitation} ({verdict['reason']})"
    return verdicts


def describe_verdict(verdict: dict[str, Any]) -> str:
    """One phrase for a client's verdict: `same tokens (24 steps), top-1 1.000` or `not checked: <why>`."""
    if not verdict.get("checked"):
        return f"not checked ({verdict.get('reason')})"
    text = "same tokens" if verdict["same_greedy_tokens"] else "DIFFERENT tokens"
    text += f" ({verdict['greedy_steps']} steps)"
    if "top1_agreement" in verdict:
        text += f", top-1 agreement {verdict['top1_agreement']:.3f}"
    return text
