"""A written GGUF run by a runtime, behind the interface parity and evaluation use: `logits(ids)`, `generate_ids`.

llama.cpp itself (llama-cpp-python, the `[llama]` extra) when it is installed; otherwise transformers,
which reads the GGUF back and dequantizes it (`from_pretrained(gguf_file=...)`): the file's layout and
tokenizer are then checked, and its quantization error too, but not llama.cpp's kernels. `runtime`
names which one measured.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from slimlm.errors import RecipeError
from slimlm.export.config import llama_cpp_installed
from slimlm.progress import library_bars

GGUF_FILE = "model.gguf"
LLAMA_CPP = "llama.cpp"
TRANSFORMERS = "transformers (dequantized read-back; llama-cpp-python is not installed)"


def is_gguf(path: Path) -> bool:
    return (Path(path) / GGUF_FILE).is_file()


def open_gguf(path: Path, *, context: int = 2048, threads: int | None = None):
    """The GGUF in `path` (a folder holding model.gguf) in llama.cpp, or read back by transformers."""
    if llama_cpp_installed():
        return LlamaCppModel(Path(path), context=context, threads=threads)
    return TransformersGGUF(Path(path))


class _Runtime:
    """Both runtimes close what they hold when a `with` block ends."""

    def __enter__(self):
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        pass


class LlamaCppModel(_Runtime):
    runtime = LLAMA_CPP

    def __init__(
        self,
        path: Path,
        *,
        context: int = 2048,
        threads: int | None = None,
        logits_all: bool = True,
        f32_cache: bool = False,
    ):
        from llama_cpp import GGML_TYPE_F32, Llama

        self.path, self.context = path, context  # (llama.cpp may round its own context up; slimlm's buffers are this)
        self.llm = Llama(
            model_path=str(path / GGUF_FILE),
            n_ctx=context,
            n_batch=min(context, 512),
            logits_all=logits_all,  # every position's logits, for perplexity and agreement; the last only to decode
            n_threads=threads or os.cpu_count(),
            verbose=False,
            # llama.cpp keeps its KV cache in f16 by default (what users run); f32 shows an f32 file's exactness
            **({"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_cache else {}),
        )
        self.vocab_size = self.llm.n_vocab()

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """[batch, seq] token ids -> [batch, seq, vocab] fp32 logits, one sequence at a time."""
        if ids.shape[1] > self.context:
            raise RecipeError(
                f"a sequence of {ids.shape[1]} tokens is longer than the {self.context}-token llama.cpp context "
                "slimlm scores this GGUF in; lower the evaluation's seq_len (or the task's context) for GGUF stages"
            )
        out = np.empty((*ids.shape, self.vocab_size), dtype=np.float32)
        for row, seq in enumerate(np.asarray(ids)):
            self.llm.reset()
            self.llm.eval(seq.tolist())
            out[row] = self.llm.scores[: len(seq)]
        return out

    def last_logits(self) -> np.ndarray:
        """The logits after the last token evaluated (llama-cpp-python keeps `scores` only with logits_all)."""
        pointer = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(pointer, shape=(self.vocab_size,))

    def generate_ids(self, prompt: list[int], steps: int) -> Iterator[int]:
        """Greedy continuation of `prompt` with llama.cpp's KV cache."""
        self.llm.reset()
        self.llm.eval(prompt)
        for step in range(steps):
            token = int(np.argmax(self.last_logits()))
            yield token
            if step + 1 < steps:
                self.llm.eval([token])

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    def close(self) -> None:
        self.llm.close()


class TransformersGGUF(_Runtime):
    runtime = TRANSFORMERS

    def __init__(self, path: Path):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

        self.path = path
        self.torch = torch
        # the config.json beside the file: transformers' GGUF reader maps no explicit head_dim (key_length)
        config = AutoConfig.from_pretrained(path)
        if config.model_type == "mistral":  # a GGUF holds mistral as llama, and transformers reads it so
            config = LlamaConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"})
        with library_bars(["transformers.modeling_gguf_pytorch_utils"]):  # its de-quantizing bar, silenced
            self.model = AutoModelForCausalLM.from_pretrained(
                path, gguf_file=GGUF_FILE, config=config, dtype=torch.float32
            ).eval()

    def logits(self, ids: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(input_ids=self.torch.as_tensor(ids), use_cache=False).logits.float().numpy()

    def generate_ids(self, prompt: list[int], steps: int) -> Iterator[int]:
        ids = self.torch.tensor([prompt])
        with self.torch.inference_mode():
            out = self.model.generate(
                ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=steps, do_sample=False
            )
        yield from out[0, len(prompt) :].tolist()
