"""Generation from an exported ONNX directory with onnxruntime, tokenizers and numpy only (no torch, no transformers).

    from slimlm.edge import EdgeModel
    model = EdgeModel("runs/quickstart/03-export-int8/onnx")
    for piece in model.stream("def fibonacci(n):", max_new_tokens=64):
        print(piece, end="", flush=True)

This module must never import torch or transformers: it is what runs on a device that has neither.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from slimlm.errors import EmptyPrompt, PromptTooLong, SourceError


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds and self.new_tokens > 1 else 0.0

    @property
    def tokens_per_second(self) -> float:
        total = self.prefill_seconds + self.decode_seconds
        return self.new_tokens / total if total else 0.0


@dataclass
class KVCache:
    """The keys and values one generation has cached: arrays that each step replaces with longer ones, or, with a
    `binding`, buffers of `max_length` that the graph updates in place."""

    max_length: int
    past: list
    binding: ort.IOBinding | None = None
    length: int = 0


class EdgeModel:
    """A causal LM exported by slimlm (Optimum's I/O names), run with a KV cache."""

    def __init__(self, path: str | Path, threads: int | None = None, options: ort.SessionOptions | None = None):
        self.path = path = Path(path)
        options = options or ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        for name in ("model.onnx", "tokenizer.json", "config.json"):
            if not (path / name).is_file():
                raise SourceError(
                    f"{path} is not an exported model: it has no {name} (an export has model.onnx, its external "
                    "data, config.json and tokenizer.json); point at the onnx/ folder of an export stage"
                )
        self.config = config = _json_object(path / "config.json")
        generation = _json_object(path / "generation_config.json") if (path / "generation_config.json").exists() else {}
        try:
            self.session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for bad protobufs and missing data
            raise SourceError(
                f"onnxruntime cannot load {path / 'model.onnx'} ({_first_line(e)}); is the export complete, with "
                "model.onnx and its external data file side by side? Export it again if not"
            ) from None
        try:
            self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a damaged file
            raise SourceError(
                f"{path / 'tokenizer.json'} cannot be read ({_first_line(e)}); export the model again"
            ) from None
        eos = generation.get("eos_token_id", config.get("eos_token_id"))
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        if "input_ids" not in self.inputs or not self.past_names:
            raise SourceError(
                f"{path / 'model.onnx'} has inputs {', '.join(self.inputs)}; a slimlm export takes input_ids, "
                "attention_mask and past_key_values.N.key/value (a causal LM with a KV cache)"
            )
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        shape = self.inputs[self.past_names[0]].shape  # [batch, kv_heads, past, head_dim]
        try:
            self.kv_heads = int(shape[1])
            # onnxruntime-genai builds leave head_dim symbolic; the config has it.
            self.head_dim = (
                shape[3]
                if isinstance(shape[3], int)
                else int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
            )
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            raise SourceError(
                f"{path / 'config.json'} does not give the graph's cache shape {shape} (head_dim, or hidden_size "
                "and num_attention_heads); was it edited? Export the model again"
            ) from None
        declared = config.get("num_key_value_heads") or config.get("num_attention_heads")
        if isinstance(declared, int) and declared != self.kv_heads:
            raise SourceError(
                f"{path}: config.json says {declared} key/value heads, but the graph's cache has {self.kv_heads}; "
                "config.json does not belong to this graph (was it edited?)"
            )
        self.dtype = np.float16 if "float16" in self.inputs[self.past_names[0]].type else np.float32
        logits = next((o for o in self.session.get_outputs() if o.name == "logits"), None)
        if logits is None or not (isinstance(logits.shape[2], int) or isinstance(config.get("vocab_size"), int)):
            raise SourceError(
                f"{path}: the graph has no logits output of known width (nor config.json a vocab_size); "
                "export the model again"
            )
        self.logits_dtype = np.float16 if "float16" in logits.type else np.float32
        self.vocab_size = logits.shape[2] if isinstance(logits.shape[2], int) else int(config["vocab_size"])
        if self.vocab_size != config.get("vocab_size", self.vocab_size):
            raise SourceError(
                f"{path}: config.json says vocab_size {config['vocab_size']}, but the graph's logits have "
                f"{self.vocab_size}; config.json does not belong to this graph (was it edited?)"
            )
        genai = path / "genai_config.json"
        # onnxruntime-genai's builder marks graphs whose attention (GroupQueryAttention) can read and write one
        # cache buffer in place; its own runtime then skips copying the cache into a new present every step.
        search = _json_object(genai).get("search", {}) if genai.exists() else {}
        self.share_buffer = isinstance(search, dict) and bool(search.get("past_present_share_buffer", False))

    def encode(self, prompt: str) -> list[int]:
        """A prompt's token ids; an empty prompt has nothing to continue."""
        ids = self.tokenizer.encode(prompt).ids
        if not ids:
            raise EmptyPrompt("the prompt is empty (it encodes to no tokens); give some text to continue")
        return ids

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits for a [batch, seq] block with no cache (for evaluation)."""
        batch, seq = input_ids.shape
        if self.share_buffer:  # GroupQueryAttention reads and writes the buffer it is given, even when empty
            return self.step(input_ids, self.new_cache(batch, seq))
        feeds = self._feeds(input_ids, np.ones((batch, seq), np.int64), np.tile(np.arange(seq), (batch, 1)))
        feeds.update(zip(self.past_names, self._empty_past(batch), strict=True))
        return self.session.run(["logits"], feeds)[0]

    def new_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty cache for `batch` sequences of at most `max_length` tokens, prompt included."""
        if not self.share_buffer:
            return KVCache(max_length, self._empty_past(batch))
        # a sliding-window attention kernel (Gemma 2 and 3) refuses a buffer shorter than its window
        window = self.config.get("sliding_window")
        capacity = max(max_length, window if isinstance(window, int) else 0)
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.dtype)) for _ in self.past_names]
        binding = self.session.io_binding()
        for past, present, buffer in zip(self.past_names, self.present_names, buffers, strict=True):
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)  # the same memory: attention writes new keys in place
        return KVCache(max_length, buffers, binding)

    def step(self, ids: np.ndarray, cache: KVCache) -> np.ndarray:
        """One forward pass over new tokens `ids` [batch, n] after those in `cache`, which it extends: the logits."""
        batch, n = ids.shape
        if cache.length + n > cache.max_length:
            raise ValueError(f"the cache holds {cache.max_length} tokens; {cache.length} + {n} do not fit")
        mask = np.ones((batch, cache.length + n), np.int64)
        positions = np.tile(np.arange(cache.length, cache.length + n), (batch, 1))
        feeds = self._feeds(ids, mask, positions)
        if cache.binding is None:
            feeds.update(zip(self.past_names, cache.past, strict=True))
            logits, *cache.past = self.session.run(["logits", *self.present_names], feeds)
        else:
            for name, value in feeds.items():
                cache.binding.bind_cpu_input(name, value)
            logits = np.empty((batch, n, self.vocab_size), self.logits_dtype)  # onnxruntime writes into it
            cache.binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
            self.session.run_with_iobinding(cache.binding)
        cache.length += n
        return logits

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.dtype) for _ in self.past_names]

    def _feeds(self, ids, mask, positions) -> dict[str, np.ndarray]:
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = positions.astype(np.int64)
        return feeds

    def generate_ids(
        self,
        prompt_ids: list[int],
        max_new_tokens: int = 64,
        *,
        sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        stats: GenerationStats | None = None,
    ) -> Iterator[int]:
        """Yield new token ids one at a time: a prefill over the prompt, then one cached step per token.

        Generation stops at the model's context window (`max_position_embeddings`), as transformers and
        onnxruntime-genai stop: there are no positions past it, and the cache is allocated up to it."""
        context = self.config.get("max_position_embeddings")
        if context:
            if len(prompt_ids) >= context:
                raise PromptTooLong(
                    f"the prompt has {len(prompt_ids)} tokens and the model's context holds {context}; shorten the prompt"
                )
            max_new_tokens = min(max_new_tokens, context - len(prompt_ids))
        rng = np.random.default_rng(seed)
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = len(prompt_ids)
        ids = np.array([prompt_ids], np.int64)
        cache = self.new_cache(1, len(prompt_ids) + max_new_tokens)
        t0 = time.perf_counter()
        for step in range(max_new_tokens):
            logits = self.step(ids, cache)[0, -1]
            token = _sample(logits, rng, temperature, top_p) if sample else int(np.argmax(logits))
            now = time.perf_counter()
            if step == 0:
                stats.prefill_seconds = now - t0
            else:
                stats.decode_seconds = now - t0 - stats.prefill_seconds
            stats.new_tokens += 1
            yield token
            if token in self.eos_ids:
                return
            ids = np.array([[token]], np.int64)

    def stream(
        self, prompt: str, max_new_tokens: int = 64, stats: GenerationStats | None = None, **kwargs
    ) -> Iterator[str]:
        """Yield decoded text pieces as tokens arrive."""
        prompt_ids = self.encode(prompt)
        generated: list[int] = []
        shown = ""
        for token in self.generate_ids(prompt_ids, max_new_tokens, stats=stats, **kwargs):
            if token in self.eos_ids:
                break
            generated.append(token)
            text = self.tokenizer.decode(generated)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(shown) :]
                shown = text


def _json_object(path: Path) -> dict:
    """A JSON object from an export's folder, or one clear error naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceError(f"{path} cannot be read as JSON ({_first_line(e)}); export the model again") from None
    if not isinstance(value, dict):
        raise SourceError(f"{path} holds a JSON {type(value).__name__}, not an object; export the model again")
    return value


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def _sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_p: float) -> int:
    z = logits.astype(np.float64) / max(temperature, 1e-6)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(len(probs), p=probs))
