"""`kind: export` with `format: gguf` — one model.gguf for llama.cpp, checked in llama.cpp.

The folder it writes holds model.gguf beside the input's config and tokenizer files, so slimlm's evaluation
(and `transformers`, which reads a GGUF back) find them. Parity is measured in llama.cpp when
llama-cpp-python is installed, otherwise on transformers' dequantized read-back; `runtime` says which.
"""

from __future__ import annotations

from pathlib import Path

from slimlm.export.checks import check_keep_8bit, refuse_quantized_input
from slimlm.export.config import GGUF_K_QUANTS, ExportConfig
from slimlm.export.gguf_arch import gguf_family
from slimlm.export.gguf_file import k_quant_misfits, write_gguf
from slimlm.export.gguf_runtime import GGUF_FILE, LLAMA_CPP, open_gguf
from slimlm.export.onnx_graph import copy_side_files
from slimlm.export.parity import parity, parity_blocks, report_parity
from slimlm.progress import status
from slimlm.sources.models import load_model, load_tokenizer
from slimlm.stage import StageContext, StageResult, field_error

# Strings whose tokenization llama.cpp must share with the HF tokenizer: ASCII, accents, emoji, code and digits.
# (Leading spaces are left out: llama.cpp's SentencePiece tokenizer splits them unlike HF's, a known difference.)
TOKENIZER_PROBES = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Café, naïve, façade, Ångström, Größe, señor",
    "Emoji: 🚀🦙 ✅ 😶‍🌫️",
    "def f(x):\n    return x ** 2  # square\n\n\tif x != 0: print(f'{x:>4}')",
    "runs   of spaces, 12345 67.89, 3.14159",
)


def run(config: ExportConfig, context: StageContext) -> StageResult:
    refuse_quantized_input(config, context.input_dir)  # (a K-quant without llama.cpp is refused at plan time)
    model = load_model(context.input_dir, dtype="float32", device="cpu", trust_remote_code=context.trust_remote_code)
    gguf_family(model.config)
    if config.quantize in GGUF_K_QUANTS and (misfits := k_quant_misfits(model.state_dict())):
        raise field_error(
            config,
            "quantize",
            f"{config.quantize} packs rows in blocks of 256, and {len(misfits)} matrices are not a multiple of 256 "
            f"wide (e.g. {', '.join(misfits[:3])}); llama.cpp would silently use another type for them. Prune with "
            "round_to: 256, or export q4_1 / q8_0",
        )
    check_keep_8bit(config, model)
    out = context.output_dir / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    status(f"writing {GGUF_FILE} ({config.quantize})")
    facts = write_gguf(
        model,
        context.input_dir,
        context.teacher_dir,
        out / GGUF_FILE,
        config.quantize,
        keep_8bit=config.keep_8bit,
        quantize_embeddings=config.quantize_embeddings,
        work_dir=context.work_dir,
        name=config.name,
    )
    copy_side_files(context.input_dir, out)
    if note := facts["tokenizer"].get("note"):
        status(f"tokenizer: {note}")
    metrics = {**facts, "gguf_bytes": (out / GGUF_FILE).stat().st_size}
    if config.parity is not None:
        metrics |= _parity(config, context, model, out)
    return StageResult(artifact="gguf", metrics=metrics)


def _parity(config: ExportConfig, context: StageContext, model, out: Path) -> dict:
    blocks = parity_blocks(config, context, model)
    with open_gguf(out, context=blocks.shape[1] + config.parity.greedy_steps + 16) as runtime:
        status(f"measuring the GGUF in {runtime.runtime}")
        metrics = parity(model, runtime, blocks, config.parity.greedy_steps)
        metrics["runtime"] = runtime.runtime
        if runtime.runtime == LLAMA_CPP:
            metrics["tokenizer_match"] = _tokenizer_match(runtime, context.input_dir)
    report_parity(metrics)
    return metrics


def _tokenizer_match(runtime, input_dir: Path) -> float:
    """The fraction of TOKENIZER_PROBES that llama.cpp tokenizes exactly as the HF tokenizer does."""
    tokenizer = load_tokenizer(input_dir)
    same = [runtime.tokenize(text) == tokenizer.encode(text, add_special_tokens=False) for text in TOKENIZER_PROBES]
    return sum(same) / len(same)
